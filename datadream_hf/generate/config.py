"""Settings of stage 2 (`generate_synthetic.py`): how images are sampled, recorded in every generation folder;
defaults are the reference's (`generate/generate.py`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GenerationInputError(ValueError):
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
    dtype: str = field(
        default="auto",
        metadata={
            "help": "'auto' (float16 on GPU, as the reference; float32 on CPU), 'float32', 'float16', 'bfloat16'."
        },
    )
    seed: int = field(default=0, metadata={"help": "Root of every per-image seed (see `image_seed`)."})
    resolution: int | None = field(
        default=None, metadata={"help": "Image side in pixels; None = the model's default."}
    )
    no_adapter: bool = field(
        default=False, metadata={"help": "Frozen base model with the same prompts (the 'FakeIt'-style baseline)."}
    )

    def __post_init__(self):
        for name in ("images_per_class", "num_inference_steps", "batch_size", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GenerationInputError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise GenerationInputError(
                f"`seed` must be an integer >= 0 (it seeds numpy's SeedSequence), got {self.seed!r}."
            )
        if self.guidance_scale < 0:
            raise GenerationInputError(f"`guidance_scale` must be >= 0, got {self.guidance_scale!r}.")
        if self.dtype not in ("auto", *DTYPES):
            raise GenerationInputError(f"`dtype` must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise GenerationInputError(f"`resolution` must be None or an integer >= 8, got {self.resolution!r}.")
        if self.scheduler is not None:
            scheduler_class(self.scheduler)

    def resolved_dtype(self, device: torch.device | str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if torch.device(device).type == "cuda" else "float32"

    def to_dict(self) -> dict:
        return asdict(self)
