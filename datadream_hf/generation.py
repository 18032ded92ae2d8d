"""Stage 2 of DataDream: sample the synthetic dataset from one pipeline, swapping the class LoRA adapters in place.

Every image has its own seed derived from (seed, class index, image index), so an image does not depend on the batch
size, on the process that made it or on the classes made before it; work is written in resumable shards (`synthetic`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from .files import write_json_atomic
from .generation_adapters import (
    AdapterSet,
    FusedAdapterSwitcher,
    GenerationInputError,
    check_adapters_fit,
    check_base_model_id,
    check_class_names,
    resolve_adapters,
)
from .prompts import PromptTemplate
from .run_folder import TRAINING_CONFIG_NAME, OutputDirLock, OutputDirLockedError, settings_diff
from .synthetic import (
    GENERATION_CONFIG_NAME,
    GENERATION_MANIFEST_NAME,
    Shard,
    encode_png,
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
    differences = [
        f"{path}: {a!r} -> {b!r}" if "." in path else f"{path}: {str(a)[:80]} -> {str(b)[:80]}"
        for path, (a, b) in settings_diff(old, new).items()
    ]
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
