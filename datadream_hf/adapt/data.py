"""Stage-1 inputs: the K-shot images, as training units with the reference's transforms, and seeded per-step draws.

Every random draw of a training step (batch order, crops, VAE sampling noise, diffusion noise, timesteps) comes from a
generator seeded by `(unit seed, step)`, never from global state: a step can be replayed alone, so resuming from a
checkpoint, splitting classes across processes or training classes in another order gives bit-identical adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..data import DatasetInputError, decode_images, labels_of
from ..few_shot import FewShotManifest, load_manifest_dataset
from .modes import get_mode

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import GeneratorTrainingConfig
    from .latent_cache import LatentCache


@dataclass
class FewShotData:
    """The K-shot images of stage 1: decoded RGB images, their labels and the manifest they come from."""

    images: list[Image.Image]
    labels: list[int]
    class_names: list[str]
    manifest: FewShotManifest

    @classmethod
    def from_dataset(cls, dataset: Dataset, manifest: FewShotManifest) -> FewShotData:
        """Selects (and decodes) the manifest's rows of a dataset normalized by
        `datadream_hf.data.load_labelled_dataset`."""
        subset = manifest.select(dataset)
        return cls(decode_images(subset), [int(x) for x in labels_of(subset)], list(manifest.class_names), manifest)


def load_few_shot_data(config: GeneratorTrainingConfig) -> FewShotData:
    """Loads `config.dataset` with the manifest's classes and names (`config.class_names` may repeat them) and selects
    the rows of `config.few_shot_manifest`; errors name the missing input."""
    for name in ("dataset", "few_shot_manifest"):
        if not getattr(config, name):
            raise DatasetInputError(
                f"`{name}` is required: stage 1 trains on the K-shot images the manifest picks from the dataset "
                "(draw it with `datadream-hf few-shot`)."
            )
    manifest = FewShotManifest.load(config.few_shot_manifest)
    manifest.check_split(config.dataset, config.split, "--split")
    dataset = load_manifest_dataset(
        manifest, config.dataset, config.split, config.image_column, config.label_column, config.class_names
    )
    return FewShotData.from_dataset(dataset, manifest)


# Domain tags of the seed streams, so that e.g. the shuffle of epoch 3 and the noise of step 3 are independent.
_INIT, _SHUFFLE, _STEP = 0, 1, 2


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (numpy SeedSequence mixes them, no collisions)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device="cpu").manual_seed(seed)


def init_generator(unit_seed: int) -> torch.Generator:
    """The generator that draws a unit's initial LoRA weights."""
    return seeded_generator(unit_seed, _INIT)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is `size` (torchvision `Resize(size)` on a PIL image, as the reference)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, resample=Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` of an image at least `size` on each side (LoFT's crop)."""
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


@dataclass
class TrainingUnit:
    """The data of one adapter: all N*K images in dset mode, one class's K images in cls mode, one image in image mode.

    Attributes:
        name: `"all"` (dset), the class name (cls) or `"<class folder>/image_<row>"` (image).
        folder: where its adapter goes, relative to the output dir (`"."` for dset).
        seed: the unit seed every random draw derives from.
        images: resized (shorter side = resolution) tensors (3, H, W) in [-1, 1]; uncropped (each step crops at
            random), or already center-cropped to (3, resolution, resolution) with `center_crop`.
        prompt_ids: (num_images, seq_len) token ids of each image's class prompt.
        class_indices: the class index of each image.
    """

    name: str
    folder: str
    seed: int
    images: list[torch.Tensor]
    prompt_ids: torch.Tensor
    class_indices: list[int]

    def __len__(self) -> int:
        return len(self.images)


def make_unit(
    name: str,
    folder: str,
    seed: int,
    images: list[Image.Image],
    class_indices: list[int],
    class_prompt_ids: torch.Tensor,
    resolution: int,
    center_crop_images: bool = False,
) -> TrainingUnit:
    """Resizes the images once (the resize is deterministic; only the crop is random) and gathers their prompt ids.

    With `center_crop_images` (LoFT's CenterCrop) the crop is made here too: the steps' random crop of an image of
    exactly the resolution then always takes all of it.
    """
    if not images:
        raise ValueError(f"Training unit {name!r} has no images; check the few-shot manifest.")
    resized = [resize_shorter_side(image.convert("RGB"), resolution) for image in images]
    if center_crop_images:
        resized = [center_crop(image, resolution) for image in resized]
    tensors = [image_to_tensor(image) for image in resized]
    prompt_ids = class_prompt_ids[torch.tensor(class_indices)]  # (num_images, seq_len)
    return TrainingUnit(name, folder, seed, tensors, prompt_ids, list(class_indices))


def build_units(
    config: GeneratorTrainingConfig, data: FewShotData, tokenizer, process_index: int = 0, num_processes: int = 1
) -> list[TrainingUnit]:
    """The adapters this process trains (`adapt.modes`): dset -> the one over all images; cls and image -> adapters
    i (classes, images) with i % P == rank."""
    template = config.prompt_template()
    class_prompt_ids = tokenize_prompts(tokenizer, [template(name) for name in data.class_names])
    mode = get_mode(config.mode)
    specs = mode.units(config.seed, data.class_names, data.labels, data.manifest.indices)
    if mode.splits_adapters:
        specs = [spec for i, spec in enumerate(specs) if i % num_processes == process_index]
    return [
        make_unit(spec.name, spec.folder, spec.seed, [data.images[p] for p in spec.positions],
                  [data.labels[p] for p in spec.positions], class_prompt_ids, config.resolution, config.center_crop)
        for spec in specs
    ]  # fmt: skip


def tokenize_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), model_max_length) ids, padded and truncated like the SD pipelines do; given a list of tokenizers
    (SDXL, SD3: one per text encoder), their ids side by side (len(prompts), sum of their lengths)."""
    tokenizers = tokenizer if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    ids = [
        t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
        for t in tokenizers
    ]
    return torch.cat(ids, dim=1)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Batches per epoch; the last batch of an epoch may be smaller (the reference's DataLoader keeps it)."""
    return math.ceil(num_images / batch_size)


def total_steps(num_images: int, batch_size: int, num_epochs: int, max_train_steps: int | None) -> int:
    """Optimization steps of a unit: `max_train_steps` if set, else epochs * steps per epoch."""
    if max_train_steps is not None:
        return max_train_steps
    return num_epochs * steps_per_epoch(num_images, batch_size)


def unit_steps(unit: TrainingUnit, config: GeneratorTrainingConfig) -> int:
    """Optimization steps of `unit` under `config` (`total_steps` of its images)."""
    return total_steps(len(unit), config.train_batch_size, config.num_train_epochs, config.max_train_steps)


def batch_indices(unit: TrainingUnit, step: int, batch_size: int) -> torch.Tensor:
    """Which images step `step` trains on: epoch `step // steps_per_epoch` is a seeded permutation of the unit."""
    per_epoch = steps_per_epoch(len(unit), batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(len(unit), generator=seeded_generator(unit.seed, _SHUFFLE, epoch))
    return order[position * batch_size : (position + 1) * batch_size]


@dataclass
class StepBatch:
    """Everything a training step consumes, drawn for the whole batch so any slice of it is the same draw.

    pixel_values (B, 3, R, R) in [-1, 1]; input_ids (B, seq_len); latent_noise (B, C, R/f, R/f) reparametrizes the VAE
    posterior sample; noise (B, C, R/f, R/f) is the diffusion noise; timesteps (B,). latent_mean and latent_std
    (B, C, R/f, R/f) are the crops' VAE posterior when a `LatentCache` supplied it (the step then skips the VAE).
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    latent_noise: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None

    def slice(self, start: int, stop: int) -> StepBatch:
        cached = (None if t is None else t[start:stop] for t in (self.latent_mean, self.latent_std))
        return StepBatch(*(t[start:stop] for t in self.as_tuple()), *cached)

    @classmethod
    def concat(cls, batches: list[StepBatch]) -> StepBatch:
        """The batches one after the other (the super-batch of grouped cls training)."""
        tensors = [torch.cat(parts) for parts in zip(*(b.as_tuple() for b in batches))]
        cached = all(b.latent_mean is not None for b in batches)
        means = torch.cat([b.latent_mean for b in batches]) if cached else None
        stds = torch.cat([b.latent_std for b in batches]) if cached else None
        return cls(*tensors, means, stds)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.pixel_values, self.input_ids, self.latent_noise, self.noise, self.timesteps

    def __len__(self) -> int:
        return len(self.timesteps)


def make_step_batch(
    unit: TrainingUnit,
    step: int,
    batch_size: int,
    resolution: int,
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    latent_cache: LatentCache | None = None,
) -> StepBatch:
    """Draws step `step` of `unit`: its images, RandomCrop(resolution) of each, VAE noise, noise and timesteps.

    The draws come in a fixed order from one generator seeded by `(unit.seed, step)`. With `latent_cache` (built
    over `unit.images`), the batch also carries the crops' cached VAE posteriors.
    """
    indices = batch_indices(unit, step, batch_size)
    generator = seeded_generator(unit.seed, _STEP, step)
    crops, keys = [], []
    for i in indices.tolist():
        image = unit.images[i]
        height, width = image.shape[-2:]
        # RandomCrop as torchvision draws it: top, then left, uniform over the valid offsets.
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        crops.append(image[:, top : top + resolution, left : left + resolution])
        keys.append((i, top, left))
    count = len(indices)
    latent_noise = torch.randn((count, *latent_shape), generator=generator)
    noise = torch.randn((count, *latent_shape), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (count,), generator=generator)  # t ~ U[0, T)
    cached = latent_cache.lookup(keys) if latent_cache is not None else (None, None)
    return StepBatch(torch.stack(crops), unit.prompt_ids[indices], latent_noise, noise, timesteps, *cached)
