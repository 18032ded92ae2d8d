"""The K-shot manifest: which K real images per class every stage uses (stage 1, stage 3 and the baseline)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import Dataset

from .class_names import rename_classes
from .data import (
    DatasetInputError,
    class_names_of,
    dataset_fingerprint,
    decode_images,
    labels_of,
    load_labelled_dataset,
)
from .files import write_json_atomic

MANIFEST_FORMAT_VERSION = 1


@dataclass
class FewShotManifest:
    """K row indices per class into a normalized dataset (see `data.load_labelled_dataset`), with their origin.

    The manifest is the one source of the class list: every stage loads the dataset with `source_class_names` (which
    classes, in which order) and gives them `class_names` (the names prompts, folders and reports use).
    """

    k: int
    seed: int
    class_names: list[str]
    indices: list[list[int]] = field(metadata={"help": "indices[c] = the K row ids of class c, in draw order."})
    source: dict = field(default_factory=dict, metadata={"help": "name, split, num_rows and fingerprint."})
    format_version: int = MANIFEST_FORMAT_VERSION
    source_class_names: list[str] | None = field(
        default=None,
        metadata={"help": "The dataset's own names of the classes, in label order, when renamed (None: class_names)."},
    )

    def __post_init__(self):
        if len(self.indices) != len(self.class_names):
            raise DatasetInputError(
                f"Manifest lists {len(self.class_names)} classes but {len(self.indices)} index lists."
            )
        if self.source_class_names is not None and len(self.source_class_names) != len(self.class_names):
            raise DatasetInputError(
                f"Manifest lists {len(self.class_names)} class names but {len(self.source_class_names)} source names."
            )

    @property
    def dataset_class_names(self) -> list[str]:
        """The classes as the source dataset names them, in the manifest's label order."""
        return list(self.source_class_names or self.class_names)

    @property
    def flat_indices(self) -> list[int]:
        """All row ids, class by class."""
        return [i for per_class in self.indices for i in per_class]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the manifest as JSON, atomically."""
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FewShotManifest:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetInputError(f"Few-shot manifest {str(path)!r} cannot be read: {err}.") from err
        if payload.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise DatasetInputError(
                f"Few-shot manifest {str(path)!r} has format_version {payload.get('format_version')!r}, expected "
                f"{MANIFEST_FORMAT_VERSION}. Draw it again with `datadream-hf few-shot`."
            )
        try:
            return cls(**payload)
        except TypeError as err:
            raise DatasetInputError(f"Few-shot manifest {str(path)!r} is malformed: {err}.") from err

    def check_matches(self, dataset: Dataset) -> None:
        """Raises unless `dataset` is the one the manifest was drawn from (same classes and labels)."""
        names = class_names_of(dataset)
        if names != self.class_names:
            raise DatasetInputError(
                f"The manifest's classes {self.class_names[:5]}... differ from the dataset's {names[:5]}...; "
                "load the dataset with the same source and class_names as when the manifest was drawn."
            )
        expected = self.source.get("fingerprint")
        if expected and dataset_fingerprint(dataset) != expected:
            raise DatasetInputError(
                f"The dataset's fingerprint {dataset_fingerprint(dataset)} differs from the manifest's {expected}: it "
                "is not the dataset the K-shot subset was drawn from."
            )

    def select(self, dataset: Dataset) -> Dataset:
        """The K-shot rows of `dataset`, class by class, each image checked to decode."""
        self.check_matches(dataset)
        subset = dataset.select(self.flat_indices)
        decode_images(subset)
        return subset

    def complement(self, dataset: Dataset) -> Dataset:
        """The rows of `dataset` outside the K-shot subset (e.g. for a validation split or pre-training)."""
        self.check_matches(dataset)
        chosen = set(self.flat_indices)
        return dataset.select([i for i in range(len(dataset)) if i not in chosen])


def load_manifest_dataset(
    manifest: FewShotManifest,
    source,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    class_names: list[str] | None = None,
    revision: str | None = None,
) -> Dataset:
    """`split` of `source` (any `load_labelled_dataset` source) with the manifest's classes, in its order and under its
    names. `class_names`, if given, must be the manifest's (its own or the source's names): only a mismatch fails."""
    if class_names is not None and list(class_names) not in (manifest.class_names, manifest.dataset_class_names):
        raise DatasetInputError(
            f"The manifest's classes {manifest.class_names[:5]}... differ from the dataset's classes given by "
            f"`class_names` {list(class_names)[:5]}...: leave `class_names` unset (the manifest carries the classes, "
            "their order and names) or draw the manifest again with these classes."
        )
    dataset = load_labelled_dataset(
        source, split, image_column, label_column, class_names=manifest.dataset_class_names, revision=revision
    )
    return rename_classes(dataset, manifest.class_names)


def draw_few_shot(
    dataset: Dataset,
    k: int,
    seed: int,
    source_name: str = "",
    split: str = "",
    source_class_names: list[str] | None = None,
) -> FewShotManifest:
    """Draws K images per class without replacement, with a generator seeded by `seed` (one stream per class).

    `source_class_names`: the source dataset's names of `dataset`'s classes when `dataset` was renamed (e.g. to a
    preset's curated names), so that every stage can load and rename it the same way.
    """
    if not isinstance(k, int) or k < 1:
        raise DatasetInputError(f"K (shots per class) must be a positive integer, got {k!r}.")
    labels = labels_of(dataset)
    names = class_names_of(dataset)
    indices = []
    for label, name in enumerate(names):
        rows = np.flatnonzero(labels == label)
        if len(rows) < k:
            raise DatasetInputError(
                f"Class {name!r} has {len(rows)} images but K={k} were asked; lower K or add images to that class."
            )
        rng = np.random.default_rng([seed, label])
        indices.append(sorted(int(i) for i in rng.choice(rows, size=k, replace=False)))
    source = {
        "name": source_name,
        "split": split,
        "num_rows": len(dataset),
        "fingerprint": dataset_fingerprint(dataset),
    }
    if source_class_names is not None and list(source_class_names) == names:
        source_class_names = None
    return FewShotManifest(
        k=k,
        seed=seed,
        class_names=names,
        indices=indices,
        source=source,
        source_class_names=None if source_class_names is None else list(source_class_names),
    )
