"""Cached VAE posteriors of the few-shot images: each image is encoded once per crop offset instead of at every step.

The reference encodes every batch (`vae.encode(x).latent_dist.sample()`). The VAE is frozen, so the posterior of an
image crop never changes: caching its mean and std and sampling `mean + std * noise` with the step's own noise is the
same computation (equal up to float summation order, since the batch composition of the encode differs). RandomCrop
makes one posterior per crop offset, so a unit is cached only when every image has few offsets (e.g. square images:
one); otherwise exact caching would cost more encodes than it saves, and the step encodes as before.
"""

from __future__ import annotations

import torch

# At most this many crop offsets per image are cached: the reference trains K=16 images for 400 steps of 8, i.e.
# ~200 uses per image, so precomputing up to 16 variants per image is always far cheaper than encoding every step.
MAX_CACHED_CROPS = 16


def encode_posterior(
    vae: torch.nn.Module, pixel_values: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) of `pixel_values` (B, 3, R, R) in [-1, 1], each (B, C, R/f, R/f)."""
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(device, dtype=dtype)).latent_dist
    return posterior.mean, posterior.std


def crop_offsets(image: torch.Tensor, resolution: int) -> list[tuple[int, int]]:
    """Every (top, left) RandomCrop(resolution) can pick on a (3, H, W) image."""
    height, width = image.shape[-2:]
    return [(top, left) for top in range(height - resolution + 1) for left in range(width - resolution + 1)]


class LatentCache:
    """(mean, std) of the VAE posterior of every (image, crop offset) of a training unit, on the training device."""

    def __init__(self, posteriors: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]]):
        self.posteriors = posteriors

    @classmethod
    def build(
        cls,
        vae: torch.nn.Module,
        images: list[torch.Tensor],
        resolution: int,
        dtype: torch.dtype,
        device: torch.device,
        max_crops: int = MAX_CACHED_CROPS,
        batch_size: int = 8,
    ) -> LatentCache | None:
        """Encodes every crop of every image, `batch_size` crops at a time in (image, offset) order.

        The chunks depend only on the images, so the cache is the same in every process and every run. Returns None
        (do not cache) when an image has more than `max_crops` crop offsets.
        """
        offsets = [crop_offsets(image, resolution) for image in images]
        if any(len(o) > max_crops for o in offsets):
            return None
        keys = [(i, top, left) for i, image_offsets in enumerate(offsets) for top, left in image_offsets]
        posteriors = {}
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            crops = [images[i][:, top : top + resolution, left : left + resolution] for i, top, left in chunk]
            mean, std = encode_posterior(vae, torch.stack(crops), dtype, device)  # each (b, C, h, w)
            posteriors.update({key: (mean[j], std[j]) for j, key in enumerate(chunk)})
        return cls(posteriors)

    def lookup(self, keys: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, C, h, w), of the (image index, top, left) crops `keys`."""
        means, stds = zip(*(self.posteriors[key] for key in keys))
        return torch.stack(means), torch.stack(stds)

    def __len__(self) -> int:
        return len(self.posteriors)
