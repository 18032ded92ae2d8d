"""The demo's real data on disk: the digits with a fixed validation split, the K-shot manifest inside the tiny world's
held-out shots, and the oracle control (held-out real train images in place of synthetic ones).

Every set is disjoint from the others by construction, and none of the shots was seen in pre-training:

    train split (all rows, so the manifest's row ids and fingerprint stay those of `load_digits_dataset()["train"]`)
    |- the tiny world's held-out shots (K=16, seed 0): the demo's K shots are these (K=16) or a seeded subset (K < 16)
    |- validation: `validation_per_class` images per class from the rest (model selection in stage 3)
    |- oracle: `oracle_per_class` images per class from what remains (the real-data control of the synthetic sets)
    test split: the final report only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import DatasetDict

from ..classify.data import per_class_rows
from ..data import labels_of, load_labelled_dataset
from ..few_shot import FewShotManifest, draw_few_shot
from .digits import load_digits_dataset

HELD_OUT_SHOTS, HELD_OUT_SEED = 16, 0  # the tiny world's held-out subset (`TinyWorldConfig.shots`, `few_shot_seed`)


@dataclass
class DemoData:
    """Paths of the demo's data: `dataset` (train/validation/test), the K-shot `manifest`, the `oracle` dataset."""

    dataset: Path
    manifest: Path
    oracle: Path


def prepare_demo_data(
    folder: str | Path, k: int, validation_per_class: int = 16, oracle_per_class: int = 90, seed: int = 0
) -> DemoData:
    """Writes the demo's data into `folder` once (a re-run reuses it) and returns where it is."""
    folder = Path(folder)
    paths = DemoData(folder / "digits", folder / f"few_shot_k{k}.json", folder / f"oracle_{oracle_per_class}")
    if paths.dataset.exists() and paths.manifest.exists() and paths.oracle.exists():
        return paths
    if not 1 <= k <= HELD_OUT_SHOTS:
        raise ValueError(f"The demo's K must be in 1..{HELD_OUT_SHOTS} (the tiny world's held-out shots), got {k}.")
    digits = load_digits_dataset()
    train = digits["train"]
    held_out = draw_few_shot(train, k=HELD_OUT_SHOTS, seed=HELD_OUT_SEED, source_name="digits", split="train")
    manifest = held_out if k == HELD_OUT_SHOTS else held_out.subset(k, seed)
    validation_rows, oracle_rows = carve_rows(train, held_out, validation_per_class, oracle_per_class, seed)
    if not paths.dataset.exists():
        splits = {"train": train, "validation": train.select(validation_rows), "test": digits["test"]}
        DatasetDict(splits).save_to_disk(str(paths.dataset))
    # The manifest is checked against the saved train split, as every stage will check it.
    manifest.check_matches(load_labelled_dataset(str(paths.dataset), split="train"))
    manifest.save(paths.manifest)
    if not paths.oracle.exists():
        train.select(oracle_rows).save_to_disk(str(paths.oracle))
    return paths


def carve_rows(
    train, held_out: FewShotManifest, validation_per_class: int, oracle_per_class: int, seed: int
) -> tuple[list[int], list[int]]:
    """Rows outside the held-out shots, chosen per class as stage 3 carves its validation set (`per_class_rows`):
    `validation_per_class` for validation, then `oracle_per_class` of the rest for the oracle. Raises, naming the
    class, if one has too few rows."""
    labels = labels_of(train)
    pool = np.setdiff1d(np.arange(len(labels)), held_out.flat_indices)
    for c, name in enumerate(held_out.class_names):
        available = int((labels[pool] == c).sum())
        if available < validation_per_class + oracle_per_class:
            raise ValueError(
                f"Class {name!r} has {available} train images outside the held-out shots; the demo needs "
                f"{validation_per_class} for validation + {oracle_per_class} for the oracle (`TinyWorldRecipe`)."
            )
    validation = pool[per_class_rows(labels[pool], validation_per_class, seed)]
    rest = np.setdiff1d(pool, validation)
    oracle = rest[per_class_rows(labels[rest], oracle_per_class, seed)]
    return validation.tolist(), oracle.tolist()
