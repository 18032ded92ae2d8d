"""Settings that run but are unwise, or that a command should refuse, on this machine and model: fp16 on a CPU, a
resolution far from the model's native size, a warm-up as long as the run. Each is refused with its fix, or warned
about once, clearly."""

from __future__ import annotations

import logging

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

RESOLUTION_FACTOR = 2  # a resolution beyond 2x (or below 1/2) the native size is warned about


def fp16_on_cpu(precision: str | None, device: torch.device | str) -> bool:
    return precision in ("fp16", "float16") and torch.device(device).type == "cpu"


def fp16_on_cpu_message(argument: str, fix: str) -> str:
    return (
        f"{argument} asks for fp16 on a CPU (no GPU is visible): CPUs compute fp16 slowly (stage 2 measured ~4x "
        f"slower than fp32) and with less precision. {fix}"
    )


def refuse_fp16_on_cpu(precision: str | None, device: torch.device | str, argument: str, fix: str) -> None:
    """Refuses an fp16 request on a CPU, naming the setting (`argument`) and the `fix`."""
    if fp16_on_cpu(precision, device):
        raise InputError(fp16_on_cpu_message(argument, fix))


def native_resolution(unet, vae_scale_factor: int) -> int:
    """The image side a latent diffusion model was trained at: the UNet's latent `sample_size` x the VAE's factor."""
    return unet.config.sample_size * vae_scale_factor


def warn_far_resolution(resolution: int, native: int, argument: str = "--resolution") -> bool:
    """Warns (once per call) when `resolution` is more than `RESOLUTION_FACTOR` times away from `native`; returns
    whether it did."""
    if native * RESOLUTION_FACTOR >= resolution >= native / RESOLUTION_FACTOR:
        return False
    cost = (resolution / native) ** 2
    logger.warning(
        f"{argument} {resolution} is far from this model's native {native} px: each step costs ~{cost:.3g}x the "
        f"native one and the model never saw images of that size. Pass {argument} {native} unless this is meant."
    )
    return True


def warn_long_warmup(warmup_steps: int, total_steps: int, argument: str, learning_rate: float) -> bool:
    """Warns (once per call) when the linear warm-up lasts the whole run: the learning rate never reaches its peak."""
    if total_steps < 1 or warmup_steps < total_steps:
        return False
    logger.warning(
        f"{argument} {warmup_steps} is not shorter than the run ({total_steps} steps): the learning rate never "
        f"reaches {learning_rate:g} (it stops at {total_steps / warmup_steps:.0%} of it). Pass a smaller {argument} "
        f"(e.g. {total_steps // 10}) or train longer."
    )
    return True
