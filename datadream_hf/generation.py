"""Stage 2 of DataDream: sample the synthetic dataset from one pipeline, swapping the class LoRA adapters in place.

Every image has its own seed derived from (seed, class index, image index), so an image does not depend on the batch
size, on the process that made it or on the classes made before it; work is written in resumable shards (`synthetic`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from safetensors import safe_open

from .layout import TRAINING_CONFIG_NAME, read_adapter_index, write_json_atomic
from .locking import OutputDirLock, OutputDirLockedError
from .lora import LORA_WEIGHT_NAME
from .prompts import PromptTemplate
from .synthetic import (
    GENERATION_CONFIG_NAME,
    GENERATION_MANIFEST_NAME,
    Shard,
    encode_png,
    file_sha256,
    missing_shards,
    plan_shards,
    remove_stale_temp_files,
    write_sample_grid,
    write_shard,
)
from .versions import library_versions

logger = logging.getLogger(__name__)

GENERATION_FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Suffixes of LoRA factors in diffusers-format files (old and peft spellings) -> which factor they are.
LORA_FACTOR_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}


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


def image_seed(seed: int, class_index: int, image_index: int) -> int:
    """The seed of image `image_index` of class `class_index`: an independent stream per (seed, class, image).

    Fixes the reference's single global seed, under which image i of every class started from the same noise.
    """
    words = np.random.SeedSequence([seed, class_index, image_index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)  # 62 bits: a valid torch seed and int64 value


def _trained_base_model(training_config: dict) -> tuple[str | None, str | None]:
    """(id, revision) of the base model a stage-1 config names, whichever spelling it uses."""
    base = training_config.get("base_model")
    if isinstance(base, dict):
        name = base.get("pretrained_model_name_or_path") or base.get("id") or base.get("name_or_path")
        return name, base.get("revision")
    name = training_config.get("pretrained_model_name_or_path") or (base if isinstance(base, str) else None)
    return name, training_config.get("revision")


def _same_model(a: str, b: str) -> bool:
    def normalize(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.is_dir() else name.rstrip("/")

    return normalize(a) == normalize(b)


@dataclass
class AdapterSet:
    """Which LoRA adapter each class uses: a stage-1 output (`dset`: one for all, `cls`: one per class) or none."""

    mode: str
    class_names: list[str]
    root: Path | None = None
    source: str | None = field(default=None, metadata={"help": "What the user passed: local folder or Hub repo id."})
    revision: str | None = field(default=None, metadata={"help": "Hub commit the files came from."})
    folders: list[str] = field(default_factory=list, metadata={"help": "folders[c]: class c's folder under root."})
    training_config: dict = field(default_factory=dict)

    @classmethod
    def none(cls, class_names: list[str]) -> AdapterSet:
        return cls(mode="none", class_names=list(class_names))

    def weight_file(self, class_index: int) -> Path | None:
        if self.mode == "none":
            return None
        return self.root / self.folders[class_index] / LORA_WEIGHT_NAME

    def adapter_id(self, class_index: int) -> str:
        if self.mode == "none":
            return "none (frozen base model)"
        folder = self.folders[class_index]
        source = self.source + (f"@{self.revision}" if self.revision else "")
        return source if folder == "." else f"{source}/{folder}"

    def describe(self) -> dict:
        hashes = {}
        per_class = []
        for c in range(len(self.class_names)):
            file = self.weight_file(c)
            if file is not None and file not in hashes:
                hashes[file] = file_sha256(file)
            per_class.append(
                {
                    "id": self.adapter_id(c),
                    "folder": self.folders[c] if self.folders else None,
                    "sha256": hashes.get(file),
                }
            )
        return {"mode": self.mode, "source": self.source, "revision": self.revision, "per_class": per_class}


def resolve_adapters(
    adapter_path: str, revision: str | None = None, token: str | None = None, cache_dir: str | None = None
) -> AdapterSet:
    """Reads a stage-1 output from a local folder or a Hub repo id (only its JSON and safetensors files are fetched).

    Checks that every class has a safetensors adapter file; pickled weights are refused, never loaded.
    """
    local = Path(adapter_path).expanduser()
    resolved_revision = None
    if local.is_dir():
        root = local
    elif HUB_REPO_ID.match(adapter_path):
        from huggingface_hub import snapshot_download

        try:
            root = Path(
                snapshot_download(
                    adapter_path,
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    allow_patterns=["*.json", "*.safetensors"],
                )
            )
        except Exception as err:  # offline, unknown repo, gated...: all mean "no adapters from there"
            raise GenerationInputError(
                f"`adapter_path` {adapter_path!r} is not a local folder and could not be fetched from the Hub "
                f"({type(err).__name__}: {err}). Pass the stage-1 --output_dir or a reachable Hub repo id."
            ) from err
        resolved_revision = root.name  # snapshot folders are named by commit hash
    else:
        raise GenerationInputError(
            f"`adapter_path` {adapter_path!r} is neither an existing folder nor a Hub repo id ('owner/name'). Pass "
            "the --output_dir of train_datadream_lora.py."
        )
    index = read_adapter_index(root)
    names = index["class_names"]
    if index["mode"] == "dset":
        folders = [index["adapters"]["all"]] * len(names)
    else:
        folders = [index["adapters"][str(c)] for c in range(len(names))]
    for c, folder in enumerate(folders):
        file = root / folder / LORA_WEIGHT_NAME
        if file.is_file():
            continue
        pickles = [p.name for p in (root / folder).glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise GenerationInputError(
                f"Adapter of class {names[c]!r} in {str(root / folder)!r} is only available as {pickles}: pickled "
                f"weights can execute code and are not loaded. Convert it to {LORA_WEIGHT_NAME} (safetensors)."
            )
        raise GenerationInputError(
            f"Missing adapter for class {names[c]!r} (index {c}): no {LORA_WEIGHT_NAME} in {str(root / folder)!r}. "
            "Finish stage 1 for that class or fix adapter_index.json."
        )
    training_config = {}
    config_path = root / TRAINING_CONFIG_NAME
    if config_path.is_file():
        try:
            training_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise GenerationInputError(f"{str(config_path)!r} is not valid JSON ({err}); restore it from stage 1.")
    else:
        logger.warning(f"No {TRAINING_CONFIG_NAME} in {root}: the adapters' base model is checked by shapes only.")
    return AdapterSet(
        mode=index["mode"],
        class_names=list(names),
        root=root,
        source=str(adapter_path),
        revision=resolved_revision,
        folders=folders,
        training_config=training_config,
    )


def check_class_names(adapters: AdapterSet, class_names: list[str] | None) -> None:
    if class_names is not None and list(class_names) != adapters.class_names:
        raise GenerationInputError(
            f"`class_names` {list(class_names)[:5]}... differ from the adapters' classes "
            f"{adapters.class_names[:5]}... "
            f"(from {adapters.source}). Leave class_names unset to use the adapters' classes, in their order."
        )
    if len(set(adapters.class_names)) != len(adapters.class_names) or not adapters.class_names:
        raise GenerationInputError(f"Class names must be unique and non-empty, got {adapters.class_names[:10]}.")


def check_adapters_fit(
    pipeline,
    adapters: AdapterSet,
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    allow_base_model_mismatch: bool = False,
) -> None:
    """Refuses adapters made for another base model: by the id stage 1 recorded, and by every LoRA weight's shape."""
    check_base_model_id(adapters, pretrained_model_name_or_path, revision, allow_base_model_mismatch)
    components = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    for file in sorted({adapters.weight_file(c) for c in range(len(adapters.class_names))} - {None}):
        _check_lora_shapes(file, components)


def check_base_model_id(
    adapters: AdapterSet,
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    allow_base_model_mismatch: bool = False,
) -> None:
    """Refuses adapters whose stage-1 config names another base model (id or revision) than the one given."""
    trained_id, trained_revision = _trained_base_model(adapters.training_config)
    if trained_id and not allow_base_model_mismatch:
        if not _same_model(trained_id, pretrained_model_name_or_path) or (
            trained_revision and revision and trained_revision != revision
        ):
            raise GenerationInputError(
                f"The adapters in {adapters.source!r} were trained on base model {trained_id!r}"
                f"{f' (revision {trained_revision})' if trained_revision else ''}, not on "
                f"{pretrained_model_name_or_path!r}{f' (revision {revision})' if revision else ''}. Pass the model "
                "stage 1 used, or --allow_base_model_mismatch if it is the same model under another name."
            )


def _check_lora_shapes(file: Path, components: dict[str, torch.nn.Module]) -> None:
    found = 0
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            suffix = next((s for s in LORA_FACTOR_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                continue
            component_name, _, module_path = key[: -len(suffix)].partition(".")
            component = components.get(component_name)
            if component is None:
                raise GenerationInputError(
                    f"Adapter {str(file)!r} has LoRA weight {key!r} for {component_name!r}; a Stable Diffusion "
                    f"pipeline only has {list(components)}. Was it trained for another model family?"
                )
            try:
                module = component.get_submodule(module_path)
            except AttributeError:
                try:  # transformers < 5 wrapped the text encoder in `.text_model`
                    module = component.get_submodule(module_path.removeprefix("text_model."))
                except AttributeError:
                    raise GenerationInputError(
                        f"Adapter {str(file)!r} has LoRA weight {key!r} but the base model has no module "
                        f"{component_name}.{module_path}: the adapter was trained for another base model."
                    ) from None
            shape = tuple(f.get_slice(key).get_shape())
            weight_shape = tuple(module.weight.shape)  # (out, in, ...)
            fits = (
                shape[1] == weight_shape[1] if LORA_FACTOR_SUFFIXES[suffix] == "down" else shape[0] == weight_shape[0]
            )
            if not fits:
                raise GenerationInputError(
                    f"Adapter {str(file)!r} does not fit the base model: LoRA weight {key!r} has shape {shape} but "
                    f"{component_name}.{module_path} has weight shape {weight_shape}. The adapter was trained for "
                    "another base model; pass the base model stage 1 used."
                )
            found += 1
    if not found:
        raise GenerationInputError(f"Adapter {str(file)!r} holds no LoRA weights in diffusers format.")


def load_generation_pipeline(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    scheduler: str | None = None,
):
    """Loads the base pipeline once for the whole run: safetensors only, no safety checker (as the reference)."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from packaging.version import Version

    # diffusers 0.42 renamed `torch_dtype` to `dtype`; older versions would silently ignore `dtype`.
    dtype_kwarg = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path,
            revision=revision,
            variant=variant,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=True,
            **{dtype_kwarg: torch_dtype},
        )
    except (OSError, ValueError) as err:
        raise GenerationInputError(
            f"Cannot load base model {pretrained_model_name_or_path!r} (revision {revision}, variant {variant}) as a "
            f"Stable Diffusion pipeline with safetensors weights: {err}"
        ) from err
    if scheduler is not None:
        pipeline.scheduler = scheduler_class(scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class FusedAdapterSwitcher:
    """Puts one LoRA adapter at a time into a pipeline, fused into the base weights (no LoRA cost per step).

    Switching restores the base weights from a copy taken before the first fuse instead of unfusing: W + BA - BA != W
    in floating point, so unfusing would let the base drift and make images depend on which classes came before.
    A stage-1 file (diffusers keys + r/alpha metadata) is fused directly, W = W0 + (alpha / r) * up @ down from the
    file's tensors, peft's own fuse formula without injecting peft layers first: measured on the tiny pipeline (CPU),
    0.01 s per switch instead of 0.1 s for diffusers' `load_lora_weights` + `fuse_lora` + unload, which remains the
    path for any other file layout. Sampling is as fast as the base pipeline; keeping all adapters loaded and calling
    `set_adapters` switches in 0.004 s but samples ~20% slower.
    """

    ADAPTER_NAME = "datadream_class"
    _by_pipeline: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_pipeline(cls, pipeline) -> FusedAdapterSwitcher:
        """The pipeline's one switcher: two switchers on a pipeline would each think they own its weights."""
        if pipeline not in cls._by_pipeline:
            cls._by_pipeline[pipeline] = cls(pipeline)
        return cls._by_pipeline[pipeline]

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.active: Path | None = None
        self._base_weights: dict[tuple[str, str], torch.Tensor] = {}
        self._peft_loaded = False  # the active adapter went through diffusers' load_lora_weights

    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component in ("unet", "text_encoder"):
            for name, module in getattr(self.pipeline, component).named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield component, name, module

    def use(self, weight_file: Path | None) -> None:
        """Makes `weight_file`'s adapter the active one (None: the plain base model)."""
        if weight_file == self.active:
            return
        self.reset()
        if weight_file is None:
            return
        deltas = self._read_deltas(weight_file)
        if deltas is not None:
            for (component, name), delta in deltas.items():
                weight = getattr(self.pipeline, component).get_submodule(name).weight
                base = self._base_weights.setdefault((component, name), weight.detach().clone())
                weight.data.copy_((base.float() + delta).to(base.dtype))
            self.active = weight_file
            return
        # use_safetensors=True also turns off diffusers' fallback to a pickled file of the same adapter.
        self.pipeline.load_lora_weights(
            str(weight_file.parent), weight_name=weight_file.name, adapter_name=self.ADAPTER_NAME, use_safetensors=True
        )
        components = set()
        for component, name, module in self._lora_layers():
            components.add(component)
            # Copied while still unfused; the copy is kept for the whole run, so it is always the pristine base.
            self._base_weights.setdefault((component, name), module.get_base_layer().weight.detach().clone())
        self.pipeline.fuse_lora(components=sorted(components), adapter_names=[self.ADAPTER_NAME])
        self.active = weight_file
        self._peft_loaded = True

    def _read_deltas(self, weight_file: Path) -> dict[tuple[str, str], torch.Tensor] | None:
        """(component, module) -> (alpha / r) * up @ down, (out, in) in fp32, of a stage-1 adapter file; None for a
        layout this does not read exactly (no r/alpha metadata, rank or alpha patterns, other keys: DoRA, alphas)."""
        with safe_open(str(weight_file), "pt") as f:
            metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        plain = {f"{c}.{k}" for c in ("unet", "text_encoder") for k in ("r", "lora_alpha", "target_modules")}
        if not tensors or any(value for key, value in metadata.items() if key not in plain):
            return None
        factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            suffix = next((s for s in LORA_FACTOR_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                return None
            component, _, path = key[: -len(suffix)].partition(".")
            factors.setdefault((component, path), {})[LORA_FACTOR_SUFFIXES[suffix]] = tensor
        deltas = {}
        for (component, path), pair in factors.items():
            rank, alpha = metadata.get(f"{component}.r"), metadata.get(f"{component}.lora_alpha")
            model = getattr(self.pipeline, component, None) if component in ("unet", "text_encoder") else None
            if rank is None or alpha is None or model is None or set(pair) != {"down", "up"}:
                return None
            for name in (path, path.removeprefix("text_model.")):  # transformers < 5 wrapped `.text_model`
                module = model.get_submodule(name) if _has_submodule(model, name) else None
                if isinstance(module, torch.nn.Linear):
                    break
            else:
                return None
            # On the weights' device: on a GPU, 200 CPU matmuls would make the switch ~10x slower.
            up = pair["up"].to(module.weight.device, torch.float32)  # (out, r)
            down = pair["down"].to(module.weight.device, torch.float32)  # (r, in)
            deltas[(component, name)] = (up @ down) * (alpha / rank)  # peft's get_delta_weight, in fp32
        return deltas

    def reset(self) -> None:
        """Back to the exact base weights."""
        if self.active is None:
            return
        if self._peft_loaded:
            self.pipeline.unload_lora_weights()  # removes the LoRA layers; the fused base layers stay in place
            self._peft_loaded = False
        for (component, name), weight in self._base_weights.items():
            getattr(self.pipeline, component).get_submodule(name).weight.data.copy_(weight)
        self.active = None


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class SyntheticImageGenerator:
    """One pipeline with the class adapters and prompts: makes image k of class c, alone or batched, reproducibly."""

    def __init__(self, pipeline, adapters: AdapterSet, prompt_template: PromptTemplate, config: GenerationConfig):
        self.pipeline = pipeline
        self.adapters = adapters
        self.prompt_template = prompt_template
        self.config = config
        self.switcher = FusedAdapterSwitcher.for_pipeline(pipeline)
        unet = pipeline.unet
        self.resolution = config.resolution or unet.config.sample_size * pipeline.vae_scale_factor
        # The VAE and every UNet downsampling halve the size: the side must divide evenly all the way down.
        multiple = pipeline.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if self.resolution % multiple:
            raise GenerationInputError(
                f"`resolution` {self.resolution} must be a multiple of {multiple} for this model."
            )
        self.prompts = [prompt_template(name) for name in adapters.class_names]

    def generate(
        self, class_index: int, image_indices: list[int], on_batch: Callable[[int], None] | None = None
    ) -> list[PILImage.Image]:
        """Images `image_indices` of class `class_index`, in batches of `config.batch_size`."""
        self.switcher.use(self.adapters.weight_file(class_index))
        images = []
        for start in range(0, len(image_indices), self.config.batch_size):
            batch = image_indices[start : start + self.config.batch_size]
            images += self._sample(class_index, batch)
            if on_batch is not None:
                on_batch(len(batch))
        return images

    @torch.no_grad()
    def _sample(self, class_index: int, image_indices: list[int]) -> list[PILImage.Image]:
        pipeline = self.pipeline
        # CPU generators: the initial noise is the same on every device, and per image, so not batch-dependent.
        generators = [
            torch.Generator("cpu").manual_seed(image_seed(self.config.seed, class_index, k)) for k in image_indices
        ]
        side = self.resolution // pipeline.vae_scale_factor
        shape = (1, pipeline.unet.config.in_channels, side, side)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])  # (B, C, h, w)
        output = pipeline(
            prompt=[self.prompts[class_index]] * len(image_indices),
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale,
            latents=latents.to(pipeline.device, pipeline.unet.dtype),
            generator=generators,  # continues each image's stream for stochastic schedulers
            output_type="pil",
        )
        return output.images


def resolve_prompt_template(prompt_template: PromptTemplate | None, adapters: AdapterSet) -> PromptTemplate:
    """The caller's template if given, else stage 1's (so generation prompts equal training prompts), else default."""
    trained = adapters.training_config.get("prompt_template")
    if prompt_template is None:
        if not trained:
            return PromptTemplate()
        try:
            return PromptTemplate(**trained)
        except TypeError as err:
            raise GenerationInputError(
                f"`prompt_template` in the stage-1 {TRAINING_CONFIG_NAME} is malformed ({trained!r}): {err}."
            ) from err
    if trained and prompt_template.to_dict() != trained:
        logger.warning(
            f"Prompt template {prompt_template.to_dict()} differs from the one stage 1 trained with {trained}."
        )
    return prompt_template


def _identity(run_info: dict) -> dict:
    """The part of a run's description that determines its images (what resuming must match)."""
    return {
        "base_model": run_info["base_model"],
        "adapters": {
            "mode": run_info["adapters"]["mode"],
            "sha256": [a["sha256"] for a in run_info["adapters"]["per_class"]],
        },
        "class_names": run_info["class_names"],
        "prompts": run_info["prompts"],
        "generation": run_info["generation"],
        "scheduler_class": run_info["scheduler_class"],
    }


def describe_run(generator: SyntheticImageGenerator, base_model: dict, dtype: str, command: str | None = None) -> dict:
    """The content of `generation_config.json`: everything that made the images, plus a fingerprint of it."""
    generation = generator.config.to_dict()
    generation.update(dtype=dtype, resolution=generator.resolution)
    info = {
        "format_version": GENERATION_FORMAT_VERSION,
        "base_model": base_model,
        "adapters": generator.adapters.describe(),
        "class_names": generator.adapters.class_names,
        "prompt_template": generator.prompt_template.to_dict(),
        "prompts": generator.prompts,
        "generation": generation,
        "scheduler_class": type(generator.pipeline.scheduler).__name__,
        "seed_derivation": "numpy SeedSequence([seed, class_index, image_index]) -> 62-bit torch CPU generator seed",
        "library_versions": library_versions(),
        "command": command,
    }
    canonical = json.dumps(_identity(info), sort_keys=True)
    info["fingerprint"] = hashlib.sha256(canonical.encode()).hexdigest()
    return info


def check_output_dir(output_dir: str | Path, run_info: dict) -> None:
    """Refuses to resume into a folder that holds a run with other settings (its shards would be mixed in)."""
    path = Path(output_dir) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
        if previous.get("fingerprint") == run_info["fingerprint"]:
            return
        old, new = _identity(previous), _identity(run_info)
    except (json.JSONDecodeError, KeyError) as err:
        raise GenerationInputError(f"{str(path)!r} is unreadable ({err}); use a new --output_dir.") from err
    differences = []
    for key in new:
        if isinstance(new[key], dict) and isinstance(old.get(key), dict):
            differences += [
                f"{key}.{k}: {old[key].get(k)!r} -> {v!r}" for k, v in new[key].items() if old[key].get(k) != v
            ]
        elif old.get(key) != new[key]:
            differences.append(f"{key}: {str(old.get(key))[:80]} -> {str(new[key])[:80]}")
    raise GenerationInputError(
        f"{str(output_dir)!r} holds a generation run with other settings ({'; '.join(differences)}). Re-run with the "
        "same arguments to resume it, or choose a new --output_dir."
    )


def split_work(shards: list[Shard], num_processes: int, process_index: int) -> list[Shard]:
    """This process's contiguous share of the (class-ordered) shards: few adapter switches per process."""
    bounds = np.linspace(0, len(shards), num_processes + 1).round().astype(int)
    return shards[bounds[process_index] : bounds[process_index + 1]]


def generate_shards(
    generator: SyntheticImageGenerator,
    output_dir: str | Path,
    shards: list[Shard],
    run_fingerprint: str,
    show_progress: bool = True,
    on_shard_written: Callable[[Shard, Path], None] | None = None,
) -> None:
    """Generates and writes `shards` in order, with an overall and a per-class progress bar (images/s)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        _generate_shards(generator, output_dir, shards, run_fingerprint, show_progress, on_shard_written, writer)


def _encode_and_write_shard(output_dir, shard: Shard, names, rows: dict, images, run_fingerprint: str) -> Path:
    rows = {**rows, "image": [encode_png(image) for image in images]}
    return write_shard(output_dir, shard, names, rows, run_fingerprint)


def _generate_shards(generator, output_dir, shards, run_fingerprint, show_progress, on_shard_written, writer) -> None:
    from tqdm.auto import tqdm

    def finish(shard: Shard, written: Future) -> None:
        path = written.result()  # re-raises a failed write here, in the main thread
        if on_shard_written is not None:
            on_shard_written(shard, path)

    names = generator.adapters.class_names
    overall = tqdm(total=sum(s.num_images for s in shards), unit="img", desc="images", disable=not show_progress)
    class_bar, current, pending = None, None, None
    for shard in shards:
        if shard.class_index != current:
            if class_bar is not None:
                class_bar.close()
            current = shard.class_index
            class_bar = tqdm(
                total=sum(s.num_images for s in shards if s.class_index == current),
                unit="img",
                leave=False,
                desc=f"class {current} ({names[current]})",
                position=1,
                disable=not show_progress,
            )

        def advance(n, class_bar=class_bar):
            class_bar.update(n)
            overall.update(n)

        indices = list(range(shard.start, shard.end))
        images = generator.generate(shard.class_index, indices, on_batch=advance)
        rows = {
            "label": [shard.class_index] * len(indices),
            "image_index": indices,
            "seed": [image_seed(generator.config.seed, shard.class_index, k) for k in indices],
            "prompt": [generator.prompts[shard.class_index]] * len(indices),
        }
        # PNG encoding and writing run on the writer thread while the next shard is sampled (inline they added 19%
        # to the wall time on an H200 at 512 px). At most one shard waits; it is finished (and reported) before the
        # next one is handed over, so a callback that stops the run leaves exactly the shards reported before it.
        if pending is not None:
            finish(*pending)
        pending = (shard, writer.submit(_encode_and_write_shard, output_dir, shard, names, rows, images,
                                        run_fingerprint))  # fmt: skip
    if pending is not None:
        finish(*pending)
    if class_bar is not None:
        class_bar.close()
    overall.close()


def generate_synthetic_dataset(
    output_dir: str | Path,
    pretrained_model_name_or_path: str,
    config: GenerationConfig,
    adapter_path: str | None = None,
    class_names: list[str] | None = None,
    prompt_template: PromptTemplate | None = None,
    revision: str | None = None,
    variant: str | None = None,
    adapter_revision: str | None = None,
    token: str | None = None,
    allow_base_model_mismatch: bool = False,
    state=None,
    command: str | None = None,
    on_shard_written: Callable[[Shard, Path], None] | None = None,
) -> dict:
    """Runs stage 2 into `output_dir` (resuming a killed run) and returns the run description.

    Args:
        adapter_path: Stage-1 output folder or Hub repo id; must be None with `config.no_adapter`.
        class_names: Required with `config.no_adapter`; otherwise must equal the adapters' classes if given.
        state: An `accelerate.PartialState`; the shards are split across its processes.
        on_shard_written: Called after each finished shard (tests use it to stop a run midway).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = state or PartialState(cpu=not torch.cuda.is_available())
    # 1. Validate everything before the first image.
    if config.no_adapter:
        if adapter_path is not None:
            raise GenerationInputError("`no_adapter` is set but an `adapter_path` was given: choose one.")
        if not class_names:
            raise GenerationInputError("`class_names` are required with `no_adapter` (there is no adapter index).")
        adapters = AdapterSet.none(class_names)
    else:
        if adapter_path is None:
            raise GenerationInputError("Pass `adapter_path` (a stage-1 output) or set `no_adapter` for the baseline.")
        adapters = resolve_adapters(adapter_path, revision=adapter_revision, token=token)
    check_class_names(adapters, class_names)
    template = resolve_prompt_template(prompt_template, adapters)
    # The recorded base model id is checked before the (slow) pipeline load; the weight shapes after it.
    check_base_model_id(adapters, pretrained_model_name_or_path, revision, allow_base_model_mismatch)
    dtype = config.resolved_dtype(state.device)
    pipeline = load_generation_pipeline(
        pretrained_model_name_or_path,
        revision=revision,
        variant=variant,
        torch_dtype=DTYPES[dtype],
        scheduler=config.scheduler,
    )
    check_adapters_fit(pipeline, adapters, pretrained_model_name_or_path, revision, allow_base_model_mismatch)
    generator = SyntheticImageGenerator(pipeline.to(state.device), adapters, template, config)
    base_model = {
        "pretrained_model_name_or_path": pretrained_model_name_or_path,
        "revision": revision,
        "variant": variant,
    }
    run_info = describe_run(generator, base_model, dtype, command=command)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, run_info)
    state.wait_for_everyone()

    # 2. The main process locks the folder, sets it up and lists the unfinished shards; every process gets the list.
    lock, setup = OutputDirLock(output_dir), None
    if state.is_main_process:
        try:
            lock.acquire()
            check_output_dir(output_dir, run_info)  # again: another run may have started since the check above
            write_json_atomic(output_dir / GENERATION_CONFIG_NAME, run_info)
            for tmp in remove_stale_temp_files(output_dir):
                logger.info(f"Removed {tmp}, left by an interrupted run.")
            setup = {"pending": missing_shards(output_dir, run_info)}
        except (OutputDirLockedError, GenerationInputError) as err:
            lock.release()
            setup = {"error": err}
    setup = broadcast_object_list([setup])[0]
    if "error" in setup:
        raise setup["error"]
    plan = plan_shards(len(adapters.class_names), config.images_per_class, config.shard_size)
    if len(setup["pending"]) < len(plan):
        logger.info(f"Resuming: {len(plan) - len(setup['pending'])} finished shard(s) kept.")

    try:
        # 3. Generate this process's share.
        mine = split_work(setup["pending"], state.num_processes, state.process_index)
        logger.info(
            f"Process {state.process_index + 1}/{state.num_processes}: {len(mine)} shard(s), "
            f"{sum(s.num_images for s in mine)} images to generate."
        )
        generate_shards(
            generator,
            output_dir,
            mine,
            run_info["fingerprint"],
            show_progress=state.is_local_main_process,
            on_shard_written=on_shard_written,
        )
        generator.switcher.reset()
        state.wait_for_everyone()

        # 4. The main process checks the union and writes the run manifest and a sample grid.
        if state.is_main_process:
            still_missing = missing_shards(output_dir, run_info)
            if still_missing:
                raise RuntimeError(f"{len(still_missing)} shard(s) missing after generation, e.g. {still_missing[0]}.")
            write_sample_grid(output_dir)
            manifest = {
                "fingerprint": run_info["fingerprint"],
                "complete": True,
                "num_images": len(adapters.class_names) * config.images_per_class,
                "shards": [
                    {"file": s.relative_path(adapters.class_names), "class_index": s.class_index, "start": s.start}
                    for s in plan
                ],
            }
            write_json_atomic(output_dir / GENERATION_MANIFEST_NAME, manifest)
        state.wait_for_everyone()
    finally:
        lock.release()
    return run_info
