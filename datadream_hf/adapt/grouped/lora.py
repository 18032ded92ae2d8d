"""Grouped LoRA: the adapters of several classes in one model, each sample of a batch routed to its class's factors.

`GroupedLoraLinear` (`datadream_hf.grouped_lora`, shared with stage 2's fusion) holds per-class stacks A (G, r, in)
and B (G, out, r) over one frozen `nn.Linear`. `GroupedLora`
swaps such layers into a stage-1 model in place of its peft LoRA layers (so the targeted modules are the same), draws
each class's init with the sequential path's own code, and copies a class back into the peft layers to export it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ...grouped_lora import GroupedLoraLinear, contiguous_block_size
from ...lora import ADAPTER_NAME

if TYPE_CHECKING:
    from ..modeling import GeneratorModels


@dataclass
class _Slot:
    """Where one peft LoRA layer sits in its model, and the grouped layer that replaces it while attached."""

    component: str
    name: str
    parent: nn.Module
    attribute: str
    peft_layer: LoraLayer
    grouped: GroupedLoraLinear


class GroupedLora:
    """The grouped layers of a stage-1 model (`GeneratorModels` with its peft adapter), one adapter per group.

    Every peft LoRA layer of the denoiser and text encoders gets a `GroupedLoraLinear` over the same base layer. The
    peft layers stay untouched while the grouped ones are attached (`with grouped.attached(): ...`) and are put back on
    exit, so the model is usable by the sequential path again; `copy_to_peft(g)` loads group g into them for export.

    Parameter order and names are those of `models.trainable_parameters()`, so one group's slices form exactly the
    state (weights, optimizer moments) the sequential path has for that class, and are checkpointed in its format.
    """

    def __init__(self, models: GeneratorModels, num_groups: int):
        self.models = models
        self.num_groups = num_groups
        self.slots: list[_Slot] = []
        for component, model in models.lora_components().items():
            for name, module in model.named_modules():
                if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                    continue
                base = module.get_base_layer()
                if not isinstance(base, nn.Linear) or module.use_dora.get(ADAPTER_NAME, False):
                    raise TypeError(f"Grouped LoRA supports plain LoRA on nn.Linear; {component}.{name} is {module}.")
                if module.lora_dropout[ADAPTER_NAME].__class__ is not nn.Identity:
                    raise ValueError(f"Grouped LoRA assumes no LoRA dropout (stage 1 uses none); {component}.{name}.")
                parent_name, _, attribute = name.rpartition(".")
                grouped = GroupedLoraLinear(base, num_groups, module.r[ADAPTER_NAME], module.scaling[ADAPTER_NAME])
                self.slots.append(_Slot(component, name, model.get_submodule(parent_name), attribute, module, grouped))
        if not self.slots:
            raise ValueError("The model has no peft LoRA layers to group; load it with `load_generator_models`.")
        # The sequential path's parameter names, in its order, each mapped to (slot, factor).
        factors = {}
        for slot in self.slots:
            factors[id(slot.peft_layer.lora_A[ADAPTER_NAME].weight)] = (slot, "lora_A")
            factors[id(slot.peft_layer.lora_B[ADAPTER_NAME].weight)] = (slot, "lora_B")
        trainable = models.trainable_parameters()
        unknown = [name for name, p in trainable.items() if id(p) not in factors]
        if unknown:
            raise ValueError(f"Trainable parameters outside the LoRA layers cannot be grouped: {unknown[:3]}.")
        self._factors = [(name, *factors[id(p)]) for name, p in trainable.items()]
        self._attached = False

    # --- parameters ---------------------------------------------------------------------------------------------

    def parameters(self) -> dict[str, nn.Parameter]:
        """The stacks, named and ordered as the sequential path's parameters (each stack: that name for all groups)."""
        return {name: getattr(slot.grouped, factor) for name, slot, factor in self._factors}

    def group_parameters(self, group: int) -> dict[str, torch.Tensor]:
        """Views of group `group`'s slices: exactly the sequential path's `trainable_parameters()` for that class."""
        return {name: stack[group] for name, stack in self.parameters().items()}

    @torch.no_grad()
    def init_groups_(self, init: Callable[[int], None]) -> None:
        """Sets group g to the LoRA init `init(g)` draws into the peft layers (call it while detached).

        Passing the sequential path's own init (`init_lora_weights_` with class g's seed) makes each group start
        exactly where that class's sequential run starts.
        """
        if self._attached:
            raise RuntimeError("Initialise groups while the peft layers are in place (outside `attached()`).")
        for group in range(self.num_groups):
            init(group)
            for slot in self.slots:
                slot.grouped.lora_A[group].copy_(slot.peft_layer.lora_A[ADAPTER_NAME].weight)
                slot.grouped.lora_B[group].copy_(slot.peft_layer.lora_B[ADAPTER_NAME].weight)

    @torch.no_grad()
    def copy_to_peft(self, group: int) -> None:
        """Loads group `group` into the peft layers, e.g. to save it with `save_generator_lora` (call it detached)."""
        for slot in self.slots:
            slot.peft_layer.lora_A[ADAPTER_NAME].weight.copy_(slot.grouped.lora_A[group])
            slot.peft_layer.lora_B[ADAPTER_NAME].weight.copy_(slot.grouped.lora_B[group])

    # --- swapping and routing -----------------------------------------------------------------------------------

    @contextmanager
    def attached(self) -> Iterator[GroupedLora]:
        """Replaces the peft layers by the grouped ones for the duration of the block, then puts them back."""
        for slot in self.slots:
            setattr(slot.parent, slot.attribute, slot.grouped)
        self._attached = True
        try:
            yield self
        finally:
            for slot in self.slots:
                setattr(slot.parent, slot.attribute, slot.peft_layer)
            self._attached = False
            self.route(None)

    def route(self, group_index: torch.Tensor | None, components: tuple[str, ...] | None = None) -> None:
        """Sets which group each sample of the next forward (and its backward) uses in `components` (pipeline names;
        None: all): (B,) ints."""
        block_size = None
        if group_index is not None:
            group_index = group_index.to(dtype=torch.long)  # checked where it was made (the CPU): no GPU sync
            if group_index.numel() and not 0 <= int(group_index.min()) <= int(group_index.max()) < self.num_groups:
                raise ValueError(f"Group indices must lie in [0, {self.num_groups}), got {group_index.tolist()}.")
            block_size = contiguous_block_size(group_index, self.num_groups)
            group_index = group_index.to(self.slots[0].grouped.lora_A.device)
        for slot in self.slots:
            if components is None or slot.component in components:
                slot.grouped.group_index = group_index
                slot.grouped.block_size = block_size


@torch.no_grad()
def clip_grad_norm_per_group_(stacks: list[torch.Tensor], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` applied to each group's slices on its own; returns the (G,) norms.

    Group g's norm is the 2-norm over the g-th slice of every stack's gradient, and its slices are scaled by
    min(1, max_norm / (norm + eps)): what clipping that class's adapter alone does.
    """
    grads = [p.grad for p in stacks if p.grad is not None]
    per_stack = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # (P, G)
    norms = per_stack.norm(dim=0)  # (G,)
    coefficients = (max_norm / (norms + eps)).clamp(max=1.0)  # (G,)
    for g in grads:
        g.mul_(coefficients.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms
