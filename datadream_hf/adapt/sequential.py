"""The sequential stage-1 loop: one adapter trained from its seeded init (or its latest checkpoint), step by step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..faults import fault_point
from ..lora import LORA_WEIGHT_NAME
from ..validation import check_finite_loss
from .checkpoints import (
    checkpoint_meta,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_log_history,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .config import GeneratorTrainingConfig
from .data import StepBatch, TrainingUnit, make_step_batch, unit_steps
from .modeling import (
    GeneratorModels,
    UnitOptimizer,
    build_latent_cache,
    build_unit_optimizer,
    diffusion_loss,
    init_lora_weights_,
    save_adapter_atomic,
)
from .outputs import write_training_log

logger = logging.getLogger(__name__)

StepCallback = Callable[[TrainingUnit, int], None]


def progress_bar(accelerator, total: int, initial: int, name: str):
    """An adapter's (or group's) step bar, on the local main process and a terminal only (tqdm's `disable=None`); a
    piped log gets one line per adapter (`train_unit`), the losses go to `training_log.json` and the trackers."""
    from tqdm.auto import tqdm

    disable = None if accelerator.is_local_main_process else True
    return tqdm(total=total, initial=initial, desc=f"adapter {name}", disable=disable)


def training_step(
    models: GeneratorModels,
    state: UnitOptimizer,
    batch: StepBatch,
    config: GeneratorTrainingConfig,
    shard: tuple[int, int] = (0, 1),
) -> float:
    """One optimization step of one adapter on `batch`; returns the batch's mean loss.

    With `shard = (rank, world)`, this process computes only its slice of the batch and gradients are summed across
    processes, which gives the 1-process step (data parallelism of dset mode).
    """
    rank, world = shard
    start, stop = rank * len(batch) // world, (rank + 1) * len(batch) // world
    params = list(state.parameters.values())
    loss_sum = torch.zeros((), device=models.device)
    if stop > start:
        # 1. Sum of per-sample losses / full batch size = the batch mean, however the batch is split.
        loss_sum = diffusion_loss(models, batch.slice(start, stop), config.weight_dtype).sum()
        state.grad_scaler.scale(loss_sum / len(batch)).backward()
        loss_sum = loss_sum.detach()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        # 2. Sum the slices' gradients (and losses) over processes, in one flat buffer.
        flat = torch.cat([p.grad.flatten() for p in params] + [loss_sum.reshape(1)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        loss_sum = flat[-1]
    fault_point("generator-step")  # test hook (datadream_hf.faults): a kill here loses only this step
    # 3. Clip, step, schedule.
    state.grad_scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    state.grad_scaler.step(state.optimizer)
    state.grad_scaler.update()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / len(batch)


def train_unit(
    models: GeneratorModels,
    unit: TrainingUnit,
    config: GeneratorTrainingConfig,
    accelerator,
    shard: tuple[int, int] = (0, 1),
    step_callback: StepCallback | None = None,
) -> Path:
    """Trains one adapter from its seeded init (or its latest checkpoint) and writes it atomically; returns its file.

    `step_callback(unit, steps_done)` runs after every step (and its checkpoint), e.g. to log or to stop.
    """
    folder = Path(config.output_dir) / unit.folder
    writes = shard[0] == 0  # in data-parallel dset mode only rank 0 writes
    num_steps = unit_steps(unit, config)
    init_lora_weights_(models, config.lora_init, unit.seed)
    state = build_unit_optimizer(models.trainable_parameters(), config, num_steps, models.device.type)
    meta = checkpoint_meta(unit, config, num_steps)
    first_step, log_history = 0, []
    if config.resume_from_checkpoint is not None:
        checkpoint = (
            latest_checkpoint(folder)
            if config.resume_from_checkpoint == "latest"
            else Path(config.resume_from_checkpoint)
        )
        if checkpoint is None:
            logger.info("No checkpoint for %r in %s: training it from the start.", unit.name, folder)
        else:
            first_step = load_checkpoint(checkpoint, state.parameters, state.optimizer, state.lr_scheduler,
                                         state.grad_scaler, meta)  # fmt: skip
            log_history = read_log_history(checkpoint)
            logger.info("Resuming %r from %s (step %d of %d).", unit.name, checkpoint, first_step, num_steps)
    if writes:
        remove_partial_checkpoints(folder)
    latent_shape = models.latent_shape(config.resolution)
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    cache = build_latent_cache(models, unit, config) if first_step < num_steps else None
    prefix = "" if config.mode == "dset" else f"{unit.folder}/"
    progress = progress_bar(accelerator, num_steps, first_step, unit.name)
    for step in range(first_step, num_steps):
        batch = make_step_batch(unit, step, config.train_batch_size, config.resolution, latent_shape, num_timesteps,
                                cache)  # fmt: skip
        loss = training_step(models, state, batch, config, shard)
        done = step + 1
        check_finite_loss(loss, f"adapter {unit.name!r}", done)  # before this step's weights reach any file
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        log_history.append({"step": done, "loss": loss, "lr": state.lr_scheduler.get_last_lr()[0]})
        accelerator.log({f"{prefix}loss": loss, f"{prefix}lr": log_history[-1]["lr"]}, step=done)
        if writes and done % config.checkpointing_steps == 0 and done < num_steps:
            save_checkpoint(folder, done, state.parameters, state.optimizer, state.lr_scheduler, state.grad_scaler,
                            meta, log_history)  # fmt: skip
            prune_checkpoints(folder, config.checkpoints_total_limit)
        if step_callback is not None:
            step_callback(unit, done)
    progress.close()
    adapter = folder / LORA_WEIGHT_NAME
    if writes:
        write_training_log(folder, log_history)  # before the adapter, which marks the unit done
        save_adapter_atomic(models, folder)
        last_loss = f", last loss {log_history[-1]['loss']:.4f}" if log_history else ""
        logger.info("Adapter %r trained: %d steps%s -> %s", unit.name, num_steps, last_loss, adapter)
    return adapter
