"""How many classes grouped cls training puts in a group: forced (`--classes_per_group`), reused from the run being
resumed, or (`--cls_strategy auto`) sized to the memory free on the device.

The memory of a grouped step grows linearly with the group (one super-batch, one LoRA stack slice per class), so the
probe measures a one-class and a two-class step (the first class costs `one`, each further class `two - one`) and the
size is the largest group whose estimate stays within `1 - memory_safety_margin` of the available memory. On CUDA the
probe reads the allocator's peak (`torch.cuda.max_memory_allocated`) over a forward and backward pass, against the
free device memory (`torch.cuda.mem_get_info`, plus what torch's cache holds). On a CPU it reads the process's peak
resident memory over the step's forward and backward pass (Linux: the kernel's high-water mark, reset before the step)
against the available RAM, shared by the processes of the machine; where that mark cannot be read it falls back to
the bytes the forward pass saves for the backward (`torch.autograd.graph.saved_tensors_hooks`), which leave out the
step's transient buffers (attention scores, the backward's own) and so undercount (a 512 px SD 2.1 step at batch 8:
1.6 GiB counted per class, 15.4 GiB of peak resident memory measured). AdamW's two moments per LoRA weight, which
the probe does not allocate, are added to each class.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import GeneratorTrainingConfig
from ..data import TrainingUnit, make_step_batch
from ..modeling import GeneratorModels, build_latent_cache
from .loop import grouped_losses, one_class_does_not_fit
from .lora import GroupedLora


@dataclass
class MemoryReading:
    """What the probe measured, in bytes: the memory a one-class and a two-class step add to what is allocated
    (`two` None: a two-class step does not fit, `no_two` says how that was found) and the memory available to the
    groups; `source` names that memory and `method` how the steps were measured."""

    one: int
    two: int | None
    available: int
    source: str
    method: str = "measured"
    no_two: str = "a two-class step ran out of memory"


@dataclass
class GroupSizing:
    """The group size of a run and why (logged, and recorded in `datadream_config.json`)."""

    classes_per_group: int
    reason: str


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def fitting_group_size(reading: MemoryReading, safety_margin: float) -> tuple[int, str]:
    """The largest group whose estimated memory, `one + (G - 1) * (two - one)`, fits in `(1 - safety_margin) *
    available` (at least 1), and the arithmetic behind it."""
    budget = (1 - safety_margin) * reading.available
    head = f"{_size(reading.available)} {reading.source}, {_size(budget)} with the {safety_margin:.0%} safety margin"
    if reading.two is None:
        return 1, f"{head}; {reading.no_two}"
    # Two points of a noisy measure: a further class is never taken to cost nothing or less.
    per_class = reading.two - reading.one if reading.two > reading.one else reading.one
    if reading.one > budget:
        return 1, f"{head}; one class's step needs {_size(reading.one)} ({reading.method})"
    size = 1 + int((budget - reading.one) // per_class)
    return size, (f"{head}; the first class's step needs {_size(reading.one)}, each further class "
                  f"{_size(per_class)} ({reading.method})")  # fmt: skip


def choose_group_size(
    config: GeneratorTrainingConfig,
    num_classes: int,
    num_processes: int,
    previous: dict | None,
    measure: Callable[[], MemoryReading | None],
    agree: Callable[[int], int] | None = None,
) -> GroupSizing:
    """The group size of a run (the same in every process).

    Args:
        num_classes: classes of the run; the busiest process trains `ceil(num_classes / num_processes)` of them.
        previous: the `cls_grouping` recorded by the run being resumed (None for a new run): its size is reused.
        measure: `() -> MemoryReading` of this process (`probe_group_memory`; None if it trains no class), called
            only to size an 'auto' run, in every process.
        agree: this process's size -> the run's (the smallest over the processes); None: a single process.
    """
    busiest = math.ceil(num_classes / num_processes)
    if config.classes_per_group is not None:
        size, reason = config.classes_per_group, "forced by --classes_per_group"
    elif config.cls_strategy == "grouped":
        size, reason = busiest, "'grouped' without --classes_per_group: all of a process's classes"
    elif busiest <= 1:
        size, reason = 1, "each process trains one class"
    elif previous and previous.get("classes_per_group") and previous.get("num_processes") == num_processes:
        size, reason = previous["classes_per_group"], "the size the resumed run recorded (the same groups)"
    else:
        reading = measure()
        if reading is None:
            size, reason = busiest, "this process trains no class"
        else:
            size, reason = fitting_group_size(reading, config.memory_safety_margin)
        reason = f"auto, {reason}"
        agreed = size if agree is None else agree(size)
        if agreed != size:
            reason += f"; {agreed} is the smallest size of the {num_processes} processes"
        size = agreed
    if size > busiest:
        reason += f"; capped at the {busiest} classes of the busiest process"
    return GroupSizing(min(size, busiest), reason)


class _SavedTensorBytes:
    """Counts the bytes of the tensors autograd saves for the backward inside the block, each storage once, leaving
    out `exclude` (storages that existed before, e.g. the frozen weights)."""

    def __init__(self, exclude: set[int]):
        self.seen = set(exclude)
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    raise KeyError(field)


def _release_free_heap() -> None:
    """Returns the C heap's free pages to the system (glibc's `malloc_trim`), so memory a step reuses from earlier
    frees counts in its peak."""
    gc.collect()
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library; glibc only
    if malloc_trim is not None:
        malloc_trim(0)


class PeakResidentBytes:
    """The peak resident memory of this process inside the block above what it held when the block began (`peak`,
    bytes), from the kernel's high-water mark `VmHWM`, reset on entry through /proc/self/clear_refs. `supported()`
    says whether this system has that mark (Linux >= 4.0)."""

    @staticmethod
    def supported() -> bool:
        try:
            _status_bytes("VmHWM")
        except (OSError, KeyError):
            return False
        return os.access("/proc/self/clear_refs", os.W_OK)

    def __enter__(self):
        _release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
        self.before = _status_bytes("VmRSS")
        self.peak = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(0, _status_bytes("VmHWM") - self.before)


def _frozen_storages(models: GeneratorModels) -> set[int]:
    """The storages of the frozen weights: tensors saved for backward that are weights cost no extra memory."""
    return {p.untyped_storage().data_ptr() for m in models.frozen_modules() for p in [*m.parameters(), *m.buffers()]}


def _step_bytes(
    models: GeneratorModels, unit: TrainingUnit, config: GeneratorTrainingConfig, num_groups: int, resident: bool
) -> int:
    """The memory a grouped step of `num_groups` copies of `unit` adds to what is allocated (see the module doc);
    `resident`: read it as the peak resident memory (a CPU with `PeakResidentBytes`)."""
    device = models.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with PeakResidentBytes() if resident else contextlib.nullcontext() as peak:
        caches = [build_latent_cache(models, unit, config) for _ in range(num_groups)]
        latent_shape = models.latent_shape(config.resolution)
        num_timesteps = models.noise_scheduler.config.num_train_timesteps
        batches = [make_step_batch(unit, 0, config.train_batch_size, config.resolution, latent_shape, num_timesteps,
                                   cache) for cache in caches]  # fmt: skip
        grouped = GroupedLora(models, num_groups)
        lora_bytes = sum(p.numel() * p.element_size() for p in grouped.parameters().values())
        counting = contextlib.nullcontext() if cuda or resident else _SavedTensorBytes(_frozen_storages(models))
        with grouped.attached(), counting as saved:
            losses = grouped_losses(models, grouped, batches, config)
            if cuda or resident:
                losses.sum().backward()
    if cuda:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before + 2 * lora_bytes  # + AdamW's moments
    if resident:
        return peak.peak + 2 * lora_bytes  # + AdamW's moments (the stacks and their gradients are in the peak)
    cached = sum(t.numel() * t.element_size() for cache in caches if cache is not None
                 for mean, std in cache.posteriors.values() for t in (mean, std))  # fmt: skip
    return saved.total + 4 * lora_bytes + cached  # + the stacks, their gradients and AdamW's moments


def _available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): free GPU memory plus torch's cache on CUDA, else this process's share of the RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device}"
    import psutil

    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes of this machine, set by torchrun/accelerate
    share = "" if sharing == 1 else f" / {sharing} processes"
    return psutil.virtual_memory().available // sharing, f"of available RAM{share}"


def probe_group_memory(models: GeneratorModels, unit: TrainingUnit, config: GeneratorTrainingConfig) -> MemoryReading:
    """Measures a one-class and a two-class grouped step of `unit` (its step 0, which changes no weight and no random
    state) and reads the available memory."""
    cuda = models.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    available, source = _available_bytes(models.device)
    resident = not cuda and PeakResidentBytes.supported()
    if cuda:
        method = "allocator peak of a probe step"
    elif resident:
        method = "peak resident memory of a probe step"
    else:
        method = "bytes a probe step saves for backward"
    try:
        if resident:
            # Unmeasured: the first backward's one-off allocations (autograd's threads, the kernels' buffers) are no
            # class's memory, and would make the first class look dearer than the second.
            _step_bytes(models, unit, config, 1, resident)
        one = _step_bytes(models, unit, config, 1, resident)
    except torch.OutOfMemoryError as error:
        raise one_class_does_not_fit([unit], config, error) from error
    budget = (1 - config.memory_safety_margin) * available
    if not cuda and 2 * one > budget:
        # Out of RAM a CPU step raises nothing: the system kills the process. A group of two would not be chosen.
        no_two = f"two one-class steps ({_size(2 * one)}) exceed it, so no two-class step was tried"
        return MemoryReading(one, None, available, source, method, no_two)
    try:
        two = _step_bytes(models, unit, config, 2, resident)
    except torch.OutOfMemoryError:
        two = None
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return MemoryReading(one, two, available, source, method)
