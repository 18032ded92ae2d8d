"""Stage-3 image transforms: the reference classifier's training augmentation in PIL (no torchvision), the eval
transform of the CLIP processor, and MixUp/CutMix on a batch."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..data import to_rgb

AUGMENTATIONS = ("datadream", "none")
MIX_AUGMENTATIONS = ("none", "mixup", "cutmix", "mixup_or_cutmix")

# torchvision's RandAugment splits each op's range into 31 bins; the reference uses the default magnitude 9.
RAND_AUGMENT_BINS = 31


def _bin(low: float, high: float, magnitude: int) -> float:
    return low + (high - low) * magnitude / (RAND_AUGMENT_BINS - 1)


def _affine(image: Image.Image, coefficients: tuple) -> Image.Image:
    # Geometric RandAugment ops fill uncovered pixels with black and resample with nearest, as torchvision does.
    return image.transform(image.size, Image.AFFINE, coefficients, resample=Image.NEAREST, fillcolor=(0, 0, 0))


def rand_augment(image: Image.Image, rng: random.Random, num_ops: int = 2, magnitude: int = 9) -> Image.Image:
    """torchvision's `RandAugment(num_ops, magnitude)` op set and magnitude table, on an RGB PIL image."""
    width, height = image.size
    for _ in range(num_ops):
        op = rng.randrange(14)
        sign = -1.0 if rng.random() < 0.5 else 1.0
        if op == 0:  # identity
            continue
        elif op == 1:  # shear x
            image = _affine(image, (1, sign * _bin(0, 0.3, magnitude), 0, 0, 1, 0))
        elif op == 2:  # shear y
            image = _affine(image, (1, 0, 0, sign * _bin(0, 0.3, magnitude), 1, 0))
        elif op == 3:  # translate x, up to 150/331 of the width at full magnitude
            image = _affine(image, (1, 0, sign * _bin(0, 150 / 331 * width, magnitude), 0, 1, 0))
        elif op == 4:  # translate y
            image = _affine(image, (1, 0, 0, 0, 1, sign * _bin(0, 150 / 331 * height, magnitude)))
        elif op == 5:  # rotate
            image = image.rotate(sign * _bin(0, 30, magnitude), resample=Image.NEAREST, fillcolor=(0, 0, 0))
        elif op in (6, 7, 8, 9):  # brightness, color (saturation), contrast, sharpness
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Color, ImageEnhance.Contrast, ImageEnhance.Sharpness)
            image = enhancer[op - 6](image).enhance(1.0 + sign * _bin(0, 0.9, magnitude))
        elif op == 10:  # posterize: 8 bits at magnitude 0 down to 4 bits at the top bin
            image = ImageOps.posterize(image, 8 - round(magnitude / ((RAND_AUGMENT_BINS - 1) / 4)))
        elif op == 11:  # solarize: threshold 255 at magnitude 0 down to 0 at the top bin
            image = ImageOps.solarize(image, _bin(255, 0, magnitude))
        elif op == 12:
            image = ImageOps.autocontrast(image)
        else:
            image = ImageOps.equalize(image)
    return image


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` as a PIL box (left, upper, right, lower)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    # Fallback: the largest centered crop with an aspect ratio inside `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def color_jitter(image: Image.Image, rng: random.Random, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision's `ColorJitter`: the four adjustments in a random order, each with a uniform random factor."""
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    for op in order:
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(rng.uniform(1 - saturation, 1 + saturation))
        else:
            shift = round(rng.uniform(-hue, hue) * 255)
            h, s, v = image.convert("HSV").split()
            h = h.point(lambda x: (x + shift) % 256)  # hue is circular
            image = Image.merge("HSV", (h, s, v)).convert("RGB")
    return image


class ImageNormalizer:
    """The image processor's rescale + normalize, on an image already at the model's resolution."""

    def __init__(self, image_processor):
        self.rescale_factor = image_processor.rescale_factor if image_processor.do_rescale else 1.0
        do_normalize = image_processor.do_normalize
        self.mean = np.asarray(image_processor.image_mean if do_normalize else 0.0, dtype=np.float32)
        self.std = np.asarray(image_processor.image_std if do_normalize else 1.0, dtype=np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * self.rescale_factor  # (H, W, 3)
        pixels = (pixels - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


def processor_image_size(image_processor) -> int:
    """The square side the model sees: the processor's center-crop size (CLIP), else its resize size (SigLIP, ViT:
    `height` x `width`; ConvNeXt: `shortest_edge`)."""
    crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    crop = crop if isinstance(crop, dict) else crop.__dict__
    if crop.get("height") is None and crop.get("shortest_edge") is not None:
        return int(crop["shortest_edge"])
    if crop.get("height") != crop.get("width"):
        raise ValueError(f"Only square image sizes are supported; the image processor has {crop}.")
    return int(crop["height"])


class DataDreamAugmentation:
    """The reference classifier's training transform (DataDream `classify/data.py`), then the processor's
    normalization: RandAugment(2, 9) -> RandomResizedCrop(size, scale 0.25-1, bicubic) -> horizontal flip ->
    ColorJitter(.4, .4, .2, .1) p=.8 -> Grayscale p=.2 -> GaussianBlur(radius 0.1-2) p=.2 -> Solarize(128) p=.2.

    Called with a per-draw `seed` (what `RealSyntheticBatchSampler` gives each sample, through
    `ImageClassificationDataset`), the augmentation depends on that seed alone: the same in a resumed run and for any
    number of workers or processes. Without one, draws come from a `random.Random` stream seeded by `seed` and the
    dataloader worker id, so runs repeat under a seed and workers do not draw the same crops.
    """

    def __init__(self, image_processor, seed: int = 0, size: int | None = None, crop_scale=(0.25, 1.0)):
        self.size = size or processor_image_size(image_processor)
        self.normalize = ImageNormalizer(image_processor)
        self.seed = seed
        self.crop_scale = tuple(crop_scale)
        self._rngs: dict[int, random.Random] = {}

    def _rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if worker not in self._rngs:
            self._rngs[worker] = random.Random(f"datadream-augment-{self.seed}-{worker}")
        return self._rngs[worker]

    def augment(self, image: Image.Image, seed: int | None = None) -> Image.Image:
        """The augmented PIL image at `size` x `size`, before normalization; `seed` fixes this draw."""
        rng = random.Random(seed) if seed is not None else self._rng()
        image = rand_augment(to_rgb(image), rng)  # to_rgb: 16-bit images are rescaled, not clipped
        box = random_resized_crop_box(*image.size, rng, scale=self.crop_scale)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if rng.random() < 0.8:
            image = color_jitter(image, rng)
        if rng.random() < 0.2:
            image = image.convert("L").convert("RGB")
        if rng.random() < 0.2:
            image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < 0.2:
            image = ImageOps.solarize(image, 128)
        return image

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        return self.normalize(self.augment(image, seed))


class EvalTransform:
    """The model's image processor itself (CLIP: resize the shorter side, center crop, rescale and normalize)."""

    deterministic = True  # the same image always gives the same tensor: `ImageClassificationDataset` may cache it

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]


def build_transforms(image_processor, augmentation: str = "datadream", seed: int = 0) -> tuple[Callable, Callable]:
    """The (train, eval) image transforms; `augmentation="none"` trains on the eval transform."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"`augmentation` must be one of {AUGMENTATIONS}, got {augmentation!r}.")
    eval_transform = EvalTransform(image_processor)
    if augmentation == "none":
        return eval_transform, eval_transform
    return DataDreamAugmentation(image_processor, seed=seed), eval_transform


def mix_batch(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    mode: str,
    rng: np.random.Generator,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a batch, each sample mixed with another of its own group (real with real, synthetic with
    synthetic), so the real/synthetic loss split keeps its meaning.

    Returns `(mixed_pixel_values, partner_labels, weight)`: the target of sample i is `weight` on `labels[i]` and
    `1 - weight` on `partner_labels[i]` (one weight per batch, as in the usual implementations).
    """
    if mode not in MIX_AUGMENTATIONS[1:]:
        raise ValueError(f"`mode` must be one of {MIX_AUGMENTATIONS[1:]}, got {mode!r}.")
    if mode == "mixup_or_cutmix":
        mode = "mixup" if rng.random() < 0.5 else "cutmix"
    partner = torch.arange(len(labels), device=labels.device)
    for group in groups.unique():
        members = torch.nonzero(groups == group).flatten()
        partner[members] = members[torch.from_numpy(rng.permutation(len(members))).to(labels.device)]
    lam = float(rng.beta(alpha, alpha))
    if mode == "mixup":
        mixed = lam * pixel_values + (1.0 - lam) * pixel_values[partner]
    else:
        height, width = pixel_values.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1.0 - lam)), int(width * math.sqrt(1.0 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = pixel_values.clone()
        mixed[..., top:bottom, left:right] = pixel_values[partner][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the area actually kept
    weight = torch.full((len(labels),), lam, dtype=pixel_values.dtype, device=pixel_values.device)
    return mixed, labels[partner], weight
