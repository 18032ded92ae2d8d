"""The grouped LoRA layer: G LoRA adapters over one frozen `nn.Linear`, each sample of a batch routed to one of them
(stage 1's grouped training) or to a weighted mix of several (stage 2's LoFT fusion, `generate.fusion`).

`GroupedLoraLinear` holds per-adapter stacks A (G, r, in) and B (G, out, r); whoever swaps it into a model sets the
route before each forward.
"""

from __future__ import annotations

import torch
from torch import nn


class GroupedLoraLinear(nn.Module):
    """`base(x) + scaling * B_g(A_g(x))` with g = `group_index[sample]`: peft's vanilla LoRA forward, per sample.

    When the samples come in equal contiguous blocks, one per group in order (as grouped training builds its batches;
    `contiguous_block_size` detects it), each group's block is multiplied by its factors as one matrix: the same
    matmul shapes as peft's layer on that class's batch, and no per-sample copies of the factors (nor their
    scatter-add in the backward). Other layouts gather each sample's factors.

    A mixture route (`set_mixture`) instead gives sample i the sum over m of `weights[i, m] * group_scaling[g] *
    B_g(A_g(x))` with g = `groups[i, m]`: what peft computes with several active adapters and per-adapter scales
    (diffusers' `set_adapters([a, b], adapter_weights=[wa, wb])`). Each sample's M adapters are gathered once per
    route into rank-(M * r) factors, the weights folded into B, so a forward costs two batched matmuls whatever M is.

    Args:
        base_layer: the frozen `nn.Linear` (any dtype).
        num_groups: G, the number of adapters held.
        rank: r (adapters of lower rank fit with zero rows: zero rows add exactly nothing).
        scaling: lora_alpha / r, of every group (`group_scaling` may set one per group for mixtures).
        dtype: of the factors; fp32 (default) as peft keeps them for training.
    """

    def __init__(
        self, base_layer: nn.Linear, num_groups: int, rank: int, scaling: float, dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        device, d_in, d_out = base_layer.weight.device, base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.zeros(num_groups, rank, d_in, device=device, dtype=dtype))  # (G, r, in)
        self.lora_B = nn.Parameter(torch.zeros(num_groups, d_out, rank, device=device, dtype=dtype))  # (G, out, r)
        self.register_buffer("group_scaling", torch.full((num_groups,), float(scaling), device=device), False)  # (G,)
        self.group_index: torch.Tensor | None = None  # (B,), set by the owner's route before each forward
        self.block_size: int | None = None  # n when group_index is [0]*n + [1]*n + ... + [G-1]*n
        self.mixture: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, M*r, in), (B, out, M*r): `set_mixture`

    def set_mixture(self, groups: torch.Tensor | None, weights: torch.Tensor | None = None) -> None:
        """Routes sample i to the mix of adapters `groups[i]` (B, M) with `weights[i]` (B, M); None clears it.

        The factors are gathered here, once: set the route again after changing the stacks.
        """
        self.group_index, self.block_size = None, None
        if groups is None:
            self.mixture = None
            return
        batch, m = groups.shape
        rank = self.lora_A.shape[1]
        scale = weights.to(self.group_scaling) * self.group_scaling[groups]  # (B, M)
        a = self.lora_A[groups].reshape(batch, m * rank, -1)  # (B, M, r, in) -> (B, M*r, in)
        b = self.lora_B[groups] * scale[..., None, None].to(self.lora_B.dtype)  # (B, M, out, r)
        b = b.permute(0, 2, 1, 3).reshape(batch, -1, m * rank)  # (B, out, M, r) -> (B, out, M*r)
        self.mixture = (a.contiguous(), b.contiguous())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.mixture is not None and self.group_index is None:
            a, b = self.mixture
            if a.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"GroupedLoraLinear got a batch of {x.shape[0]} but a mixture route for {a.shape[0]} samples: "
                    "route one mixture per sample of the batch this layer sees."
                )
            h = torch.bmm(x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2))  # (B, T, M*r)
            # result + h @ b^T as one matmul whose epilogue adds result (the scales are in b): at inference the LoRA
            # costs a read of x and a read-write of the output, not the four passes of separate matmul and add.
            base = result.to(a.dtype).reshape(x.shape[0], -1, result.shape[-1])  # (B, T, out)
            return torch.baddbmm(base, h, b.transpose(1, 2)).reshape(result.shape).to(result.dtype)
        index = self.group_index
        if index is None or index.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"GroupedLoraLinear got a batch of {x.shape[0]} but a group index of "
                f"{None if index is None else tuple(index.shape)}: call `GroupedLora.route` with one group per sample."
            )
        h = x.to(self.lora_A.dtype)
        if self.block_size is not None:
            # Every group's samples form one contiguous block of n: one (n * T, in) matrix per group, no gather.
            h = h.reshape(self.lora_A.shape[0], -1, x.shape[-1])  # (G, n * T, in)
            a, b = self.lora_A, self.lora_B  # (G, r, in), (G, out, r)
        else:
            h = h.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in); (B, in) inputs get T = 1
            a, b = self.lora_A[index], self.lora_B[index]  # (B, r, in), (B, out, r): each sample's factors
        lora = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (., ., r) -> (., ., out)
        # The same order of operations as peft: result + lora_B(lora_A(x)) * scaling, back in the base dtype.
        return (result + lora.reshape(result.shape) * self.scaling).to(result.dtype)


def contiguous_block_size(group_index: torch.Tensor, num_groups: int) -> int | None:
    """n if `group_index` is n samples of group 0, then n of group 1, ..., then n of group G-1; else None."""
    size, remainder = divmod(group_index.numel(), num_groups)
    if size == 0 or remainder:
        return None
    blocks = torch.arange(num_groups, device=group_index.device).repeat_interleave(size)
    return size if torch.equal(group_index, blocks) else None
