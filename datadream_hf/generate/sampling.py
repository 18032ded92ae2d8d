"""Stage-2 sampling: the base pipeline, loaded once per run, and `SyntheticImageSampler`, which makes image k of class
c with that class's adapter fused in (or, with image-mode adapters and `--fusion pairs`, with the image's pair of the
class's per-image adapters, `fusion`).

Every image has its own seed derived from (seed, class index, image index), so an image does not depend on the batch
size, on the process that made it or on the classes made before it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image as PILImage

from ..families import family_of_pipeline, read_family
from ..prompts import PromptTemplate
from ..validation import NonFiniteError
from .adapters import AdapterSet, FusedAdapterSwitcher
from .config import GenerationConfig, GenerationInputError, scheduler_class
from .fusion import PairFusion, check_fusion, class_pairs


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
    """Loads the base pipeline once for the whole run with its generator family's pipeline class (read from
    `model_index.json`): safetensors only, no safety checker (as the reference)."""
    import diffusers
    from packaging.version import Version

    family = read_family(pretrained_model_name_or_path, revision)
    # diffusers 0.42 renamed `torch_dtype` to `dtype`; older versions would silently ignore `dtype`.
    dtype_kwarg = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    try:
        pipeline = family.pipeline_class().from_pretrained(
            pretrained_model_name_or_path,
            revision=revision,
            variant=variant,
            use_safetensors=True,
            **family.pipeline_kwargs,
            **{dtype_kwarg: torch_dtype},
        )
    except (OSError, ValueError) as err:
        raise GenerationInputError(
            f"Cannot load base model {pretrained_model_name_or_path!r} (revision {revision}, variant {variant}) as a "
            f"{family.pipeline_class_name} with safetensors weights: {err}"
        ) from err
    if scheduler is not None:
        pipeline.scheduler = scheduler_class(scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class SyntheticImageSampler:
    """One pipeline with the class adapters and prompts: makes image k of class c, alone or batched, reproducibly."""

    def __init__(self, pipeline, adapters: AdapterSet, prompt_template: PromptTemplate, config: GenerationConfig):
        self.pipeline = pipeline
        self.adapters = adapters
        self.prompt_template = prompt_template
        self.config = config
        self.switcher = FusedAdapterSwitcher.for_pipeline(pipeline)
        family = family_of_pipeline(pipeline)
        self.denoiser = family.denoiser(pipeline)
        self.resolution = config.resolution or self.denoiser.config.sample_size * pipeline.vae_scale_factor
        # The VAE and the denoiser's downsampling (UNet) or patches (transformer): the side must divide evenly.
        multiple = family.resolution_multiple(self.denoiser, pipeline.vae_scale_factor)
        if self.resolution % multiple:
            raise GenerationInputError(
                f"`resolution` {self.resolution} must be a multiple of {multiple} for this model."
            )
        self.prompts = [prompt_template(name) for name in adapters.class_names]
        check_fusion(adapters, config)
        self.fusion = PairFusion.for_pipeline(pipeline) if config.fusion is not None else None
        self._pairs: dict[int, list[tuple[int, int]]] = {}

    def image_pair(self, class_index: int, image_index: int) -> tuple[int, int]:
        """With fusion: the two adapters (places in `adapters.images[class_index]`) that make image `image_index`."""
        if class_index not in self._pairs:
            num_adapters = len(self.adapters.images[class_index])
            self._pairs[class_index] = class_pairs(num_adapters, self.config.seed, class_index)
        pairs = self._pairs[class_index]
        return pairs[image_index % len(pairs)]

    def fusion_provenance(self, class_index: int, image_indices: list[int]) -> dict[str, list]:
        """The shard columns that record each image's pair: adapter keys (`adapter_index.json`), the dataset rows of
        the K-shot images they were trained on, and their weights."""
        images = self.adapters.images[class_index]
        pairs = [self.image_pair(class_index, k) for k in image_indices]
        return {
            "fusion_adapters": [[images[a].key, images[b].key] for a, b in pairs],
            "fusion_rows": [[images[a].row, images[b].row] for a, b in pairs],
            "fusion_weights": [list(self.config.fusion_weights) for _ in pairs],
        }

    def reset(self) -> None:
        """The plain base pipeline again (no adapter fused, no fusion layers)."""
        self.switcher.reset()
        if self.fusion is not None:
            self.fusion.remove()

    def sample(
        self, class_index: int, image_indices: list[int], on_batch: Callable[[int], None] | None = None
    ) -> list[PILImage.Image]:
        """Images `image_indices` of class `class_index`, in batches of `config.batch_size`."""
        if self.fusion is None:
            PairFusion.for_pipeline(self.pipeline).remove()  # another sampler's fusion layers, if any
        self.switcher.use(self.adapters.weight_file(class_index))  # None with fusion: the exact base weights
        if self.fusion is not None:
            self.fusion.load(self.adapters.image_weight_files(class_index))
        images = []
        for start in range(0, len(image_indices), self.config.batch_size):
            batch = image_indices[start : start + self.config.batch_size]
            images += self._sample_batch(class_index, batch)
            if on_batch is not None:
                on_batch(len(batch))
        return images

    @torch.no_grad()
    def _sample_batch(self, class_index: int, image_indices: list[int]) -> list[PILImage.Image]:
        pipeline = self.pipeline
        # CPU generators: the initial noise is the same on every device, and per image, so not batch-dependent.
        generators = [
            torch.Generator("cpu").manual_seed(image_seed(self.config.seed, class_index, k)) for k in image_indices
        ]
        side = self.resolution // pipeline.vae_scale_factor
        shape = (1, self.denoiser.config.in_channels, side, side)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])  # (B, C, h, w)
        if self.fusion is not None:
            # The pipeline stacks [unconditional, conditional] for classifier-free guidance (its own condition).
            guided = (
                self.config.guidance_scale > 1 and getattr(self.denoiser.config, "time_cond_proj_dim", None) is None
            )
            pairs = [self.image_pair(class_index, k) for k in image_indices]
            self.fusion.route(pairs, self.config.fusion_weights, unet_repeats=2 if guided else 1)
        output = pipeline(
            prompt=[self.prompts[class_index]] * len(image_indices),
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale,
            latents=latents.to(pipeline.device, self.denoiser.dtype),
            generator=generators,  # continues each image's stream for stochastic schedulers
            output_type="np",  # (B, H, W, 3) in [0, 1]: checked before PIL conversion would turn NaN into black
        )
        if not np.isfinite(output.images).all():
            raise NonFiniteError(
                f"The pipeline made NaN or inf pixels for class {self.adapters.class_names[class_index]!r} (images "
                f"{image_indices[0]}..{image_indices[-1]}); stopped before writing them (finished shards are kept). "
                "Usual causes: an fp16 overflow (--dtype float32), a very large --guidance_scale, or NaN in the base "
                "model's weights."
            )
        return pipeline.numpy_to_pil(output.images)
