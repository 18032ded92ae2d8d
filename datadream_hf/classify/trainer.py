"""Stage-3 training: `MixedRealSyntheticTrainer`, a `Trainer` whose every batch holds a fixed number of real and
synthetic images and whose loss is lambda * CE(real) + (1 - lambda) * CE(synthetic)."""

from __future__ import annotations

import logging
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, get_scheduler
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType, seed_worker

from ..console import on_terminal
from ..faults import fault_point
from ..files import staged_files
from ..guardrails import warn_long_warmup
from ..validation import check_finite_loss
from .augment import mix_batch
from .checkpoints import (
    TRAINER_STATE_NAME,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    remove_incomplete_checkpoints,
)
from .config import REFERENCE_SCHEDULE, REFERENCE_SCHEDULE_KWARGS, DataDreamTrainingArguments
from .data import (
    ImageClassificationDataset,
    RealSyntheticBatchSampler,
    TransformedRows,
    collate_image_batch,
    find_batch_sampler,
)
from .schedule import reference_lr_schedule

logger = logging.getLogger(__name__)


def real_synthetic_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_real: torch.Tensor,
    real_loss_weight: float,
    partner_labels: torch.Tensor | None = None,
    mix_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda * mean CE(real samples) + (1 - lambda) * mean CE(synthetic samples); one side alone when the batch has
    only one. With MixUp/CutMix targets, each sample's CE is `w * CE(labels) + (1 - w) * CE(partner_labels)`.

    Returns the loss and the per-side means (`real_loss`, `synthetic_loss`, detached) present in the batch.
    """
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    if partner_labels is not None:
        partner = F.cross_entropy(logits.float(), partner_labels, reduction="none")
        per_sample = mix_weight * per_sample + (1.0 - mix_weight) * partner
    is_real = is_real.bool()
    real, synthetic = per_sample[is_real], per_sample[~is_real]
    if len(real) and len(synthetic):
        loss = real_loss_weight * real.mean() + (1.0 - real_loss_weight) * synthetic.mean()
    else:
        loss = per_sample.mean()
    parts = {}
    if len(real):
        parts["real_loss"] = real.mean().detach()
    if len(synthetic):
        parts["synthetic_loss"] = synthetic.mean().detach()
    return loss, parts


def accuracy_compute_metrics(num_classes: int):
    """A `compute_metrics` for the Trainer: top-1 and balanced accuracy from the package's local `evaluate` metric."""
    from .metrics import load_accuracy_metric

    metric = load_accuracy_metric()

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        result = metric.compute(
            predictions=np.asarray(logits).argmax(-1), references=eval_prediction.label_ids, num_classes=num_classes
        )
        return {"accuracy": result["accuracy"], "balanced_accuracy": result["balanced_accuracy"]}

    return compute_metrics


class MetricsLogCallback(TrainerCallback):
    """Logs each evaluation and the run's summary as one line; the per-step training logs stay in `trainer_state.json`
    and the trackers (`report_to`), off the console."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" not in logs:
            logger.info(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))


class BarOnlyProgressCallback(ProgressCallback):
    """The Trainer's progress bars without the log dict it writes under them at every logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def use_quiet_console(trainer: Trainer) -> None:
    """Replaces the Trainer's console output (a printed dict per logging step, a bar redrawn per step even in a piped
    log) by `MetricsLogCallback`, plus the bars alone on a terminal."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(MetricsLogCallback)
    if on_terminal() and not trainer.args.disable_tqdm:
        trainer.add_callback(BarOnlyProgressCallback)


class SamplerEpochCallback(TrainerCallback):
    """Sets the training sampler's epoch at the start of every epoch, from the Trainer's state (`int(state.epoch)`:
    the epochs done, a resumed epoch's fraction dropped), through however many wrappers hold it (`find_batch_sampler`).

    The Trainer's own `set_epoch` reaches one wrapper deep; on a multi-process resume mid-epoch the resumed epoch's
    loader holds the sampler two deep, so it would replay epoch 0's order instead of the uninterrupted run's.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = find_batch_sampler(train_dataloader)
        if sampler is not None:
            sampler.set_epoch(int(state.epoch or 0))


class MixedRealSyntheticTrainer(Trainer):
    """`Trainer` for the stage-3 classifiers (`backbones.ClassifierBackbone`: CLIP, SigLIP, image-classification
    models); overrides the train sampler/loader, `compute_loss`, `log` and the checkpoint I/O (the classifier's own:
    the LoRA adapter only, or the whole model when every weight trains).

    The training set is an `ImageClassificationDataset` (what `train_classifier` builds), or a plain
    `datasets.Dataset` whose items hold `pixel_values` and `label` through a transform (`dataset.with_transform(...)`),
    with an `is_real` column to mark its real rows (without one, every row is real: `train_mode="real"`). Evaluation
    datasets are either kind.

    Gradient accumulation: every micro-batch holds the same numbers of real and synthetic images, so the mean of
    the micro-batch losses equals the loss of the whole accumulated batch. `compute_loss` therefore returns the
    per-micro-batch loss unscaled and lets `training_step` divide it by the accumulation steps
    (`loss_is_scaled_for_ga = False`); `num_items_in_batch` is not needed. Under DDP each rank's batch has the same
    ratio, so DDP's gradient average is the loss over the global batch.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("data_collator", collate_image_batch)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DataDreamTrainingArguments):
            raise TypeError(f"`args` must be DataDreamTrainingArguments, got {type(self.args).__name__}.")
        if isinstance(self.train_dataset, Dataset):
            self.train_dataset = TransformedRows(self.train_dataset)
        self._partial_losses: dict[str, list[torch.Tensor]] = {}
        self._mix_rng = np.random.default_rng([self.args.seed, self.args.process_index, 1])
        self.add_callback(SamplerEpochCallback)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, except that resuming never takes a checkpoint a killed run left half written.

        Args:
            resume_from_checkpoint: `"latest"` (or `True`) resumes from the newest complete checkpoint in `output_dir`
                and starts from scratch when there is none (the main process deletes incomplete ones first); a path
                must be a complete checkpoint.
        """
        if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
            if self.args.should_save:
                for path in remove_incomplete_checkpoints(self.args.output_dir):
                    logger.info(f"Removed {path}: a run was killed while writing it.")
            latest = latest_complete_checkpoint(self.args.output_dir)
            if latest is None:
                logger.info(f"No complete checkpoint in {self.args.output_dir}: training from the start.")
            resume_from_checkpoint = str(latest) if latest is not None else None
        elif resume_from_checkpoint and not is_complete_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"`resume_from_checkpoint` {str(resume_from_checkpoint)!r} is not a complete checkpoint (no valid "
                f"{TRAINER_STATE_NAME}: a run was killed while writing it, or it is no Trainer checkpoint). Pass "
                "'latest' to resume from the newest complete one."
            )
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    # ---- data ----

    def _get_train_sampler(self, train_dataset=None) -> RealSyntheticBatchSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not isinstance(dataset, (ImageClassificationDataset, TransformedRows)):
            raise TypeError(
                "train_dataset must be an ImageClassificationDataset or a datasets.Dataset (items with `pixel_values` "
                f"and `label`), got {type(dataset).__name__}."
            )
        real, synthetic = self.args.samples_per_batch()
        return RealSyntheticBatchSampler(
            num_real=dataset.num_real,
            num_synthetic=dataset.num_synthetic,
            real_per_batch=real,
            synthetic_per_batch=synthetic,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        sampler = self._get_train_sampler()
        params = {
            "batch_sampler": sampler,
            "collate_fn": self.data_collator,
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory and self.args.device.type != "cpu",
            "persistent_workers": self.args.dataloader_persistent_workers,
            "worker_init_fn": partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        }
        if self.args.dataloader_num_workers > 0:
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor
        dataloader = self.accelerator.prepare(DataLoader(self.train_dataset, **params))
        # The sampler already gives each rank its own batches; accelerate's BatchSamplerShard would split them
        # again and drop 1 - 1/world_size of them, so make it a pass-through (as Trainer does for its own
        # rank-aware BatchRebalanceSampler).
        shard = getattr(dataloader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return dataloader

    # ---- learning-rate schedule ----

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The reference's schedule for `lr_scheduler_type` 'cosine_with_min_lr' (the default), else the Trainer's;
        the warm-up lasts `warmup_steps` if > 0, else `warmup_epochs` epochs of this run's sampler."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer if optimizer is not None else self.optimizer
        if self.args.warmup_steps > 0:
            warmup = self.args.get_warmup_steps(num_training_steps)
        else:
            batches = len(self._get_train_sampler())
            steps_per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
            warmup = round(self.args.warmup_epochs * steps_per_epoch)
        if self.args.should_log:  # once per run: a warm-up as long as the run never reaches the learning rate
            flag = "--warmup_steps" if self.args.warmup_steps > 0 else "--warmup_epochs"
            warn_long_warmup(warmup, num_training_steps, flag, self.args.learning_rate)
        warmup = min(warmup, num_training_steps)
        kwargs = dict(self.args.lr_scheduler_kwargs or {})
        if SchedulerType(self.args.lr_scheduler_type) == SchedulerType(REFERENCE_SCHEDULE):
            min_lr = kwargs["min_lr"] if "min_lr" in kwargs else self.args.learning_rate * kwargs.get("min_lr_rate", 0)
            self.lr_scheduler = reference_lr_schedule(optimizer, num_training_steps, warmup, float(min_lr))
        else:
            if kwargs == REFERENCE_SCHEDULE_KWARGS:  # the default schedule's floor, not an argument of the others
                kwargs = {}
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=optimizer,
                num_warmup_steps=warmup,
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=kwargs,
            )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- loss and logging ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, is_real = inputs["labels"], inputs.get("is_real")
        pixel_values = inputs["pixel_values"]
        if is_real is None:
            is_real = torch.ones_like(labels, dtype=torch.bool)
        if not model.training:
            outputs = model(pixel_values=pixel_values, labels=labels)  # evaluation: plain CE over the batch
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        partner_labels = mix_weight = None
        if self.args.mix_augmentation != "none":
            rng = self._mix_rng_for(inputs)
            if rng.random() < self.args.mix_probability:
                pixel_values, partner_labels, mix_weight = mix_batch(
                    pixel_values, labels, is_real, self.args.mix_augmentation, rng, self.args.mix_alpha
                )
        outputs = model(pixel_values=pixel_values)
        loss, parts = real_synthetic_loss(
            outputs.logits, labels, is_real, self.args.real_loss_weight, partner_labels, mix_weight
        )
        # Stop before a NaN step reaches the weights (the Trainer would log around it: `logging_nan_inf_filter`).
        check_finite_loss(loss.item(), "the classifier", self.state.global_step + 1)
        fault_point("trainer-step")  # test hook (datadream_hf.faults): a kill here loses only this step
        for name, value in parts.items():
            self._partial_losses.setdefault(name, []).append(value)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def _mix_rng_for(self, inputs: dict) -> np.random.Generator:
        """The MixUp/CutMix draws of this batch: seeded by its first sample's augmentation seed (the sampler's, so a
        resumed run mixes as the uninterrupted one), else the trainer's own stream (batches from another sampler)."""
        seeds = inputs.get("augmentation_seeds")
        if seeds is None:
            return self._mix_rng
        return np.random.default_rng([self.args.seed, 1, int(seeds[0])])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (the ones with "loss") get the real and synthetic CE averaged since the last log, over
        # micro-batches and ranks. Every rank reaches this call for training logs, so the reduce cannot hang.
        if "loss" in logs and self._partial_losses:
            for name in sorted(self._partial_losses):
                mean = torch.stack(self._partial_losses[name]).mean().to(self.args.device)
                logs[name] = round(self.accelerator.reduce(mean, reduction="mean").item(), 4)
            self._partial_losses = {}
        super().log(logs, start_time)

    # ---- checkpoints hold the LoRA adapter only ----

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)  # refuses NaN weights
        fault_point("trainer-save")  # test hook: the adapter is saved, the optimizer and trainer state are not
        if self.processing_class is not None:
            with staged_files(output_dir) as staging:  # each processor file appears whole
                self.processing_class.save_pretrained(staging)

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, except that a failed write (a full disk, weights no longer finite) leaves no
        half-written checkpoint behind: the main process removes it, and the error says how to go on."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as err:
            if self.args.should_save and not is_complete_checkpoint(folder):
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(err, OSError) and err.errno is not None:
                raise OSError(
                    err.errno,
                    f"Could not write checkpoint {str(folder)!r} ({err.strerror}); it was removed and the complete "
                    "checkpoints before it are kept. Free space (or fix the cause) and re-run with "
                    "--resume_from_checkpoint latest.",
                ) from err
            raise

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model if model is not None else self.model).load_trained_weights(
            resume_from_checkpoint
        )

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
