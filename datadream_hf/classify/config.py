"""Settings of stage 3 (`train_classifier.py`): `ClassifierArguments` (the model, its LoRA, the real and
synthetic data, the prompts) and `DataDreamTrainingArguments` (`TrainingArguments` plus the real/synthetic mixing)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import TrainingArguments

from ..guardrails import refuse_fp16_on_cpu
from ..presets import CLASSIFIER_RECIPES
from ..prompts import DEFAULT_TEMPLATE, PromptTemplate, domain_for_preset
from ..validation import (
    BETA,
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    PROBABILITY,
    RATE,
    SEED,
    Range,
    check_ranges,
    check_value,
    integer,
)
from .augment import AUGMENTATIONS, MIX_AUGMENTATIONS
from .backbones import CLASSIFIER_TYPES
from .modeling import DEFAULT_CLASSIFIER_BASE

TRAIN_MODES = ("real+synthetic", "synthetic", "real")
# The `lr_scheduler_type` that runs the reference's schedule (`schedule.reference_lr_schedule`).
REFERENCE_SCHEDULE = "cosine_with_min_lr"
REFERENCE_SCHEDULE_KWARGS = {"min_lr": 1e-8}
# The script's defaults over `TrainingArguments`': model selection on the validation split at every epoch; only the
# best and the last checkpoint are kept.
SCRIPT_DEFAULTS = {
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "accuracy",
    "save_total_limit": 2,
    "logging_steps": 10,
    "report_to": "none",
}
# The numeric `TrainingArguments` fields stage 3 inherits, and what each may be.
TRAINING_ARGUMENT_RANGES = {
    "per_device_train_batch_size": COUNT.with_hint("reference: 64"),
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "num_train_epochs": POSITIVE,
    "max_steps": integer(-1).with_hint("-1: set by num_train_epochs"),
    "learning_rate": RATE.with_hint("reference: 1e-4"),
    "warmup_steps": NON_NEGATIVE.with_hint("below 1: a fraction of the steps"),
    "weight_decay": PROBABILITY.with_hint("reference: 1e-4"),
    "adam_beta1": BETA,
    "adam_beta2": BETA,
    "adam_epsilon": RATE,
    "max_grad_norm": NON_NEGATIVE.with_hint("0: no clipping, as the reference"),
    "label_smoothing_factor": BETA,
    "neftune_noise_alpha": POSITIVE.or_none(),
    "torch_empty_cache_steps": COUNT.or_none(),
    "logging_steps": POSITIVE.with_hint("below 1: a fraction of the steps"),
    "eval_steps": POSITIVE.or_none(),
    "eval_delay": NON_NEGATIVE,
    "eval_accumulation_steps": COUNT.or_none(),
    "save_steps": POSITIVE.with_hint("below 1: a fraction of the steps"),
    "save_total_limit": COUNT.or_none(),
    "seed": SEED,
    "data_seed": SEED.or_none(),
    "dataloader_num_workers": NON_NEGATIVE_INT,
    "dataloader_prefetch_factor": COUNT.or_none(),
    "ddp_bucket_cap_mb": COUNT.or_none(),
    "ddp_timeout": COUNT,
    "local_rank": integer(-1),
}


@dataclass
class ClassifierArguments:
    """What stage 3 trains on and with: the model and its LoRA, the real and synthetic data, the class prompts."""

    model_name_or_path: str = field(
        default=DEFAULT_CLASSIFIER_BASE,
        metadata={
            "help": "Model id or path: a dual encoder (CLIP, SigLIP, SigLIP 2 fixed-resolution, ...) or an "
            "image-classification model (ViT, ConvNeXt, ...); the kind is read from its config."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    classifier_type: str = field(
        default="auto",
        metadata={
            "help": "'auto' (default): from the model's config. 'image_classifier' on a dual encoder fine-tunes its "
            "image tower under a head initialised from the class-prompt text embeddings.",
            "choices": list(CLASSIFIER_TYPES),
        },
    )
    real_dataset: str | None = field(
        default=None, metadata={"help": "Real labelled data: Hub id, save_to_disk folder or image folder."}
    )
    real_split: str = field(default="train", metadata={"help": "Split holding the K-shot images."})
    image_column: str = field(default="image")
    label_column: str = field(default="label")
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated classes to keep, in order, when there is no manifest; with one, the manifest "
            "carries the classes, their order and names (if given, this must match it)."
        },
    )
    few_shot_manifest: str | None = field(
        default=None,
        metadata={"help": "K-shot manifest (datadream-hf few-shot); required unless train_mode=synthetic."},
    )
    validation_split: str | None = field(
        default=None,
        metadata={"help": "A real split for model selection. Default: carved from real_split outside the K shots."},
    )
    validation_per_class: int = field(
        default=16, metadata={"help": "Validation images per class when carved from real_split."}
    )
    test_split: str | None = field(
        default="test",
        metadata={
            "help": "Held-out real split for the final report only (never used for training or selection), of "
            "`test_dataset` if given, else of `real_dataset`; 'none': no test evaluation."
        },
    )
    test_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out real data for the final report when `real_dataset` has no test split (e.g. an image "
            "folder): an image folder, save_to_disk folder or Hub id."
        },
    )
    test_per_class: int | None = field(
        default=None,
        metadata={
            "help": "Carve the test set from `real_split` instead: this many images per class outside the K shots "
            "and the validation carve (recorded in the report)."
        },
    )
    synthetic_dataset: str | None = field(
        default=None, metadata={"help": "Stage-2 dataset: save_to_disk folder or Hub id (columns image, label)."}
    )
    synthetic_split: str = field(default="train")
    synthetic_images_per_class: int | None = field(
        default=None, metadata={"help": "Use at most this many synthetic images per class (default: all)."}
    )
    dataset_preset: str | None = field(
        default=None,
        metadata={
            "help": "One of the paper's datasets, e.g. fgvc_aircraft (`datadream-hf presets`): the prompts' domain "
            "word (as stage 1), and in the script the columns, splits and epochs the paper used."
        },
    )
    domain: str | None = field(default=None, metadata={"help": "Domain word with trailing space; overrides preset."})
    prompt_template: str = field(default=DEFAULT_TEMPLATE)
    clean_class_names: bool = field(default=False, metadata={"help": "Replace '_' by ' ' in class names."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (reference: 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (reference: 32)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (reference: 0.1)."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names for the LoRA. Default: the attention Q and V projections "
            "(reference: q_proj,v_proj; of both towers for dual encoders); a convolutional model's linear layers."
        },
    )
    use_peft: bool = field(
        default=True,
        metadata={"help": "Train a LoRA (default); false: fine-tune every weight (image-classification models)."},
    )
    license: str = field(default="mit", metadata={"help": "License in the model card (OpenAI CLIP weights: MIT)."})

    # What every numeric flag may be (`datadream_hf.validation`), checked before any work.
    NUMERIC_RANGES: ClassVar[dict[str, Range]] = {
        "validation_per_class": COUNT,
        "test_per_class": COUNT.or_none().with_hint("None: a test split or dataset"),
        "synthetic_images_per_class": COUNT.or_none().with_hint("None: all"),
        "lora_rank": COUNT.with_hint("reference: 16"),
        "lora_alpha": COUNT.with_hint("reference: 32"),
        "lora_dropout": BETA.with_hint("reference: 0.1"),
    }

    def __post_init__(self):
        if not self.real_dataset:
            raise ValueError("`--real_dataset` is required (the K-shot source, and the validation/test splits).")
        check_ranges(self, self.NUMERIC_RANGES)
        if isinstance(self.test_split, str) and self.test_split.lower() in ("none", ""):
            self.test_split = None
        if self.test_per_class is not None:
            if self.test_dataset:
                raise ValueError("Pass either `--test_per_class` (a carve of `real_split`) or `--test_dataset`.")
            self.test_split = None  # the carve is the test set
        if self.validation_split is not None and self.validation_split == self.test_split and not self.test_dataset:
            raise ValueError(
                f"`--validation_split` and `--test_split` are both {self.test_split!r}: selecting the model on the "
                "test split inflates its accuracy. Use another split or leave `--validation_split` unset."
            )
        if self.classifier_type not in CLASSIFIER_TYPES:
            raise ValueError(f"`classifier_type` must be one of {CLASSIFIER_TYPES}, got {self.classifier_type!r}.")
        if self.dataset_preset is not None:
            domain_for_preset(self.dataset_preset)  # an unknown preset fails here, before any data is read

    def class_prompt_template(self) -> PromptTemplate:
        """The class prompts of the classifier head (use stage 1's domain word: same preset or `domain`)."""
        domain = self.domain if self.domain is not None else domain_for_preset(self.dataset_preset or "imagenet")
        return PromptTemplate(domain=domain, template=self.prompt_template, clean_class_names=self.clean_class_names)


@dataclass
class DataDreamTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the real/synthetic mixing of DataDream's classifier training.

    Defaults that differ from `TrainingArguments` are the reference classifier's recipe (ExplainableML/DataDream
    `classify/`: its README command, `bash_run.sh`, `config.py`): batch 64 per device, AdamW lr 1e-4 and weight decay
    1e-4, a 3-epoch linear warm-up from the minimum lr 1e-8 then a cosine down to it, no gradient clipping, fp16
    autocast on a GPU (fp32 on CPU), MixUp/CutMix on 20% of the batches, 100 epochs (its default; a dataset preset
    sets the paper's, e.g. 50 for FGVC-Aircraft). Others avoid known pitfalls (`remove_unused_columns=False` keeps
    `is_real`; `label_names=["labels"]`).
    """

    recipe: str = field(
        default="datadream",
        metadata={
            "help": "The classifier recipe whose defaults the script uses: 'datadream' (the reference's, below) or "
            "'loft' (LoFT's: synthetic images only, batch 256, 60 epochs, 6 warm-up epochs; the rest DataDream's). "
            "A flag given explicitly wins, e.g. `--recipe loft --train_mode real+synthetic`; it wins over "
            "`--dataset_preset`'s epochs. In Python, pass `**datadream_hf.presets.recipe_flag_defaults('loft')`.",
            "choices": list(CLASSIFIER_RECIPES),
        },
    )
    real_loss_weight: float = field(
        default=0.8,
        metadata={"help": "lambda: weight of the real-image CE; the synthetic CE gets 1 - lambda (reference: 0.8)."},
    )
    train_mode: str = field(
        default="real+synthetic",
        metadata={"help": "Which images to train on.", "choices": list(TRAIN_MODES)},
    )
    real_samples_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Real images in each per-device batch in real+synthetic mode, the rest synthetic. Default: half "
            "the batch (rounded down), like the reference, which repeats the real images to match the synthetic "
            "count and shuffles both into one loader (1:1 on average, but not per batch)."
        },
    )
    augmentation: str = field(
        default="datadream",
        metadata={
            "help": "Training augmentation: the reference's ('datadream') or none.",
            "choices": list(AUGMENTATIONS),
        },
    )
    mix_augmentation: str = field(
        default="mixup_or_cutmix",
        metadata={
            "help": "MixUp or CutMix (one drawn per batch) on `mix_probability` of the batches, as the reference's "
            "command (`--is_mix_aug=True`); 'none' turns it off.",
            "choices": list(MIX_AUGMENTATIONS),
        },
    )
    mix_probability: float = field(
        default=0.2, metadata={"help": "Fraction of training batches that get MixUp/CutMix (reference: 0.2)."}
    )
    mix_alpha: float = field(default=1.0, metadata={"help": "Beta(alpha, alpha) of the MixUp/CutMix weight."})
    warmup_epochs: float = field(
        default=3.0,
        metadata={
            "help": "Linear warm-up over this many epochs (reference: 3), unless `warmup_steps` > 0 is given; "
            "with the default schedule it starts from the minimum lr, as the reference's."
        },
    )
    # Overridden defaults: the reference's recipe.
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Training images per device and step (reference: 64)."}
    )
    num_train_epochs: float = field(
        default=100.0,
        metadata={"help": "Epochs (reference default: 100; `--dataset_preset` sets the paper's where known)."},
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (reference: 1e-4)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (reference: 1e-4)."})
    lr_scheduler_type: str = field(
        default=REFERENCE_SCHEDULE,
        metadata={
            "help": f"Learning rate schedule. '{REFERENCE_SCHEDULE}' (default) is the reference's: warm-up from "
            "`lr_scheduler_kwargs['min_lr']` to `learning_rate`, then a cosine down to that minimum; the Trainer's "
            "other schedules warm up from 0."
        },
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: dict(REFERENCE_SCHEDULE_KWARGS),
        metadata={"help": "Schedule arguments; `min_lr` is the floor of the cosine (reference: 1e-8)."},
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Gradient clipping norm; 0 clips nothing (the reference does not clip)."}
    )
    fp16: bool | None = field(
        default=None,
        metadata={
            "help": "fp16 autocast with loss scaling. Default (neither --fp16 nor --bf16 given): Accelerate's setting "
            "(`accelerate launch --mixed_precision`, its config file), else on when a CUDA GPU trains (the "
            "reference's `--use_fp16 True`), off on CPU."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (Ampere or newer GPUs, or a CPU). Default: as --fp16 says."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the model's forward does not take `is_real`, the loss does."}
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"],
        metadata={"help": "Input keys holding the labels (the model's forward has no way to tell the Trainer)."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every LoRA parameter is used at every step, so DDP need not search."}
    )

    # What every numeric flag may be (`datadream_hf.validation`), the inherited `TrainingArguments` ones included,
    # checked before any work (transformers checks few of them, and none for NaN).
    NUMERIC_RANGES: ClassVar[dict[str, Range]] = {
        "real_loss_weight": PROBABILITY.with_hint("lambda; the paper uses 0.8"),
        "real_samples_per_batch": COUNT.or_none().with_hint("None: half the batch"),
        "mix_probability": PROBABILITY.with_hint("reference: 0.2"),
        "mix_alpha": POSITIVE,
        "warmup_epochs": NON_NEGATIVE.with_hint("reference: 3"),
        **TRAINING_ARGUMENT_RANGES,
    }

    def __post_init__(self):
        check_ranges(self, self.NUMERIC_RANGES)
        if self.recipe not in CLASSIFIER_RECIPES:
            raise ValueError(f"`recipe` must be one of {list(CLASSIFIER_RECIPES)}, got {self.recipe!r}.")
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"`train_mode` must be one of {TRAIN_MODES}, got {self.train_mode!r}.")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"`augmentation` must be one of {AUGMENTATIONS}, got {self.augmentation!r}.")
        if self.mix_augmentation not in MIX_AUGMENTATIONS:
            raise ValueError(f"`mix_augmentation` must be one of {MIX_AUGMENTATIONS}, got {self.mix_augmentation!r}.")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Several CPU processes (accelerate launch / torchrun without a GPU) only form a DDP group when
            # `use_cpu` is set before the devices are set up, i.e. here; otherwise each process trains alone.
            self.use_cpu = True
        precision_given = self.fp16 is not None or self.bf16 is not None
        self.fp16, self.bf16 = mixed_precision_flags(self.fp16, self.bf16, self.use_cpu)
        super().__post_init__()
        if precision_given and not (self.fp16 or self.bf16):
            self.mixed_precision = "no"  # TrainingArguments would take ACCELERATE_MIXED_PRECISION: the flags win
        if isinstance(self.lr_scheduler_kwargs, dict) and "min_lr" in self.lr_scheduler_kwargs:  # parsed by now
            check_value("lr_scheduler_kwargs.min_lr", self.lr_scheduler_kwargs["min_lr"], PROBABILITY.with_hint(
                "the cosine's floor; reference: 1e-8"))  # fmt: skip
        self.samples_per_batch()  # validates real_samples_per_batch against the batch size

    def samples_per_batch(self) -> tuple[int, int]:
        """(real, synthetic) images in each per-device training batch."""
        batch_size = self.per_device_train_batch_size
        if self.train_mode == "real":
            return batch_size, 0
        if self.train_mode == "synthetic":
            return 0, batch_size
        real = self.real_samples_per_batch if self.real_samples_per_batch is not None else batch_size // 2
        if not 1 <= real <= batch_size - 1:
            raise ValueError(
                f"`real_samples_per_batch` must be in 1..{batch_size - 1} so that each per-device batch of "
                f"{batch_size} holds both real and synthetic images, got {real}. Raise `per_device_train_batch_size` "
                "(>= 2) or change `real_samples_per_batch`."
            )
        return real, batch_size - real


def default_fp16(use_cpu: bool) -> bool:
    """fp16 autocast where the reference used it: on a CUDA GPU (its `--use_fp16 True`); fp32 on CPU."""
    return torch.cuda.is_available() and not use_cpu


def mixed_precision_flags(fp16: bool | None, bf16: bool | None, use_cpu: bool) -> tuple[bool, bool]:
    """(fp16, bf16): the flags when either is given; else Accelerate's setting (`ACCELERATE_MIXED_PRECISION`, which
    `accelerate launch` sets from its `--mixed_precision` or config file, as stage 1 follows it); else fp16 on a GPU
    (`default_fp16`). Resolving fp16 on a GPU regardless would refuse `--bf16 true` (both on) and silently replace
    `accelerate launch --mixed_precision bf16` (or `no`) by fp16."""
    if fp16 is not None or bf16 is not None:
        return bool(fp16), bool(bf16)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher is not None:  # "no", "fp16", "bf16" (another, e.g. fp8, is left to Accelerate: both flags off)
        return launcher == "fp16", launcher == "bf16"
    return default_fp16(use_cpu), False


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def check_arguments(args: ClassifierArguments, training_args: DataDreamTrainingArguments) -> None:
    """The checks that need both dataclasses (the data `train_mode` trains on must be given) or the machine (no fp16
    on a CPU)."""
    if training_args.fp16:
        refuse_fp16_on_cpu("fp16", training_args.device, "--fp16 (flag or accelerate launch --mixed_precision)",
                           "Drop it (fp32), or pass --bf16 true.")  # fmt: skip
    if training_args.train_mode != "real" and not args.synthetic_dataset:
        raise ValueError(f"`--train_mode {training_args.train_mode}` needs `--synthetic_dataset`.")
    if training_args.train_mode != "synthetic" and not args.few_shot_manifest:
        raise ValueError(
            f"`--train_mode {training_args.train_mode}` trains on the K-shot real images: pass `--few_shot_manifest` "
            "(the one stage 1 used; draw it with `datadream-hf few-shot`)."
        )
