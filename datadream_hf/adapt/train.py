"""Stage 1 of DataDream, whole: `train_generator` trains every adapter of a run (dset, cls or image mode, see
`adapt.modes`; split across processes, grouped or sequential) into a finished output folder; it resumes a killed run
and refuses another's folder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..guardrails import fp16_on_cpu, fp16_on_cpu_message, native_resolution, warn_far_resolution, warn_long_warmup
from ..lora import LORA_WEIGHT_NAME
from ..run_folder import output_dir_lock
from .checkpoints import CheckpointError
from .config import GeneratorTrainingConfig
from .data import FewShotData, TrainingUnit, build_units
from .grouped.loop import train_groups
from .grouped.plan import run_groups
from .grouped.sizing import choose_group_size, probe_group_memory
from .modeling import GeneratorModels, load_generator_models
from .modes import get_mode
from .outputs import (
    CLS_GROUPING_KEY,
    check_output_dir,
    missing_adapters,
    read_cls_grouping,
    record_cls_grouping,
    run_record,
    write_outputs,
    write_run_record,
)
from .sequential import StepCallback, train_unit
from .validation import log_validation, replay_to_trackers

logger = logging.getLogger(__name__)


def train_generator(
    config: GeneratorTrainingConfig,
    data: FewShotData,
    accelerator,
    models: GeneratorModels | None = None,
    step_callback: StepCallback | None = None,
) -> Path:
    """Runs stage 1 into `config.output_dir` (dset, cls or image mode) and writes the index, run config and card.

    Args:
        data: the few-shot images (`data.load_few_shot_data`).
        accelerator: an `accelerate.Accelerator`; in cls and image modes each process trains its own adapters
            (classes, images), in dset mode the processes split each batch.
        models: already loaded models (`load_generator_models(config)`) to reuse; loaded here when None.
        step_callback: called as `step_callback(unit, steps_done)` after every step.

    The main process holds the folder's lock (`run_folder.OutputDirLock`) for the whole run, so a second run into the
    same `output_dir` is refused instead of mixing its files with this one's.
    """
    if config.mixed_precision is None:  # the Accelerator's (the script's default: `accelerate launch` decides)
        config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision)
    config.prompt_template().check_distinct(data.class_names)  # classes whose prompts are one cannot be told apart
    # Refuse another run's folder before taking the lock, which creates the folder.
    resume = config.resume_from_checkpoint is not None
    record = run_record(config, data)
    check_output_dir(Path(config.output_dir), record, resume)
    if accelerator.is_main_process:  # unwise settings, said once (the script refuses fp16 on a CPU outright)
        if fp16_on_cpu(config.mixed_precision, accelerator.device):
            logger.warning(
                fp16_on_cpu_message("`mixed_precision`", "Use 'no' or 'bf16' unless fp16 itself is tested.")
            )
        steps = record["steps_per_adapter"]
        warn_long_warmup(config.lr_warmup_steps, steps, "--lr_warmup_steps", config.learning_rate)
    with output_dir_lock(config.output_dir, accelerator):
        return _train_generator(config, data, accelerator, models, step_callback)


def _train_generator(config, data, accelerator, models, step_callback) -> Path:
    output_dir = Path(config.output_dir)
    # 1. Refuse to mix with another run before anything expensive (checked by every process); a resumed run keeps the
    #    grouping it recorded until it has chosen its own (3).
    record = run_record(config, data)
    resume = config.resume_from_checkpoint is not None
    check_output_dir(output_dir, record, resume)
    previous_grouping = read_cls_grouping(output_dir) if resume else None
    if previous_grouping:
        record = {**record, CLS_GROUPING_KEY: previous_grouping}

    # 2. Load the base model once; every adapter of this process is trained on it. The run record is written only
    #    now: a run that failed before (a wrong model path) leaves no record that would refuse the corrected command.
    if models is None:
        models = load_generator_models(config, accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        warn_far_resolution(config.resolution, native_resolution(models.denoiser, models.vae_scale_factor))
        write_run_record(output_dir, record)
    units = build_units(config, data, models.tokenizers, accelerator.process_index, accelerator.num_processes)
    names = [unit.name for unit in units]
    shown = names if len(names) <= 8 else f"{names[:3]} ... {names[-2:]} ({len(names)})"  # image mode: hundreds
    logger.info("Process %d of %d trains adapter(s) %s.", accelerator.process_index, accelerator.num_processes,
                shown)  # fmt: skip
    mode = get_mode(config.mode)
    shard = (0, 1) if mode.splits_adapters else (accelerator.process_index, accelerator.num_processes)

    # 3. Train each adapter; a finished one (its file exists, written atomically) is skipped on resume. Grouped cls and
    #    image modes train several adapters per forward pass (grouped.loop): the same computation up to float rounding.
    if mode.splits_adapters and config.cls_strategy != "sequential":
        _train_grouped(models, units, config, data, accelerator, previous_grouping, step_callback)
    else:
        if mode.splits_adapters and accelerator.is_main_process:
            record_cls_grouping(output_dir, {"strategy": "sequential", "num_processes": accelerator.num_processes})
        for unit in units:
            adapter = output_dir / unit.folder / LORA_WEIGHT_NAME
            if config.resume_from_checkpoint is not None and adapter.is_file():
                logger.info("Adapter %r is already trained (%s): skipping it.", unit.name, adapter)
                continue
            train_unit(models, unit, config, accelerator, shard, step_callback)
            if config.num_validation_images > 0 and shard[0] == 0:
                log_validation(models, unit, config, data.class_names, accelerator)

    # 4. Once every process is done (this barrier waits for the busiest process: `--ddp_timeout` bounds it): the index
    #    (which marks the output complete) and the card; then, with no process waiting on it, the curves of the
    #    classes other processes trained go to the trackers, which live on the main process.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = missing_adapters(output_dir, config.mode, data.class_names, data.manifest.indices)
        if missing:
            raise CheckpointError(f"Adapters missing after training: {missing}; re-run with --resume_from_checkpoint.")
        write_outputs(output_dir, config.mode, data.class_names, data.manifest.indices)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and mode.splits_adapters and config.report_to and accelerator.num_processes > 1:
        specs = mode.units(config.seed, data.class_names, data.labels, data.manifest.indices)
        others = [spec.folder for i, spec in enumerate(specs)
                  if i % accelerator.num_processes != accelerator.process_index]  # fmt: skip
        replay_to_trackers(output_dir, others, accelerator)
    return output_dir


def _train_grouped(
    models: GeneratorModels,
    units: list[TrainingUnit],
    config: GeneratorTrainingConfig,
    data: FewShotData,
    accelerator,
    previous_grouping: dict | None,
    step_callback: StepCallback | None,
) -> None:
    """Grouped cls or image mode: chooses the group size (`grouped.sizing`, agreed by all processes), logs and records
    it, and trains this process's groups; a group halved after running out of memory is recorded too (main process).
    A "class" of the engine is one adapter of the run (a class in cls mode, an image in image mode)."""
    num_processes = accelerator.num_processes
    specs = get_mode(config.mode).units(config.seed, data.class_names, data.labels, data.manifest.indices)
    unit_sizes = [len(spec.positions) for spec in specs]

    def measure():
        return probe_group_memory(models, units[0], config) if units else None

    def agree(size: int) -> int:
        return int(accelerator.gather(torch.tensor([size], device=accelerator.device)).min())

    def record(size: int, reason: str) -> None:
        groups = run_groups(unit_sizes, config, num_processes, size)
        record_cls_grouping(Path(config.output_dir), {
            "strategy": config.cls_strategy, "classes_per_group": size, "reason": reason,
            "num_processes": num_processes, "groups": [[specs[i].name for i in group] for group in groups],
        })  # fmt: skip

    sizing = choose_group_size(config, len(specs), num_processes, previous_grouping, measure, agree)
    what = {"cls": "classes", "image": "images"}.get(config.mode, "adapters")
    logger.info("Grouped %s training: %d %s per group (%s).", config.mode, sizing.classes_per_group, what,
                sizing.reason)  # fmt: skip
    if accelerator.is_main_process:
        record(sizing.classes_per_group, sizing.reason)

    def on_halved(size: int, group: list[TrainingUnit]) -> None:
        reason = f"halved after {[unit.name for unit in group]} ran out of memory; first: {sizing.reason}"
        if accelerator.is_main_process:
            record(size, reason)
        else:
            logger.warning("Process %d: %s (the run record keeps the main process's size).", accelerator.process_index,
                           reason)  # fmt: skip

    train_groups(models, units, config, accelerator, data.class_names, step_callback, sizing.classes_per_group,
                 on_halved)  # fmt: skip
