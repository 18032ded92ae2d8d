"""The reference classifier's learning-rate schedule (DataDream `classify/utils.py`, `cosine_scheduler`): a linear
warm-up from the minimum lr to the peak, then a cosine from the peak down towards the minimum, a value per step."""

from __future__ import annotations

import math

import torch


def reference_lr(step: int, peak_lr: float, min_lr: float, num_training_steps: int, num_warmup_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based).

    1. Warm-up, steps 0..W-1: W evenly spaced values from `min_lr` to `peak_lr`, both included (the reference's
       `np.linspace(min_lr, lr, W)`).
    2. Cosine, steps W..T-1: `min_lr + (peak_lr - min_lr) * (1 + cos(pi * i / (T - W))) / 2` with i = step - W, so it
       starts at the peak and ends one step short of the minimum.
    """
    if step < num_warmup_steps:
        fraction = step / (num_warmup_steps - 1) if num_warmup_steps > 1 else 0.0
        return min_lr + (peak_lr - min_lr) * fraction
    decay_steps = max(num_training_steps - num_warmup_steps, 1)
    progress = min(step - num_warmup_steps, decay_steps) / decay_steps
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def reference_lr_schedule(
    optimizer: torch.optim.Optimizer, num_training_steps: int, num_warmup_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` that gives step `s` the learning rate `reference_lr(s, ...)` (peak: each group's initial lr)."""
    peak_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(peak_lr: float):
        if peak_lr <= 0:
            raise ValueError(f"The reference schedule needs a positive peak learning rate, got {peak_lr}.")
        return lambda step: reference_lr(step, peak_lr, min_lr, num_training_steps, num_warmup_steps) / peak_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(lr) for lr in peak_lrs])
