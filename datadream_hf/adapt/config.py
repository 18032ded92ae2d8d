"""Settings of stage 1 (`train_datadream_lora.py`), each flag a field: `GeneratorTrainingConfig` (recorded in every
output) and `AdapterHubArguments` (the upload, never recorded); defaults are the paper's, or the mode's.

Mode-dependent settings (rank, text-encoder LoRA, batch, epochs, lr, warm-up, crop) default to None and are resolved
in `__post_init__` from the mode (`adapt.modes`: DataDream's for dset/cls, LoFT's for image): a flag given explicitly
always wins, whatever the mode, and the resolved values are what `to_dict()` and `datadream_config.json` record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..distributed import DDP_TIMEOUT_RANGE, ddp_timeout_field
from ..prompts import DOMAIN_PRESETS, PromptTemplate
from ..validation import BETA, COUNT, NON_NEGATIVE_INT, POSITIVE, PROBABILITY, RATE, SEED, Range, check_ranges, integer
from .modes import MODES, get_mode

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _bad(field_name: str, value, fix: str) -> ValueError:
    return ValueError(f"`{field_name}` = {value!r} is invalid: {fix}.")


_MODE_HINT = "None: the mode's default"


@dataclass
class GeneratorTrainingConfig:
    """Settings of stage 1. Defaults are the paper's / reference code's (DataDream Sec. 4.1, `datadream.py`)."""

    # "required": the script's flag is; in Python, `train_generator` can also be given the few-shot data directly.
    pretrained_model_name_or_path: str = field(
        default=None,
        metadata={"help": "Base model: Hub id (e.g. a stable-diffusion-2-1-base mirror) or folder.", "required": True},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant of the base model, e.g. 'fp16'."})
    output_dir: str = field(default="datadream-lora", metadata={"help": "Where adapters and checkpoints go."})

    dataset: str | None = field(
        default=None, metadata={"help": "Hub id, save_to_disk folder or image folder.", "required": True}
    )
    few_shot_manifest: str | None = field(
        default=None, metadata={"help": "K-shot manifest JSON (`datadream-hf few-shot`).", "required": True}
    )
    split: str = field(default="train", metadata={"help": "Split the manifest was drawn from."})
    image_column: str = field(default="image", metadata={"help": "Image column of the dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of the dataset."})
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "Optional: the manifest carries the classes, their order and names; if given, must match."},
    )
    dataset_preset: str | None = field(
        default=None,
        metadata={
            "help": f"The prompt's domain word of one of {sorted(DOMAIN_PRESETS)}; in the script also the columns and "
            "split of the paper's dataset (`datadream-hf presets`)."
        },
    )
    domain: str | None = field(default=None, metadata={"help": "Domain word with trailing space, e.g. 'aircraft '."})
    clean_class_names: bool = field(default=False, metadata={"help": "Replace '_' by ' ' in class names."})

    mode: Literal["dset", "cls", "image"] = field(
        default="cls",
        metadata={
            "help": "'cls': one adapter per class (DataDream_cls); 'dset': one for all; 'image': one per K-shot image "
            "(LoFT), whose defaults are LoFT's (rank 2, UNet only, batch 1, 600 steps, lr 1e-3, 10 warm-up steps, "
            "center crop)."
        },
    )
    resolution: int = field(default=512, metadata={"help": "Training resolution (SD 2.1-base: 512)."})
    # None: the mode's value (module docstring); DataDream's / LoFT's in the help.
    rank: int | None = field(default=None, metadata={"help": "LoRA rank (DataDream: 16; image mode, LoFT: 2)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha; defaults to `rank` (paper: 16)."})
    lora_init: Literal["gaussian", "kaiming"] = field(
        default="gaussian", metadata={"help": "LoRA A init ('gaussian' as the reference; B starts at zero)."}
    )
    train_text_encoder: bool | None = field(
        default=None, metadata={"help": "Also LoRA the text encoder (DataDream: yes; image mode, LoFT: no)."}
    )
    train_batch_size: int | None = field(
        default=None, metadata={"help": "Images per step and adapter (DataDream: 8; image mode: 1, the one image)."}
    )
    num_train_epochs: int | None = field(
        default=None, metadata={"help": "Epochs over each adapter's images (DataDream: 200; image mode, LoFT: 600)."}
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Steps per adapter (per class in cls mode); overrides num_train_epochs."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (DataDream: 1e-4; image mode, LoFT: 1e-3)."}
    )
    lr_scheduler: str = field(default="cosine", metadata={"help": f"One of {LR_SCHEDULERS} (paper: cosine)."})
    lr_warmup_steps: int | None = field(
        default=None, metadata={"help": "Warm-up steps (DataDream: 100; image mode, LoFT: 10)."}
    )
    center_crop: bool | None = field(
        default=None,
        metadata={
            "help": "Crop the center instead of a random crop after the resize (DataDream: random; image mode, LoFT: "
            "center)."
        },
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (reference: 1e-2)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (reference: 1.0)."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default="no",
        metadata={
            "help": "Dtype of the frozen weights; LoRA weights always stay fp32. None (the script's default): the "
            "Accelerator's, i.e. `accelerate launch --mixed_precision` or the accelerate config."
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    cls_strategy: Literal["auto", "grouped", "sequential"] = field(
        default="auto",
        metadata={
            "help": "cls and image modes (in image mode a 'class' below is one image's adapter): 'auto' trains "
            "several classes' adapters in one forward pass per step (each sample routed to its class's LoRA), as "
            "many per group as the free memory holds (measured on a one- and a two-class step); 'grouped' the same "
            "with `classes_per_group` classes (None: all of a process's); both equal 'sequential' up to float "
            "rounding, which then depends on how classes are grouped. 'sequential': one class after the other, "
            "bit-identical whatever the number of processes."
        },
    )
    classes_per_group: int | None = field(
        default=None,
        metadata={
            "help": "cls 'auto'/'grouped': classes per super-batch; set, it forces the size, None: 'auto' sizes it "
            "from memory, 'grouped' takes all of a process's classes. Memory grows with it (SD 2.1-base, 512 px, "
            "bf16, batch 8: peak 10.5 GB for 1 class, 35 GB for 4 on an H200). A group that runs out of GPU memory "
            "is halved and continues from its last checkpoint."
        },
    )
    memory_safety_margin: float = field(
        default=0.2,
        metadata={"help": "cls 'auto': fraction of the free memory left unused when sizing the groups."},
    )
    cache_latents: bool = field(
        default=True,
        metadata={"help": "Encode each few-shot image (per crop offset) once instead of every step (same posterior)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random draw (class i uses class_seed(seed, i))."})

    checkpointing_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps of an adapter."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder (dset); cls mode takes 'latest'."}
    )
    report_to: str | None = field(
        default="tensorboard", metadata={"help": "Accelerate tracker, or None ('none' means None)."}
    )
    logging_dir: str = field(default="logs", metadata={"help": "Tracker folder, relative to output_dir."})
    validation_prompt: str | None = field(
        default=None, metadata={"help": "Prompt of the validation images; default: each adapter's class prompt(s)."}
    )
    num_validation_images: int = field(default=0, metadata={"help": "Images sampled after each adapter (0: none)."})
    validation_num_inference_steps: int = field(default=25, metadata={"help": "Sampling steps of validation."})
    license: str = field(default="openrail++", metadata={"help": "License in the card (SD 2.1's is openrail++)."})
    ddp_timeout: int = ddp_timeout_field()

    # What every numeric flag may be (`datadream_hf.validation`), checked before any work.
    NUMERIC_RANGES: ClassVar[dict[str, Range]] = {
        "resolution": integer(8, 4096, multiple_of=8).with_hint("SD 2.1-base: 512"),
        "rank": COUNT.or_none().with_hint(_MODE_HINT),
        "lora_alpha": COUNT.or_none(),
        "train_batch_size": COUNT.or_none().with_hint(_MODE_HINT),
        "num_train_epochs": COUNT.or_none().with_hint(_MODE_HINT),
        "max_train_steps": COUNT.or_none(),
        "learning_rate": RATE.or_none().with_hint("paper: 1e-4; None: the mode's"),
        "lr_warmup_steps": NON_NEGATIVE_INT.or_none().with_hint(_MODE_HINT),
        "adam_beta1": BETA,
        "adam_beta2": BETA,
        "adam_weight_decay": PROBABILITY.with_hint("reference: 1e-2"),
        "adam_epsilon": RATE,
        "max_grad_norm": POSITIVE,
        "classes_per_group": COUNT.or_none().with_hint("None: 'auto' sizes it, 'grouped' takes all of a process's"),
        "memory_safety_margin": BETA.with_hint("a fraction of the free memory, e.g. 0.2"),
        "seed": SEED,
        "checkpointing_steps": COUNT,
        "checkpoints_total_limit": COUNT.or_none(),
        "num_validation_images": NON_NEGATIVE_INT,
        "validation_num_inference_steps": COUNT,
        "ddp_timeout": DDP_TIMEOUT_RANGE,
    }

    def __post_init__(self):
        if self.report_to == "none":
            self.report_to = None
        if not self.pretrained_model_name_or_path:
            raise _bad("pretrained_model_name_or_path", self.pretrained_model_name_or_path, "pass a Hub id or folder")
        get_mode(self.mode)  # an unknown mode is named with the modes there are
        check_ranges(self, self.NUMERIC_RANGES)
        self.resolve_mode_defaults()
        if self.lora_init not in ("gaussian", "kaiming"):
            raise _bad("lora_init", self.lora_init, "use 'gaussian' (reference) or 'kaiming'")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise _bad("lr_scheduler", self.lr_scheduler, f"use one of {LR_SCHEDULERS}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise _bad("mixed_precision", self.mixed_precision, "use 'no', 'fp16', 'bf16' or None (the Accelerator's)")
        if self.cls_strategy not in ("auto", "grouped", "sequential"):
            raise _bad("cls_strategy", self.cls_strategy, "use 'auto' (fast, the default), 'grouped' or 'sequential'")
        if self.mode != "dset" and self.resume_from_checkpoint not in (None, "latest"):
            raise _bad(
                "resume_from_checkpoint",
                self.resume_from_checkpoint,
                f"in {self.mode} mode pass 'latest' (each adapter resumes from its own latest checkpoint)",
            )
        if self.domain is not None and self.dataset_preset is not None:
            raise _bad("domain", self.domain, "pass either `domain` or `dataset_preset`, not both")
        self.prompt_template()  # validates dataset_preset and domain

    def resolve_mode_defaults(self) -> None:
        """Fills the settings left None with the mode's (`adapt.modes`), and `lora_alpha` with `rank`; explicit values
        are kept. Idempotent: a resolved config (e.g. read back from `datadream_config.json`) stays as it is."""
        for name, value in MODES[self.mode].defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lora_alpha is None:
            self.lora_alpha = self.rank  # both references tie alpha to the rank

    @property
    def unet_target_modules(self) -> list[str]:
        """The UNet modules the mode's LoRA targets."""
        return list(MODES[self.mode].unet_target_modules)

    def prompt_template(self) -> PromptTemplate:
        if self.dataset_preset is not None:
            return PromptTemplate.from_preset(self.dataset_preset, clean_class_names=self.clean_class_names)
        return PromptTemplate(domain=self.domain or "", clean_class_names=self.clean_class_names)

    @property
    def weight_dtype(self) -> torch.dtype:
        if self.mixed_precision is None:
            raise ValueError(
                "`mixed_precision` is None (the Accelerator's): set it from `accelerator.mixed_precision` first, as "
                "`train_generator` does."
            )
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.mixed_precision]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AdapterHubArguments:
    """Where `train_datadream_lora.py` uploads the finished adapters; never written into the outputs."""

    push_to_hub: bool = field(default=False, metadata={"help": "Upload the output folder to the Hub after training."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repo to push to (default: the output folder's name)."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the logged-in one). Never written anywhere."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the repo as private."})
