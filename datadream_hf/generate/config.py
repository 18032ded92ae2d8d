"""Settings of stage 2 (`generate_synthetic.py`), each flag a field: `GenerationArguments` (the base model, the
adapters, the classes and prompts, where the dataset goes) and `GenerationConfig` (how images are sampled, recorded in
every generation folder); defaults are the reference's (`generate/generate.py`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import torch

from ..distributed import DDP_TIMEOUT_RANGE, ddp_timeout_field
from ..errors import InputError
from ..few_shot import FewShotManifest
from ..prompts import DEFAULT_TEMPLATE, PromptTemplate
from ..validation import COUNT, NON_NEGATIVE, SEED, Range, check_ranges, check_value, integer, number

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}  # accelerate's names of the dtypes


class GenerationInputError(InputError):
    """Bad stage-2 input (adapters, base model, class names, output folder); raised before any image is made."""


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called `name`; an unknown name is an error that lists the valid ones."""
    import diffusers
    from diffusers import SchedulerMixin

    try:
        cls = getattr(diffusers, name, None) if name.isidentifier() else None
    except (ImportError, RuntimeError):  # a lazily imported class whose backend (e.g. flax) is missing
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
        raise GenerationInputError(
            f"`scheduler`: {name!r} is not a diffusers scheduler class. Leave it unset to keep the model's own "
            f"scheduler (PNDM for SD 2.1, as the reference), or choose one of {known}."
        )
    return cls


@dataclass
class GenerationConfig:
    """How stage 2 samples; defaults are the reference's (`generate/generate.py`)."""

    images_per_class: int = field(default=500, metadata={"help": "Images generated per class (paper: 500)."})
    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps (reference: 50)."})
    guidance_scale: float = field(
        default=2.0, metadata={"help": "Classifier-free guidance scale (reference: 2.0); <= 1 disables guidance."}
    )
    scheduler: str | None = field(
        default=None,
        metadata={
            "help": "A diffusers scheduler class name (e.g. 'DPMSolverMultistepScheduler'), built from the model's "
            "scheduler config. None keeps the model's own scheduler, as the reference did."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Images per pipeline call (does not change the images)."})
    shard_size: int = field(
        default=100, metadata={"help": "Images per shard file: the unit of atomic writing, resuming and work split."}
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "'auto' (float16 on GPU, as the reference; float32 on CPU), 'float32', 'float16', 'bfloat16'."
        },
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "`dtype` as accelerate names it (no/fp16/bf16): an alias, folded into it."}
    )
    seed: int = field(default=0, metadata={"help": "Root of every per-image seed (see `image_seed`)."})
    resolution: int | None = field(
        default=None, metadata={"help": "Image side in pixels; None = the model's default."}
    )
    fusion: Literal["pairs"] | None = field(
        default=None,
        metadata={
            "help": "'pairs' (LoFT): with an image-mode stage-1 output (one LoRA per K-shot image), each image mixes "
            "two of its class's image adapters, every pair of the class in a seeded shuffle, cycled; needed (and "
            "only valid) with image-mode adapters."
        },
    )
    fusion_weights: list[float] = field(
        default_factory=lambda: [0.5, 0.5],
        metadata={"help": "The pair's adapter weights with --fusion pairs (LoFT: 0.5 0.5), each in [0, 1]."},
    )

    # What every numeric flag may be (`datadream_hf.validation`), checked before any work.
    NUMERIC_RANGES: ClassVar[dict[str, Range]] = {
        "images_per_class": COUNT.with_hint("paper: 500"),
        "num_inference_steps": COUNT,
        "guidance_scale": NON_NEGATIVE.with_hint("reference: 2.0; <= 1 disables guidance"),
        "batch_size": COUNT,
        "shard_size": COUNT,
        "seed": SEED,
        "resolution": integer(8, 4096, multiple_of=8).or_none().with_hint("None: the model's default"),
    }
    FUSION_WEIGHT: ClassVar[Range] = number(0, 1).with_hint("LoFT: 0.5 0.5")

    def __post_init__(self):
        check_ranges(self, self.NUMERIC_RANGES, GenerationInputError)
        if self.mixed_precision is not None:
            implied = MIXED_PRECISION_DTYPES.get(self.mixed_precision)
            if implied is None:
                raise GenerationInputError(
                    f"`mixed_precision` must be one of {list(MIXED_PRECISION_DTYPES)}, got {self.mixed_precision!r}."
                )
            if self.dtype not in ("auto", implied):
                raise GenerationInputError(
                    f"`mixed_precision` {self.mixed_precision!r} contradicts `dtype` {self.dtype!r}: pass one of them."
                )
            self.dtype, self.mixed_precision = implied, None
        if self.dtype not in ("auto", *DTYPES):
            raise GenerationInputError(f"`dtype` must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.scheduler is not None:
            scheduler_class(self.scheduler)
        if self.fusion not in (None, "pairs"):
            raise GenerationInputError(f"`fusion` must be 'pairs' or unset, got {self.fusion!r}.")
        weights = self.fusion_weights
        if not isinstance(weights, (list, tuple)) or len(weights) != 2:
            raise GenerationInputError(
                f"`--fusion_weights` must be two numbers, one per adapter of a pair (e.g. 0.5 0.5), got {weights!r}."
            )
        for weight in weights:
            check_value("fusion_weights", weight, self.FUSION_WEIGHT, GenerationInputError)
        if not any(weights):
            raise GenerationInputError("`--fusion_weights` are both 0: that is the base model; give a weight > 0.")
        self.fusion_weights = [float(w) for w in weights]

    def resolved_dtype(self, device: torch.device | str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if torch.device(device).type == "cuda" else "float32"

    def to_dict(self) -> dict:
        """The settings `generation_config.json` records (the `mixed_precision` alias is in `dtype`; the fusion
        settings only when fusing, so a run without fusion keeps the fingerprint, and resumability, it always had)."""
        settings = asdict(self)
        del settings["mixed_precision"]
        if self.fusion is None:
            del settings["fusion"], settings["fusion_weights"]
        return settings


@dataclass
class GenerationArguments:
    """What stage 2 generates from and where the dataset goes: the base model, the stage-1 adapters (or none), the
    classes and prompts (stage 1's unless given), the output folder and what becomes of it."""

    pretrained_model_name_or_path: str = field(
        default=None, metadata={"help": "The base model stage 1 was trained on.", "required": True}
    )
    revision: str | None = field(default=None, metadata={"help": "Base model revision."})
    variant: str | None = field(default=None, metadata={"help": "Base model weights variant, e.g. fp16."})
    adapter_path: str | None = field(
        default=None, metadata={"help": "Stage-1 --output_dir, or the Hub repo id it was pushed to."}
    )
    no_adapter: bool = field(
        default=False,
        metadata={
            "help": "Frozen base model with the same prompts (the 'FakeIt'-style baseline); not with --adapter_path."
        },
    )
    adapter_revision: str | None = field(default=None, metadata={"help": "Hub revision of --adapter_path."})
    allow_base_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Skip the base-model id check (e.g. a local copy of the model stage 1 used); shapes are still "
            "checked."
        },
    )
    # Classes and prompts (taken from stage 1 when available)
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Classes (`a,b,c`); needed with --no_adapter unless --few_shot_manifest."}
    )
    few_shot_manifest: str | None = field(
        default=None, metadata={"help": "K-shot manifest to read the class names from (with --no_adapter)."}
    )
    dataset_preset: str | None = field(
        default=None, metadata={"help": "Domain word preset, e.g. fgvc_aircraft; default: stage 1's template."}
    )
    domain: str | None = field(
        default=None, metadata={"help": "Domain word with its trailing space, e.g. 'aircraft '; overrides the preset."}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": f"Prompt template (default: stage 1's, else {DEFAULT_TEMPLATE!r})."}
    )
    clean_class_names: bool = field(default=False, metadata={"help": "Replace '_' by ' ' in class names."})
    # Outputs
    output_dir: str = field(default="datadream-synthetic", metadata={"help": "The generation folder."})
    save_to_disk: str | None = field(
        default=None, metadata={"help": "Also write the built dataset with `save_to_disk` to this folder."}
    )
    dataset_license: str = field(
        default="other", metadata={"help": "License of the base model, e.g. openrail++ for SD 2.1."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the dataset (Parquet) and its card."})
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Dataset repo to push to, e.g. <user>/datadream-aircraft."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the logged-in one); never written anywhere."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the dataset repo as private."})
    ddp_timeout: int = ddp_timeout_field()

    NUMERIC_RANGES: ClassVar[dict[str, Range]] = {"ddp_timeout": DDP_TIMEOUT_RANGE}

    def __post_init__(self):
        check_ranges(self, self.NUMERIC_RANGES, GenerationInputError)
        if not self.pretrained_model_name_or_path:
            raise GenerationInputError("`pretrained_model_name_or_path` is required: the base model stage 1 used.")
        if self.no_adapter and self.adapter_path is not None:
            raise GenerationInputError("`no_adapter` is set but an `adapter_path` was given: choose one.")
        if not self.no_adapter and self.adapter_path is None:
            raise GenerationInputError("Pass `adapter_path` (a stage-1 output) or set `no_adapter` for the baseline.")
        if self.no_adapter and not self.class_names and not self.few_shot_manifest:
            raise GenerationInputError("`class_names` are required with `no_adapter` (there is no adapter index).")
        if self.push_to_hub and not self.hub_dataset_id:
            raise GenerationInputError("`push_to_hub` needs `hub_dataset_id`.")
        self.requested_prompt_template()  # validates dataset_preset and domain

    def requested_class_names(self) -> list[str] | None:
        """The classes asked for (`class_names`, else the manifest's), or None: the adapters' own."""
        if self.class_names:
            return list(self.class_names)
        if self.few_shot_manifest:
            return FewShotManifest.load(self.few_shot_manifest).class_names
        return None

    def requested_prompt_template(self) -> PromptTemplate | None:
        """A template only if one was asked for; otherwise stage 1's is used (`run.resolve_prompt_template`)."""
        if self.dataset_preset is None and self.domain is None and self.prompt_template is None:
            return None
        kwargs = {"template": self.prompt_template or DEFAULT_TEMPLATE, "clean_class_names": self.clean_class_names}
        if self.domain is not None:
            return PromptTemplate(domain=self.domain, **kwargs)
        if self.dataset_preset is not None:
            return PromptTemplate.from_preset(self.dataset_preset, **kwargs)
        return PromptTemplate(**kwargs)
