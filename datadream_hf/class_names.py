"""Class names as the prompts use them: the curated lists of the paper's ten datasets (package data in
`curated_class_names/`), and renaming a dataset's label names with such a list or a user's JSON list or mapping."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from datasets import ClassLabel, Dataset

from .data import DatasetInputError, _check_class_names, class_names_of

# The reference's curated names (ExplainableML/DataDream `classify/util_data.py`, SUBSET_NAMES), one JSON list per
# dataset, in the dataset's canonical label order.
CLASS_NAMES_DIR = Path(__file__).with_name("curated_class_names")


def curated_class_names(dataset: str) -> list[str] | None:
    """The curated class names of one of the paper's datasets (e.g. `fgvc_aircraft`), or None if none ship."""
    path = CLASS_NAMES_DIR / f"{dataset}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_class_names_file(path: str | os.PathLike) -> list[str] | dict[str, str]:
    """A renaming file: a JSON list (new names in label order) or a JSON mapping (source name -> new name)."""
    try:
        names = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetInputError(f"Class names file {str(path)!r} cannot be read: {err}.") from err
    is_list = isinstance(names, list) and all(isinstance(n, str) for n in names)
    is_mapping = isinstance(names, dict) and all(isinstance(n, str) for n in names.values())
    if not (is_list or is_mapping):
        raise DatasetInputError(
            f"Class names file {str(path)!r} must hold a JSON list of names (in label order) or a mapping of "
            f"source names to new names, got {type(names).__name__}."
        )
    return names


def renamed(source_names: list[str], renaming: list[str] | dict[str, str], where: str) -> list[str]:
    """The new names of `source_names` under a list (by position, same length) or a mapping (unmapped names stay)."""
    if isinstance(renaming, dict):
        unknown = [name for name in renaming if name not in source_names]
        if unknown:
            raise DatasetInputError(
                f"{where} renames {unknown[:5]}, which are not classes of the dataset ({source_names[:5]}...)."
            )
        names = [renaming.get(name, name) for name in source_names]
    else:
        if len(renaming) != len(source_names):
            raise DatasetInputError(
                f"{where} lists {len(renaming)} class names but the dataset has {len(source_names)} classes; give "
                "one name per class in label order, or a mapping of source names to new names."
            )
        names = list(renaming)
    _check_class_names(names, where=where)
    return names


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def match_curated(source_names: list[str], curated: list[str], preset: str) -> list[str]:
    """The curated name of each source class: by name when every class matches one curated name up to case, `_`, `-`
    and spaces (any label order, any subset of the classes), else by position (all classes, in the dataset's canonical
    label order, as the Hub copies keep it)."""
    by_key = {_key(name): name for name in curated}
    matched = [by_key.get(_key(name)) for name in source_names]
    if None not in matched and len(set(matched)) == len(source_names):
        return matched
    return renamed(source_names, curated, where=f"The curated class names of preset {preset!r}")


def rename_classes(dataset: Dataset, names: list[str]) -> Dataset:
    """`dataset` with its `label` ClassLabel renamed to `names` (same labels, same order)."""
    if names == class_names_of(dataset):
        return dataset
    renamed(class_names_of(dataset), names, where="class_names")  # same length, unique, non-empty
    return dataset.cast_column("label", ClassLabel(names=list(names)))


def display_class_names(
    source_names: list[str], preset: str | None = None, class_names_file: str | None = None
) -> list[str]:
    """The names the stages use for a dataset's classes: from `class_names_file` if given, else the preset's curated
    list (if it ships one), else the source names."""
    if class_names_file:
        return renamed(source_names, read_class_names_file(class_names_file), where=repr(str(class_names_file)))
    curated = curated_class_names(preset) if preset else None
    return match_curated(source_names, curated, preset) if curated else list(source_names)
