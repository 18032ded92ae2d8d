"""The K-shot manifest: which K real images per class every stage uses (stage 1, stage 3 and the baseline)."""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict, Image

from .class_names import rename_classes
from .data import (
    SPLIT_FOLDER_NAMES,
    DatasetInputError,
    class_names_of,
    dataset_fingerprint,
    decode_images,
    image_digests,
    image_folder_splits,
    is_single_table,
    labels_of,
    load_labelled_dataset,
)
from .files import write_json_atomic
from .validation import K_SHOTS, SEED, check_value

logger = logging.getLogger(__name__)

# 2: `image_sha256`, what each K-shot image is (format 1 manifests still load, their images unchecked, with a warning).
MANIFEST_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
_WARNED_UNHASHED: set[str] = set()  # manifests warned about (once per process)
_SHA256 = re.compile(r"[0-9a-f]{64}")
REDRAW = "Draw it again with `datadream-hf few-shot` (the same --k and --seed on the same data give the same rows)"


@dataclass
class FewShotManifest:
    """K row indices per class into a normalized dataset (see `data.load_labelled_dataset`), with their origin.

    The manifest is the one source of the class list: every stage loads the dataset with `source_class_names` (which
    classes, in which order) and gives them `class_names` (the names prompts, folders and reports use).

    Checked when made or loaded (K distinct non-negative integer rows per class) and against the dataset it is used
    with (`check_matches`: same classes, same fingerprint, every row inside it, of the class it is listed under and
    holding the very image the manifest was drawn with, by its sha256); errors name the manifest file, the class and
    the row.
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
    image_sha256: list[list[str]] | None = field(
        default=None,
        metadata={
            "help": "image_sha256[c][i] = the sha256 of row indices[c][i]'s encoded image (its stored bytes or its "
            "file's). None: not recorded (a format-1 manifest), so the images are not checked."
        },
    )
    path: str | None = field(
        default=None, compare=False, metadata={"help": "The file it was loaded from, for error messages; not saved."}
    )

    def __post_init__(self):
        problem = self._structure_problem()
        if problem:
            raise DatasetInputError(f"{self.where}: {problem} Draw it again with `datadream-hf few-shot`.")

    @property
    def where(self) -> str:
        return f"Few-shot manifest {self.path!r}" if self.path else "The few-shot manifest"

    def _structure_problem(self) -> str | None:
        for name, allowed in (("k", K_SHOTS), ("seed", SEED)):
            if not allowed.allows(getattr(self, name)):
                return f"field '{name}' = {getattr(self, name)!r} is invalid: use {allowed.describe()}."
        if not isinstance(self.class_names, list) or not isinstance(self.indices, list):
            return "fields 'class_names' and 'indices' must be lists."
        if not isinstance(self.source, dict):
            return f"field 'source' must be a mapping, got {self.source!r}."
        if len(self.indices) != len(self.class_names):
            return f"it lists {len(self.class_names)} classes but {len(self.indices)} index lists."
        if self.source_class_names is not None and len(self.source_class_names) != len(self.class_names):
            return f"it lists {len(self.class_names)} class names but {len(self.source_class_names)} source names."
        for i, name in enumerate(self.class_names):
            if not isinstance(name, str) or not name.strip():
                return f"class name {name!r} is empty or not a string."
            if name in self.class_names[:i]:
                return f"class name {name!r} appears twice; class names must be unique."
        first_seen: dict[int, str] = {}
        for name, rows in zip(self.class_names, self.indices):
            if not isinstance(rows, list) or len(rows) != self.k:
                count = len(rows) if isinstance(rows, list) else rows
                return f"class {name!r} lists {count!r} rows, expected a list of K={self.k}."
            for row in rows:
                if isinstance(row, bool) or not isinstance(row, numbers.Integral) or row < 0:
                    return f"class {name!r}: row {row!r} is not a row number (an integer >= 0)."
                if int(row) in first_seen:
                    return f"row {row} is listed twice (class {first_seen[int(row)]!r} and class {name!r})."
                first_seen[int(row)] = name
        if self.image_sha256 is not None:
            if not isinstance(self.image_sha256, list) or len(self.image_sha256) != len(self.indices):
                return "field 'image_sha256' must list one list of hashes per class."
            for name, rows, digests in zip(self.class_names, self.indices, self.image_sha256):
                if not isinstance(digests, list) or len(digests) != len(rows):
                    return f"class {name!r} lists {len(rows)} rows but not as many image hashes."
                bad = next((d for d in digests if not isinstance(d, str) or not _SHA256.fullmatch(d)), None)
                if bad is not None:
                    return f"class {name!r}: image hash {bad!r} is not a sha256 (64 hex digits)."
        return None

    @property
    def dataset_class_names(self) -> list[str]:
        """The classes as the source dataset names them, in the manifest's label order."""
        return list(self.source_class_names or self.class_names)

    @property
    def flat_indices(self) -> list[int]:
        """All row ids, class by class."""
        return [int(i) for per_class in self.indices for i in per_class]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the manifest as JSON, atomically."""
        payload = asdict(self)
        del payload["path"]
        write_json_atomic(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FewShotManifest:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetInputError(f"Few-shot manifest {str(path)!r} cannot be read: {err}.") from err
        if not isinstance(payload, dict):
            raise DatasetInputError(f"Few-shot manifest {str(path)!r} must hold a JSON object, got {type(payload)}.")
        if payload.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise DatasetInputError(
                f"Few-shot manifest {str(path)!r} has format_version {payload.get('format_version')!r}; this version "
                f"reads {' and '.join(map(str, READABLE_FORMAT_VERSIONS))}. {REDRAW}."
            )
        if payload["format_version"] == 1 and "image_sha256" in payload:
            raise DatasetInputError(f"Few-shot manifest {str(path)!r} of format 1 holds 'image_sha256'. {REDRAW}.")
        try:
            return cls(**{**payload, "path": str(path)})
        except TypeError as err:
            raise DatasetInputError(f"Few-shot manifest {str(path)!r} is malformed: {err}.") from err

    def check_matches(self, dataset: Dataset) -> None:
        """Raises unless `dataset` is the one the manifest was drawn from: same classes, same fingerprint, and every
        row inside it and labelled with the class it is listed under."""
        names = class_names_of(dataset)
        if names != self.class_names:
            raise DatasetInputError(
                f"{self.where}: the manifest's classes {self.class_names[:5]}... differ from the dataset's "
                f"{names[:5]}...; load the dataset with the same source and class_names as when the manifest was "
                "drawn."
            )
        expected = self.source.get("fingerprint")
        if expected and dataset_fingerprint(dataset) != expected:
            raise DatasetInputError(
                f"{self.where}: the dataset's fingerprint {dataset_fingerprint(dataset)} differs from the manifest's "
                f"{expected}: it is not the dataset the K-shot subset was drawn from."
            )
        labels = labels_of(dataset)
        for label, (name, rows) in enumerate(zip(self.class_names, self.indices)):
            for row in rows:
                if row >= len(dataset):
                    raise DatasetInputError(
                        f"{self.where}, class {name!r}: row {row} is past the end of the dataset ({len(dataset)} "
                        "rows). The manifest was drawn from another dataset or edited; draw it again."
                    )
                if labels[row] != label:
                    raise DatasetInputError(
                        f"{self.where}, class {name!r}: row {row} is labelled {names[labels[row]]!r}, not {name!r}. "
                        "The manifest was drawn from another dataset or edited; draw it again."
                    )
        self._check_images(dataset)

    def _check_images(self, dataset: Dataset) -> None:
        """Raises unless each K-shot row holds the image the manifest was drawn with (same sha256), naming the class,
        the row and its file; a manifest without hashes (format 1) is let through with a warning."""
        if self.image_sha256 is None:
            if self.where in _WARNED_UNHASHED:
                return
            _WARNED_UNHASHED.add(self.where)
            logger.warning(
                "%s records no image hashes (format 1): an image replaced under the same file name would not be "
                "noticed. %s.", self.where, REDRAW,
            )  # fmt: skip
            return
        digests = image_digests(dataset.select(self.flat_indices))
        expected = [digest for per_class in self.image_sha256 for digest in per_class]
        classes = [name for name, rows in zip(self.class_names, self.indices) for _ in rows]
        for position, (row, found, wanted) in enumerate(zip(self.flat_indices, digests, expected)):
            if found != wanted:
                item = dataset.cast_column("image", Image(decode=False))[row]["image"]
                where = f" ({item['path']!r})" if item.get("path") else ""
                raise DatasetInputError(
                    f"{self.where}, class {classes[position]!r}: row {row}{where} is not the image the manifest was "
                    f"drawn with (its sha256 is {found[:12]}..., the manifest's {wanted[:12]}...): the data changed "
                    f"since. {REDRAW}, and re-run the stages that used the old one."
                )

    def check_split(self, source, split: str, flag: str) -> None:
        """Raises if `split` (given by `flag`) of `source` is not the split the manifest was drawn from, when the
        source has splits (a source without, such as a folder of class folders, loads the same rows for any name)."""
        drawn = self.source.get("split")
        if not drawn or split == drawn or is_single_table(source):
            return
        aliases = SPLIT_FOLDER_NAMES if not isinstance(source, DatasetDict) and image_folder_splits(source) else {}
        if aliases.get(split, split) != aliases.get(drawn, drawn):
            raise DatasetInputError(
                f"{self.where} was drawn from split {drawn!r}, but {flag} {split!r} is loaded: its rows are other "
                f"images. Pass {flag} {drawn}, or draw a manifest from {split!r}."
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

    def subset(self, k: int, seed: int = 0) -> FewShotManifest:
        """K' <= K of each class's images, drawn (seeded, one stream per class) from this manifest's: nested few-shot
        sets, e.g. 4 of the 16 shots, so that the smaller set holds only images the larger one held."""
        if not isinstance(k, int) or not 1 <= k <= self.k:
            raise DatasetInputError(f"A subset of a K={self.k} manifest needs 1 <= k <= {self.k}, got {k!r}.")
        indices = [
            sorted(int(i) for i in np.random.default_rng([seed, c]).choice(rows, size=k, replace=False))
            for c, rows in enumerate(self.indices)
        ]
        source = {**self.source, "subset_of": {"k": self.k, "seed": self.seed}}
        digests = None
        if self.image_sha256 is not None:
            by_row = {row: d for rows, ds in zip(self.indices, self.image_sha256) for row, d in zip(rows, ds)}
            digests = [[by_row[row] for row in rows] for rows in indices]
        return FewShotManifest(k=k, seed=seed, class_names=list(self.class_names), indices=indices, source=source,
                               source_class_names=self.source_class_names, image_sha256=digests)  # fmt: skip


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
    check_value("k", k, K_SHOTS, DatasetInputError)
    check_value("seed", seed, SEED, DatasetInputError)
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
    digests = iter(image_digests(dataset.select([row for rows in indices for row in rows])))
    return FewShotManifest(
        k=k,
        seed=seed,
        class_names=names,
        indices=indices,
        source=source,
        source_class_names=None if source_class_names is None else list(source_class_names),
        image_sha256=[[next(digests) for _ in rows] for rows in indices],
    )
