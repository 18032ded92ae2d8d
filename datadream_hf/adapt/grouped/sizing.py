"""How many classes grouped cls training puts in a group: forced (`--classes_per_group`), reused from the run being
resumed, or (`--cls_strategy auto`) sized to the memory free on the device.

The memory of a grouped step grows linearly with the group (one super-batch, one LoRA stack slice per class), so the
probe measures a one-class and a two-class step (the first class costs `one`, each further class `two - one`) and the
size is the largest group whose estimate stays within `1 - memory_safety_margin` of the available memory. On CUDA the
probe reads the allocator's peak (`torch.cuda.max_memory_allocated`) over a forward and backward pass, against the
free device memory (`torch.cuda.mem_get_info`, plus what torch's cache holds); elsewhere it counts the bytes the
forward pass saves for the backward (`torch.autograd.graph.saved_tensors_hooks`, a device-agnostic estimate of the
activation memory) against the available RAM, shared by the processes of the machine. AdamW's two moments per LoRA
weight, which the probe does not allocate, are added to each class.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import GeneratorTrainingConfig
from ..data import TrainingUnit, make_step_batch
from ..modeling import GeneratorModels, build_latent_cache
from .loop import grouped_losses, one_class_does_not_fit
from .lora import GroupedLora


@dataclass
class MemoryReading:
    """What the probe measured, in bytes: the memory a one-class and a two-class step add to what is allocated
    (`two` None: the two-class step ran out of memory) and the memory available to the groups; `source` names that
    memory and `method` how the steps were measured."""

    one: int
    two: int | None
    available: int
    source: str
    method: str = "measured"


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
        return 1, f"{head}; a two-class step ran out of memory"
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


def _step_bytes(models: GeneratorModels, unit: TrainingUnit, config: GeneratorTrainingConfig, num_groups: int) -> int:
    """The memory a grouped step of `num_groups` copies of `unit` adds to what is allocated (see the module doc)."""
    device = models.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    weights = {p.untyped_storage().data_ptr() for m in models.frozen_modules()
               for p in [*m.parameters(), *m.buffers()]}  # fmt: skip
    caches = [build_latent_cache(models, unit, config) for _ in range(num_groups)]
    latent_shape = models.latent_shape(config.resolution)
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    batches = [make_step_batch(unit, 0, config.train_batch_size, config.resolution, latent_shape, num_timesteps, cache)
               for cache in caches]  # fmt: skip
    grouped = GroupedLora(models, num_groups)
    stacks = list(grouped.parameters().values())
    lora_bytes = sum(p.numel() * p.element_size() for p in stacks)
    with grouped.attached(), _SavedTensorBytes(weights) as saved:
        losses = grouped_losses(models, grouped, batches, config)
        if cuda:
            losses.sum().backward()
    if cuda:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before + 2 * lora_bytes  # + AdamW's moments
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
    try:
        one = _step_bytes(models, unit, config, 1)
    except torch.OutOfMemoryError as error:
        raise one_class_does_not_fit([unit], config, error) from error
    try:
        two = _step_bytes(models, unit, config, 2)
    except torch.OutOfMemoryError:
        two = None
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    method = "allocator peak of a probe step" if cuda else "bytes a probe step saves for backward"
    return MemoryReading(one, two, available, source, method)
