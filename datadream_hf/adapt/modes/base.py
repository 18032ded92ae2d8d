"""What a stage-1 training mode is (`--mode`): which K-shot images train which adapter, the adapter index it writes,
and the settings it defaults to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Settings a mode decides when their flag is not given (None in `GeneratorTrainingConfig`): DataDream's values here,
# overridden by a mode whose method trains otherwise (image mode: LoFT's).
DATADREAM_DEFAULTS = {
    "rank": 16,
    "train_text_encoder": True,
    "train_batch_size": 8,
    "num_train_epochs": 200,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 100,
    "center_crop": False,  # Resize -> RandomCrop, as the reference's `datadream.py`
}


@dataclass(frozen=True)
class UnitSpec:
    """One adapter of a run, before its images are loaded.

    Attributes:
        name: how logs name it (`"all"`, the class name, or `"<class>/image_<row>"`).
        folder: where its adapter goes, relative to the output dir.
        seed: the seed every random draw of its training derives from.
        positions: which K-shot images (positions in `FewShotData.images`, class by class in draw order) it trains on.
    """

    name: str
    folder: str
    seed: int
    positions: list[int]


@dataclass(frozen=True)
class TrainingMode:
    """A stage-1 mode.

    Attributes:
        name: the `--mode` value.
        defaults: field -> value for the `GeneratorTrainingConfig` fields left None (every key of
            `DATADREAM_DEFAULTS`).
        unet_target_modules: the UNet modules its LoRA targets (peft skips names a model does not have).
        splits_adapters: True: adapter `i` is trained by process `i % num_processes`, several adapters of a process
            together on the grouped engine unless `--cls_strategy sequential`; False (dset): one adapter, each batch
            split over the processes.
        units: `(seed, class_names, labels, indices) -> [UnitSpec, ...]`, every adapter of the run in index order
            (`labels[p]` is the class of K-shot image p; `indices[c]` the manifest's dataset rows of class c).
        index: `(class_names, indices) -> adapter_index.json`.
        card_rows: `(class_names, indices, prompts) -> [(name, folder, prompt), ...]`, the adapters of the card.
    """

    name: str
    defaults: dict
    unet_target_modules: tuple[str, ...]
    splits_adapters: bool
    units: Callable[[int, list[str], list[int], list[list[int]]], list[UnitSpec]]
    index: Callable[[list[str], list[list[int]]], dict]
    card_rows: Callable[[list[str], list[list[int]], list[str]], list[tuple[str, str, str | None]]]
    help: str = field(default="")


def derived_seed(*keys: int) -> int:
    """A seed mixed from non-negative ints by numpy's SeedSequence (distinct key tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
