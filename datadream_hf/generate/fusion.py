"""LoFT's fusion in stage 2: which two of a class's per-image adapters make each image (`class_pairs`), and
`PairFusion`, which serves a batch of different pairs in one pipeline call.

LoFT (ExplainableML/LoFT, `generation/main.py`) loads a class's K per-image LoRAs as named adapters, shuffles all
K (K - 1) / 2 pairs, cycles them to the image count and calls `set_adapters([a, b], adapter_weights=[0.5, 0.5])` before
each single-image call. Here the class's K adapters are stacked in grouped LoRA layers (`datadream_hf.grouped_lora`)
and each sample of a batch is routed to its own pair, its two weights folded into rank-2r factors: one batched UNet
call for several pairs, and the same images as diffusers' `set_adapters` up to float rounding.
"""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..families import family_of_pipeline
from ..grouped_lora import GroupedLoraLinear
from .adapters import AdapterSet, LoraFactor, read_lora_factors
from .config import GenerationConfig, GenerationInputError


def check_fusion(adapters: AdapterSet, config: GenerationConfig) -> None:
    """Refuses, before the pipeline loads, fusion without image adapters, image adapters without fusion, and a class
    with fewer than two image adapters (no pair to fuse)."""
    if adapters.mode == "image" and config.fusion is None:
        raise GenerationInputError(
            f"{adapters.source!r} holds image-mode adapters (one LoRA per K-shot image, LoFT): pass --fusion pairs to "
            "mix two of a class's image adapters per image (--fusion_weights, default 0.5 0.5)."
        )
    if config.fusion is not None and adapters.mode != "image":
        what = "no adapter" if adapters.mode == "none" else f"{adapters.mode}-mode adapters in {adapters.source!r}"
        raise GenerationInputError(
            f"--fusion {config.fusion} mixes per-image adapters, but this run has {what}: pass the output of "
            "train_datadream_lora.py --mode image as --adapter_path, or leave --fusion unset."
        )
    if config.fusion is not None:
        for name, images in zip(adapters.class_names, adapters.images):
            if len(images) < 2:
                raise GenerationInputError(
                    f"Class {name!r} has {len(images)} image adapter(s) in {adapters.source!r}; --fusion pairs needs "
                    "at least 2 per class (K >= 2 in stage 1)."
                )


def class_pairs(num_adapters: int, seed: int, class_index: int) -> list[tuple[int, int]]:
    """Every pair of a class's adapters (`itertools.combinations` order), shuffled by a generator seeded by
    (seed, class index): image k of the class uses pair `k % len(pairs)`, so pairs are cycled to the image count and
    an image's pair depends on neither the batch size nor the process that made it."""
    pairs = list(itertools.combinations(range(num_adapters), 2))
    order = np.random.default_rng([seed, class_index]).permutation(len(pairs))
    return [pairs[i] for i in order]


class PairFusion:
    """A pipeline's grouped LoRA layers over one class's image adapters, each sample routed to its weighted pair.

    `load(files)` stacks the adapters (G = their number) over every linear layer any of them targets (text-encoder
    layers too, if the files hold them; an adapter that skips a layer, or has a lower rank, gets zero factors there);
    `route(pairs, weights, unet_repeats)` sets each sample's pair before a pipeline call; `remove()` puts the plain
    layers back. One per pipeline (`for_pipeline`), as `FusedAdapterSwitcher`: two would each think they own its
    layers.
    """

    _by_pipeline: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_pipeline(cls, pipeline) -> PairFusion:
        if pipeline not in cls._by_pipeline:
            cls._by_pipeline[pipeline] = cls(pipeline)
        return cls._by_pipeline[pipeline]

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.denoiser_name = family_of_pipeline(pipeline).denoiser_name
        self.files: list[Path] = []
        self._layers: list[tuple[str, nn.Module, str, nn.Linear, GroupedLoraLinear]] = []

    @torch.no_grad()
    def load(self, files: list[Path]) -> None:
        """Stacks the adapters of `files` (group g = files[g]) into grouped layers swapped into the pipeline."""
        if list(files) == self.files:
            return
        self.remove()  # the factors are read against the plain layers
        factors: list[dict[tuple[str, str], LoraFactor]] = []
        for file in files:
            read = read_lora_factors(file, self.pipeline)
            if read is None:
                raise GenerationInputError(
                    f"Adapter {str(file)!r} is not a plain diffusers-format LoRA with r/lora_alpha metadata (as "
                    "stage 1 writes), or the pipeline holds other LoRA layers (unload them first): fusion stacks "
                    "plain adapters only (no DoRA, rank or alpha patterns) over the pipeline's own linear layers."
                )
            factors.append(read)
        targets = sorted(set().union(*factors))
        for component, name in targets:
            model = getattr(self.pipeline, component)
            base = model.get_submodule(name)
            present = [(g, f[(component, name)]) for g, f in enumerate(factors) if (component, name) in f]
            rank = max(factor.down.shape[0] for _, factor in present)
            # In the base layer's dtype (fp16 on a GPU): no cast of the activations, as diffusers' own LoRA layers.
            layer = GroupedLoraLinear(base, len(files), rank, scaling=0.0, dtype=base.weight.dtype)
            for g, factor in present:
                r = factor.down.shape[0]
                layer.lora_A[g, :r].copy_(factor.down)  # (r, in)
                layer.lora_B[g, :, :r].copy_(factor.up)  # (out, r)
                layer.group_scaling[g] = factor.scaling
            layer.lora_A.requires_grad_(False), layer.lora_B.requires_grad_(False)
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, layer)
            self._layers.append((component, parent, attribute, base, layer))
        self.files = list(files)

    def route(self, pairs: list[tuple[int, int]], weights: list[float], unet_repeats: int = 1) -> None:
        """Sample i of the next pipeline call mixes adapters `pairs[i]` with `weights`. The UNet sees the batch
        `unet_repeats` times stacked (classifier-free guidance: [unconditional, conditional]), each copy of sample i
        with the same pair; the text encoder sees it once per prompt batch."""
        device = self._layers[0][4].lora_A.device
        groups = torch.tensor(pairs, dtype=torch.long, device=device)  # (B, 2)
        weights = torch.tensor([list(weights)] * len(pairs), dtype=torch.float32, device=device)  # (B, 2)
        for component, _, _, _, layer in self._layers:
            repeats = unet_repeats if component == self.denoiser_name else 1
            layer.set_mixture(groups.repeat(repeats, 1), weights.repeat(repeats, 1))

    def remove(self) -> None:
        """Back to the plain pipeline (its base layers were never changed)."""
        for _, parent, attribute, base, _ in self._layers:
            setattr(parent, attribute, base)
        self._layers, self.files = [], []
