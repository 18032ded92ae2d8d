"""AdamW and fp16 loss scaling for grouped LoRA stacks: the G adapters held in (G, ...) tensors step as G separate
`torch.optim.AdamW` + `torch.amp.GradScaler` pairs would.

One shared AdamW and one shared scaler would couple the classes: a step that overflows for one class would be skipped
for all, and AdamW's step count (its bias correction) is one number per tensor. Here each group has its own loss
scale, growth tracker and step count, and a step skipped for an overflow leaves only that group untouched.
"""

from __future__ import annotations

import torch


def _per_group(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(G,) -> (G, 1, ..., 1), broadcastable against the (G, ...) tensor `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class GroupedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as `torch.optim.AdamW`) over stacks whose leading dimension is the group.

    `step(active)` updates only the groups where `active` (G,) is True; each group counts its own steps. The
    per-parameter state is `step` (G,), `exp_avg` and `exp_avg_sq`: group g's slices are exactly the state a
    `torch.optim.AdamW` over that group's tensors holds, and `param_groups` carry AdamW's defaults, so a group's
    slice of `state_dict()` loads into a plain AdamW (and back).
    """

    def __init__(self, params, num_groups: int, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        defaults = {**torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults}
        defaults.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.num_groups = num_groups

    def load_state_dict(self, state_dict: dict) -> None:
        """`Optimizer.load_state_dict`, then each `step` (G,) moved to its parameter's device, where a fresh run keeps
        it: torch moves `exp_avg`/`exp_avg_sq` there but leaves a non-capturable `step` where it was loaded (the CPU,
        for checkpoints read from safetensors), and the (G, 1, ..) bias corrections would then mix devices."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None, active: torch.Tensor | None = None):
        if closure is not None:
            raise ValueError("GroupedAdamW.step takes no closure.")
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                mask = torch.ones(self.num_groups, dtype=torch.bool) if active is None else active.cpu()  # no GPU sync
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros(self.num_groups, dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                grad, every = param.grad, bool(mask.all())
                step = state["step"] + mask.to(state["step"])
                # torch.optim.AdamW's update with a bias correction per group (float64, as its Python floats): in
                # place when every group steps, else on copies that only the stepping groups take.
                exp_avg = state["exp_avg"] if every else state["exp_avg"].clone()
                exp_avg_sq = state["exp_avg_sq"] if every else state["exp_avg_sq"].clone()
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step.double().clamp(min=1)
                bias_correction2_sqrt = (1 - beta2 ** step.double().clamp(min=1)).sqrt()
                step_size = _per_group((lr / bias_correction1).to(param.dtype), param)
                denom = (exp_avg_sq.sqrt() / _per_group(bias_correction2_sqrt.to(param.dtype), param)).add_(eps)
                updated = param if every else param.clone()
                updated.mul_(1 - lr * weight_decay).sub_(step_size * exp_avg / denom)
                if not every:
                    keep = _per_group(mask.to(param.device), param)
                    param.copy_(torch.where(keep, updated, param))
                    state["exp_avg"] = torch.where(keep, exp_avg, state["exp_avg"])
                    state["exp_avg_sq"] = torch.where(keep, exp_avg_sq, state["exp_avg_sq"])
                state["step"] = step


class GroupedGradScaler:
    """`torch.amp.GradScaler`'s dynamic loss scaling with one scale and growth tracker per group.

    `scale(losses)` multiplies each group's loss (G,) by its scale; after the backward, `unscale_(stacks)` divides each
    group's gradients by its scale and returns which groups hold an inf/NaN; `update(found_inf)` backs off those
    groups' scales and grows the others' every `growth_interval` clean steps. Disabled (no fp16), it changes nothing.
    """

    def __init__(self, num_groups: int, enabled: bool = True, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):  # fmt: skip
        self.enabled = enabled
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scales = torch.full((num_groups,), init_scale, dtype=torch.float32)
        self.growth_trackers = torch.zeros(num_groups, dtype=torch.int64)

    def is_enabled(self) -> bool:
        return self.enabled

    def scale(self, losses: torch.Tensor) -> torch.Tensor:
        return losses * self.scales.to(losses.device) if self.enabled else losses

    @torch.no_grad()
    def unscale_(self, stacks: list[torch.Tensor]) -> torch.Tensor:
        """Unscales the gradients of `stacks` in place; returns found_inf (G,) bool (all False when disabled)."""
        found_inf = torch.zeros(self.scales.shape, dtype=torch.bool)
        if not self.enabled:
            return found_inf
        inverse = self.scales.double().reciprocal().float()  # as GradScaler computes its inverse scale
        for stack in stacks:
            if stack.grad is None:
                continue
            stack.grad.mul_(_per_group(inverse.to(stack.grad.device), stack.grad))
            found_inf |= ~torch.isfinite(stack.grad.flatten(1)).all(dim=1).cpu()
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        if not self.enabled:
            return
        grown = self.growth_trackers + 1
        grow = ~found_inf & (grown == self.growth_interval)
        self.scales = torch.where(found_inf, self.scales * self.backoff_factor, self.scales)
        self.scales = torch.where(grow, self.scales * self.growth_factor, self.scales)
        self.growth_trackers = torch.where(found_inf | grow, torch.zeros_like(grown), grown)

    def group_state_dict(self, group: int) -> dict:
        """Group g's state in `torch.amp.GradScaler.state_dict()`'s format."""
        return {"scale": float(self.scales[group]), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self.growth_trackers[group])}  # fmt: skip

    def load_group_state_dict(self, group: int, state_dict: dict) -> None:
        self.scales[group] = state_dict["scale"]
        self.growth_trackers[group] = state_dict["_growth_tracker"]
