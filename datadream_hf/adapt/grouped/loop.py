"""Stage 1, cls mode, grouped: the adapters of several classes trained together, one forward pass per step.

Step s of a group is the concatenation of every class's own step-s batch (`make_step_batch` with that class's seed, so
the random draws are those of the sequential path), sent through `GroupedLora`, which routes each sample to its class's
factors. The loss is the sum over classes of each class's mean loss, so each class gets exactly its sequential
gradient; clipping is per class, and each class has its own AdamW step count and fp16 loss scale (`grouped.optim`), so
each adapter equals its sequential run up to float rounding, also when fp16 overflows skip steps. Checkpoints are
written per class, in the sequential path's folders and format (plus the group that made them, see `grouped.plan`).
A group that runs out of GPU memory is halved and continues from its last checkpoint.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ...faults import fault_point
from ...lora import LORA_WEIGHT_NAME
from ...run_folder import checkpoint_path
from ...validation import check_finite_loss
from ..checkpoints import (
    checkpoint_meta,
    load_checkpoint,
    prune_checkpoints,
    read_log_history,
    remove_partial_checkpoints,
    save_checkpoint,
)
from ..config import GeneratorTrainingConfig
from ..data import StepBatch, TrainingUnit, make_step_batch, unit_steps
from ..modeling import (
    GeneratorModels,
    UnitOptimizer,
    build_latent_cache,
    build_unit_optimizer,
    diffusion_loss,
    init_lora_weights_,
    save_adapter_atomic,
)
from ..outputs import write_training_log
from ..sequential import StepCallback, progress_bar
from ..validation import log_validation
from .lora import GroupedLora, clip_grad_norm_per_group_
from .optim import GroupedGradScaler
from .plan import GroupStart, group_units, resume_plan

logger = logging.getLogger(__name__)


def grouped_losses(
    models: GeneratorModels, grouped: GroupedLora, batches: list[StepBatch], config: GeneratorTrainingConfig
) -> torch.Tensor:
    """The forward pass of a grouped step: each group's mean loss on its own batch, (G,)."""
    sizes = [len(batch) for batch in batches]
    batch = StepBatch.concat(batches)
    groups = torch.repeat_interleave(torch.arange(len(batches)), torch.tensor(sizes))  # (B,): each sample's group
    # 1. The prompts, each distinct (group, prompt) once (as `encode_prompts`), through the group's text LoRA.
    keyed = torch.cat([groups[:, None], batch.input_ids], dim=1)  # (B, 1 + T)
    unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)  # (U, 1 + T), (B,)
    grouped.route(unique[:, 0], components=tuple(models.text_encoders))
    with torch.set_grad_enabled(models.train_text_encoder):
        embeddings = models.family.encode_prompts(models, unique[:, 1:])  # (U, T, D), (U, P)
    # 2. One super-batch through the denoiser, each sample routed to its group's LoRA factors.
    grouped.route(groups, components=(models.family.denoiser_name,))
    per_sample = diffusion_loss(models, batch, config.weight_dtype, embeddings.select(inverse.to(models.device)))
    # 3. Each group's mean loss: the gradient of their sum is, for group g, its sequential step's gradient.
    return torch.stack([part.sum() / len(part) for part in per_sample.split(sizes)])  # (G,)


def grouped_training_step(
    models: GeneratorModels,
    grouped: GroupedLora,
    state: UnitOptimizer,
    batches: list[StepBatch],
    config: GeneratorTrainingConfig,
) -> list[float]:
    """One optimization step of every group on its own batch; returns each group's mean loss."""
    means = grouped_losses(models, grouped, batches, config)
    state.grad_scaler.scale(means).sum().backward()  # fp16: each group's loss times its own loss scale
    stacks = list(state.parameters.values())
    for p in stacks:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    fault_point("generator-step")  # test hook (datadream_hf.faults), as in the sequential training_step
    # Unscale and clip each group alone, step the groups without inf/NaN (each with its own AdamW step count, as in
    # its own run), update each group's loss scale, schedule.
    found_inf = state.grad_scaler.unscale_(stacks)  # (G,)
    clip_grad_norm_per_group_(stacks, config.max_grad_norm)
    state.optimizer.step(active=~found_inf)
    state.grad_scaler.update(found_inf)
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return means.detach().tolist()


class _GroupOptimizerView:
    """Group g's slice of the grouped AdamW state, offering the `state_dict`/`load_state_dict` checkpoints use.

    Sliced, the state of the stacks is exactly a sequential class optimizer's state (same parameter order and
    hyper-parameters), so group checkpoints are ordinary per-class checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group: int):
        self.optimizer = optimizer
        self.group = group
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        full = self.optimizer.state_dict()
        state = {
            index: {k: v[self.group].clone() if torch.is_tensor(v) and v.dim() > 0 else v for k, v in entry.items()}
            for index, entry in full["state"].items()
        }  # (G, ...) -> (...): moments and the step count
        return {"state": state, "param_groups": full["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded = state_dict  # assembled with the other groups' by `_stack_optimizer_states`


class _GroupScalerView:
    """Group g's loss scaler state, in `torch.amp.GradScaler`'s format, for the per-class checkpoints."""

    def __init__(self, scaler: GroupedGradScaler, group: int):
        self.scaler, self.group = scaler, group

    def is_enabled(self) -> bool:
        return self.scaler.is_enabled()

    def state_dict(self) -> dict:
        return self.scaler.group_state_dict(self.group)

    def load_state_dict(self, state_dict: dict) -> None:
        self.scaler.load_group_state_dict(self.group, state_dict)


def _stack_optimizer_states(states: list[dict]) -> dict:
    first = states[0]
    stacked = {}
    for index, entry in first["state"].items():
        stacked[index] = {
            k: torch.stack([s["state"][index][k] for s in states]) if torch.is_tensor(v) else v
            for k, v in entry.items()
        }  # (...) per group -> (G, ...)
    return {"state": stacked, "param_groups": first["param_groups"]}


def _load_checkpoints(
    grouped: GroupedLora,
    state: UnitOptimizer,
    folders: list[Path],
    metas: list[dict],
    histories: list[list[dict]],
    step: int,
) -> None:
    """Loads every class's `checkpoint-<step>` into its group's slices, and its log history into `histories`."""
    loaded = []
    for group, folder in enumerate(folders):
        view = _GroupOptimizerView(state.optimizer, group)
        checkpoint = checkpoint_path(folder, step)
        load_checkpoint(checkpoint, grouped.group_parameters(group), view, state.lr_scheduler,
                        _GroupScalerView(state.grad_scaler, group), metas[group])  # fmt: skip
        histories[group][:] = read_log_history(checkpoint)
        loaded.append(view.loaded)
    state.optimizer.load_state_dict(_stack_optimizer_states(loaded))


def _save_checkpoints(grouped, state, folders, metas, histories, step: int, total_limit: int | None) -> None:
    trained_with = [folder.name for folder in folders]
    for group, folder in enumerate(folders):
        weights = {name: view.detach().clone() for name, view in grouped.group_parameters(group).items()}
        save_checkpoint(folder, step, weights, _GroupOptimizerView(state.optimizer, group), state.lr_scheduler,
                        _GroupScalerView(state.grad_scaler, group), metas[group], histories[group],
                        trained_with)  # fmt: skip
    # Pruned only once every class has the new checkpoint, so a common step always survives a kill.
    for folder in folders:
        prune_checkpoints(folder, total_limit)


def train_group(
    models: GeneratorModels,
    units: list[TrainingUnit],
    config: GeneratorTrainingConfig,
    accelerator,
    class_names: list[str] | None = None,
    step_callback: StepCallback | None = None,
    start_step: int = 0,
) -> list[Path]:
    """Trains the adapters of `units` together from their seeded inits (or, with `start_step`, from each class's
    `checkpoint-<start_step>`) and writes each one that is not written yet.

    Returns the adapter files. `step_callback(unit, steps_done)` runs for every unit after every step; validation
    images are made per class when `class_names` is given and `config.num_validation_images > 0`.
    """
    folders = [Path(config.output_dir) / unit.folder for unit in units]
    steps = {unit_steps(unit, config) for unit in units}
    if len(steps) != 1:
        raise ValueError(f"A group's classes must train for the same number of steps, got {sorted(steps)}.")
    num_steps = steps.pop()
    # 1. Each group starts from its class's sequential init; one GroupedAdamW (a step count per class) and lr schedule.
    grouped = GroupedLora(models, len(units))
    grouped.init_groups_(lambda g: init_lora_weights_(models, config.lora_init, units[g].seed))
    state = build_unit_optimizer(grouped.parameters(), config, num_steps, models.device.type, len(units))
    metas = [checkpoint_meta(unit, config, num_steps) for unit in units]
    histories: list[list[dict]] = [[] for _ in units]  # each class's {"step", "loss", "lr"} entries
    first_step = start_step
    if first_step:
        _load_checkpoints(grouped, state, folders, metas, histories, first_step)
        logger.info("Resuming group %s from checkpoint-%d (of %d steps).", [u.name for u in units], first_step,
                    num_steps)  # fmt: skip
    for folder in folders:
        remove_partial_checkpoints(folder)

    # 2. Train: every step draws each class's own batch and steps all classes at once.
    latent_shape = models.latent_shape(config.resolution)
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    caches = [build_latent_cache(models, unit, config) if first_step < num_steps else None for unit in units]
    progress = progress_bar(accelerator, num_steps, first_step, f"group {units[0].name}..{units[-1].name}")
    with grouped.attached():
        for step in range(first_step, num_steps):
            batches = [
                make_step_batch(unit, step, config.train_batch_size, config.resolution, latent_shape, num_timesteps, c)
                for unit, c in zip(units, caches)
            ]
            losses = grouped_training_step(models, grouped, state, batches, config)
            done = step + 1
            for unit, loss in zip(units, losses):
                check_finite_loss(loss, f"adapter {unit.name!r}", done)  # before this step's weights reach any file
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            lr = state.lr_scheduler.get_last_lr()[0]
            for history, loss in zip(histories, losses):
                history.append({"step": done, "loss": loss, "lr": lr})
            logs = {f"{unit.folder}/{key}": value for unit, loss in zip(units, losses)
                    for key, value in (("loss", loss), ("lr", lr))}  # fmt: skip
            accelerator.log(logs, step=done)
            if done % config.checkpointing_steps == 0 and done < num_steps:
                _save_checkpoints(grouped, state, folders, metas, histories, done, config.checkpoints_total_limit)
            if step_callback is not None:
                for unit in units:
                    step_callback(unit, done)
    progress.close()
    del caches

    # 3. Export each class through the peft layers: the same files and keys as the sequential path writes.
    adapters = []
    trained_with = [unit.folder for unit in units]
    for group, (unit, folder) in enumerate(zip(units, folders)):
        adapter = folder / LORA_WEIGHT_NAME
        adapters.append(adapter)
        if adapter.is_file():
            continue  # exported by the run that was killed while exporting the group (`grouped.plan`)
        grouped.copy_to_peft(group)
        write_training_log(folder, histories[group], trained_with)  # before the adapter, which marks the class done
        save_adapter_atomic(models, folder)
        if class_names is not None and config.num_validation_images > 0:
            log_validation(models, unit, config, class_names, accelerator)
    return adapters


def one_class_does_not_fit(units: list[TrainingUnit], config: GeneratorTrainingConfig, error: Exception):
    """The error of a step that runs out of memory with one class alone: nothing left to halve."""
    return torch.OutOfMemoryError(
        f"One class's training step does not fit in memory ({[u.name for u in units]}, batch "
        f"{config.train_batch_size}, {config.resolution} px): lower --train_batch_size or --resolution, or use "
        f"--mixed_precision bf16 or --gradient_checkpointing. {error}"
    )


def train_groups(
    models: GeneratorModels,
    units: list[TrainingUnit],
    config: GeneratorTrainingConfig,
    accelerator,
    class_names: list[str] | None = None,
    step_callback: StepCallback | None = None,
    classes_per_group: int | None = None,
    on_halved: Callable[[int, list[TrainingUnit]], None] | None = None,
) -> int | None:
    """Trains this process's classes group by group (`grouped.plan`), `classes_per_group` per group (default:
    `config.classes_per_group`; None: all); on resume, finished groups are skipped and the others continue from their
    checkpoints.

    A group that runs out of memory (`torch.OutOfMemoryError`) is halved: the classes continue from their last
    checkpoints in groups of half its size, and so do the groups after it; `on_halved(new_size, group)` is told.
    Returns the group size the run ended with.
    """
    size = config.classes_per_group if classes_per_group is None else classes_per_group
    resume, output_dir = config.resume_from_checkpoint is not None, Path(config.output_dir)
    while True:
        running: list[TrainingUnit] = []
        try:
            for group in group_units(units, config, size):
                plan = resume_plan(group, output_dir) if resume else [GroupStart(group, 0)]
                if not plan:
                    logger.info("Adapters %s are already trained: skipping them.", [unit.name for unit in group])
                for start in plan:
                    running = start.units
                    logger.info("Training adapters %s together (grouped LoRA).", [unit.name for unit in running])
                    train_group(models, running, config, accelerator, class_names, step_callback, start.step)
            return size
        except torch.OutOfMemoryError as error:
            if len(running) <= 1:
                raise one_class_does_not_fit(running, config, error) from error
        # Out of memory: free what the group held (the exception's frames are gone by now), then halve the groups
        # and continue from the checkpoints, which every class of the failed group has at a common step.
        gc.collect()
        if models.device.type == "cuda":
            torch.cuda.empty_cache()
        size = (len(running) + 1) // 2
        logger.warning(
            "Group %s ran out of memory: continuing from its last checkpoint with %d classes per group.",
            [unit.name for unit in running], size,
        )  # fmt: skip
        if on_halved is not None:
            on_halved(size, running)
        resume = True
