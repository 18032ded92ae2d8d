"""Labelled image datasets from any source, normalized to an `image` column and a `label` ClassLabel column."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from datasets.data_files import SPLIT_KEYWORDS
from PIL import Image as PILImage
from PIL import ImageOps

from .errors import InputError
from .sources import check_source

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 is upright, 2-8 a flip and/or rotation to undo
# Split folder name -> split, as `datasets`' imagefolder reads `root/<split>/<class>/<image>` (`train`, `test`,
# `validation`/`valid`/`val`/`dev`, ...).
SPLIT_FOLDER_NAMES = {name: str(split) for split, names in SPLIT_KEYWORDS.items() for name in names}


class DatasetInputError(InputError):
    """Bad dataset input; the message names the culprit and what to do."""


def image_folder_splits(path: str | os.PathLike) -> dict[str, Path]:
    """The split folders of an image folder laid out as `datasets`' imagefolder reads splits,
    `root/<split>/<class>/<image>` ({"train": root/train, "test": root/test, ...}); {} for a folder of class folders
    (`root/<class>/<image>`, one split).

    A folder is split when every visible sub-folder has a split name (`SPLIT_FOLDER_NAMES`) and holds folders (classes
    named `train` and `test` that hold images stay classes); split folders beside class folders, or two folders of one
    split (`val` and `validation`), are an error naming them.
    """
    root = Path(path)
    if not root.is_dir():
        return {}
    folders = [p for p in _entries(root) if p.is_dir()]
    named = [p for p in folders if p.name in SPLIT_FOLDER_NAMES]
    holding_folders = [p for p in named if any(q.is_dir() for q in _entries(p))]
    if not holding_folders:
        return {}  # no split name, or classes that happen to have one
    others = [p.name for p in folders if p not in holding_folders]
    if others:
        raise DatasetInputError(
            f"Image folder {str(root)!r} mixes split folders ({', '.join(p.name for p in holding_folders)}) with "
            f"folders that hold no class folder ({', '.join(others[:5])}). Use `<root>/<split>/<class>/<image>` "
            f"(splits {'/'.join(sorted(SPLIT_FOLDER_NAMES))}) or `<root>/<class>/<image>`, not both."
        )
    splits: dict[str, Path] = {}
    for folder in named:
        split = SPLIT_FOLDER_NAMES[folder.name]
        if split in splits:
            raise DatasetInputError(
                f"Image folder {str(root)!r} has two folders of split {split!r}: {splits[split].name!r} and "
                f"{folder.name!r}. Merge them or rename one."
            )
        splits[split] = folder
    return splits


def load_image_folder(
    path: str | os.PathLike, class_names: list[str] | None = None, split: str | None = None
) -> Dataset:
    """Loads `path/<class name>/<image>` into a dataset; with `class_names`, in that order (else alphabetical).

    A folder with split sub-folders (`path/<split>/<class name>/<image>`, see `image_folder_splits`) loads its `split`
    (default "train") with the classes of all splits, alphabetical as `datasets`' imagefolder orders them, so every
    split has the same labels; a class may lack a folder in one split but not in all.

    A link to a missing file or an unreadable entry (in the root or in a class folder) is an error naming it, as a
    corrupt image is: skipping it would silently drop images, or a whole class. Hidden entries are ignored; other
    files and sub-folders inside a class folder are skipped with a warning that names them.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetInputError(f"Image folder {str(root)!r} does not exist or is not a directory.")
    splits = image_folder_splits(root)
    if splits:
        return _load_split(root, splits, class_names, split or "train")
    return _load_classes(root, class_names)


def _load_split(root: Path, splits: dict[str, Path], class_names: list[str] | None, split: str) -> Dataset:
    """`split` of an image folder with split folders, with the classes of every split."""
    if split not in splits:
        split = SPLIT_FOLDER_NAMES.get(split, split)  # `--split val` means the validation folder
    if split not in splits:
        found = ", ".join(f"{name} ({folder.name}/)" for name, folder in splits.items())
        raise DatasetInputError(f"Split {split!r} has no folder in image folder {str(root)!r}; its splits: {found}.")
    folders = {name: sorted(p.name for p in _entries(folder) if p.is_dir()) for name, folder in splits.items()}
    everywhere = sorted({name for names in folders.values() for name in names})
    if class_names is None:
        class_names = everywhere
    _check_class_names(class_names, where=str(root))
    missing = [name for name in class_names if name not in everywhere]
    if missing:
        raise DatasetInputError(
            f"Class name(s) {missing} have no sub-folder in any split of {str(root)!r}; found {everywhere}. Fix "
            "`class_names` or the folder layout."
        )
    present = [name for name in class_names if name in folders[split]]
    return _load_classes(splits[split], class_names, present)


def _load_classes(root: Path, class_names: list[str] | None, present: list[str] | None = None) -> Dataset:
    """`root/<class>/<image>` with `class_names` as labels; only the classes in `present` (default: all) are read."""
    folders = sorted(p.name for p in _entries(root) if p.is_dir())
    if class_names is None:
        class_names = folders
    _check_class_names(class_names, where=str(root))
    if not class_names:
        raise DatasetInputError(
            f"Image folder {str(root)!r} has no class sub-folders (expected `<root>/<class>/*.png`)."
        )
    missing = [name for name in class_names if name not in folders]
    if missing and present is None:
        raise DatasetInputError(
            f"Class name(s) {missing} have no sub-folder in {str(root)!r}; found {folders}. Fix `class_names` or "
            "the folder layout."
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
        if present is not None and name not in present:
            continue
        entries = _entries(root / name)
        files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped = [p.name for p in entries if p not in files]
        if skipped:
            logger.warning(
                "Skipped %d entr%s of %r that %s not image files (%s): %s", len(skipped),
                "y" if len(skipped) == 1 else "ies", str(root / name), "is" if len(skipped) == 1 else "are",
                ", ".join(IMAGE_EXTENSIONS), skipped[:10],
            )  # fmt: skip
        if not files:
            inner = [p.name for p in entries if p.is_dir()]
            hint = (
                f"; it holds folders ({', '.join(inner[:5])}): a split folder is named "
                f"{'/'.join(sorted(SPLIT_FOLDER_NAMES))}, as `datasets`' imagefolder reads them"
                if inner
                else ""
            )
            raise DatasetInputError(
                f"Class folder {str(root / name)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)}){hint}."
            )
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _entries(folder: Path) -> list[Path]:
    """The visible entries of `folder`, sorted; a link to nothing or an unreadable entry is an error naming it."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if entry.is_symlink() and not entry.exists():
            raise DatasetInputError(
                f"{str(entry)!r} is a link to a missing file ({os.readlink(entry)!r}). Restore its target or remove "
                "the link."
            )
        if not os.access(entry, os.R_OK | (os.X_OK if entry.is_dir() else 0)):
            raise DatasetInputError(f"{str(entry)!r} cannot be read (permissions). Fix its permissions or remove it.")
    return entries


def load_labelled_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    class_names: list[str] | None = None,
    revision: str | None = None,
) -> Dataset:
    """Loads a labelled image dataset and returns it with exactly the columns `image` (Image) and `label` (ClassLabel).

    Args:
        source: a `Dataset`/`DatasetDict`, a `save_to_disk` folder, an image folder (one sub-folder per class, or
            split folders of them: `train/<class>/`, `test/<class>/`, as `datasets`' imagefolder reads), or a Hub
            dataset id.
        split: the split to take from a `DatasetDict`, a Hub dataset or an image folder with split folders.
        image_column / label_column: column names in the source.
        class_names: classes to keep, in this order (labels are renumbered to it). Needed for integer labels
            without a ClassLabel feature.
        revision: Hub revision of a Hub dataset.
    """
    if isinstance(source, (Dataset, DatasetDict)):
        dataset = source
    elif Path(source).is_dir():
        root = Path(source)
        if any((root / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(root))
        else:
            return load_image_folder(root, class_names, split)
    elif Path(source).exists():
        raise DatasetInputError(f"Dataset source {str(source)!r} is a file; pass a folder, a Dataset or a Hub id.")
    else:
        check_source(source, "Dataset", repo_type="dataset")  # a mistyped folder fails here, not after Hub retries
        dataset = datasets.load_dataset(str(source), split=split, revision=revision)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DatasetInputError(f"Split {split!r} not in the dataset; available splits: {list(dataset)}.")
        dataset = dataset[split]
    return _normalize_columns(dataset, image_column, label_column, class_names)


def _normalize_columns(
    dataset: Dataset, image_column: str, label_column: str, class_names: list[str] | None
) -> Dataset:
    for role, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in dataset.column_names:
            raise DatasetInputError(
                f"Column {column!r} ({role}) not found; the dataset has columns {dataset.column_names}. "
                f"Pass `{role}=...` with the right name."
            )
    feature = dataset.features[label_column]
    dataset = dataset.select_columns([image_column, label_column])
    if not isinstance(dataset.features[image_column], Image):
        raise DatasetInputError(
            f"Column {image_column!r} has feature {dataset.features[image_column]!r}, expected an `Image` feature."
        )
    if isinstance(feature, ClassLabel):
        source_names = list(feature.names)
    elif isinstance(feature, Value) and feature.dtype == "string":
        source_names = sorted(set(dataset[label_column]))
    elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        if class_names is None:
            raise DatasetInputError(
                f"Label column {label_column!r} holds integers without class names; pass `class_names` (one per "
                "label id, in label order)."
            )
        source_names = list(class_names)
    else:
        raise DatasetInputError(
            f"Label column {label_column!r} has type {feature!r}; expected a ClassLabel, integer or string column."
        )
    _check_class_names(source_names, where=f"label column {label_column!r}")
    target_names = list(class_names) if class_names is not None else source_names
    _check_class_names(target_names, where="class_names")
    unknown = [name for name in target_names if name not in source_names]
    if unknown:
        raise DatasetInputError(f"Unknown class name(s) {unknown}; the dataset's classes are {source_names}.")

    labels = list(dataset[label_column])
    if isinstance(feature, Value) and feature.dtype == "string":
        labels = [source_names.index(label) for label in labels]
    bad = sorted({label for label in labels if not 0 <= label < len(source_names)})
    if bad:
        raise DatasetInputError(f"Label column {label_column!r} has ids {bad[:5]} outside 0..{len(source_names) - 1}.")
    remap = {source_names.index(name): new for new, name in enumerate(target_names)}
    keep = [i for i, label in enumerate(labels) if label in remap]
    dataset = dataset.select(keep) if len(keep) != len(labels) else dataset
    new_labels = [remap[labels[i]] for i in keep]
    dataset = dataset.remove_columns(label_column).add_column("label", new_labels)
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    return dataset.cast(Features({"image": dataset.features["image"], "label": ClassLabel(names=target_names)}))


def _check_class_names(names: list[str], where: str) -> None:
    seen = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise DatasetInputError(f"Class name {name!r} in {where} is empty or not a string.")
        if name in seen:
            raise DatasetInputError(f"Class name {name!r} appears twice in {where}; class names must be unique.")
        seen.add(name)


def is_single_table(source) -> bool:
    """True when `source` has no splits (a folder of class folders, a `Dataset` or its `save_to_disk` folder): every
    `split` name loads the same rows. A `DatasetDict`, its folder, an image folder with split folders and a Hub id have
    splits."""
    if isinstance(source, (Dataset, DatasetDict)):
        return isinstance(source, Dataset)
    root = Path(source)
    return root.is_dir() and not (root / "dataset_dict.json").exists() and not image_folder_splits(root)


def local_split_names(source: str | os.PathLike) -> list[str] | None:
    """The splits of a local dataset folder without loading it: a `save_to_disk` DatasetDict's, an image folder's split
    folders', [] for a folder without splits (class folders, a `Dataset`); None for anything else (a Hub id, a missing
    path: unknown here)."""
    root = Path(source)
    if not root.is_dir():
        return None
    if (root / "dataset_dict.json").is_file():
        try:
            return list(json.loads((root / "dataset_dict.json").read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return [] if is_single_table(root) else list(image_folder_splits(root))


def dataset_fingerprint(dataset: Dataset) -> str:
    """A content fingerprint of a normalized dataset's labels and class names (image bytes are not read)."""
    payload = json.dumps({"class_names": class_names_of(dataset), "labels": labels_of(dataset).tolist()})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def image_digests(dataset: Dataset) -> list[str]:
    """The sha256 of each row's encoded image (its bytes, or its file's), without decoding it; a file that cannot be
    read is an error naming it."""
    digests = []
    for item in dataset.cast_column("image", Image(decode=False))["image"]:
        if item.get("bytes") is not None:
            payload = item["bytes"]
        else:
            try:
                payload = Path(item["path"]).read_bytes()
            except OSError as err:
                raise DatasetInputError(
                    f"Image {item['path']!r} cannot be read ({err.strerror or err}). Restore it or remove it."
                ) from None
        digests.append(hashlib.sha256(payload).hexdigest())
    return digests


def labels_of(dataset: Dataset) -> np.ndarray:
    return dataset.with_format("numpy")["label"][:]


def class_names_of(dataset: Dataset) -> list[str]:
    return list(dataset.features["label"].names)


def decode_images(dataset: Dataset) -> list[PILImage.Image]:
    """Decodes every image of a (small) dataset to upright RGB (see `to_rgb`); a corrupt or unreadable file raises an
    error naming it."""
    raw = dataset.cast_column("image", Image(decode=False))[:]["image"]
    images = []
    for row, item in enumerate(raw):
        where = item.get("path") or f"row {row}"
        try:
            image = PILImage.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
            image.load()
        except PILImage.DecompressionBombError as err:
            raise DatasetInputError(
                f"Image {where!r} is too large to decode safely ({err}). Downscale it, or raise "
                "`PIL.Image.MAX_IMAGE_PIXELS` if you trust the file."
            ) from err
        except Exception as err:  # PIL raises several unrelated types for broken files
            raise DatasetInputError(f"Image {where!r} cannot be decoded ({err}). Remove or replace the file.") from err
        images.append(to_rgb(image))
    return images


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """An upright RGB version of any PIL image; 16-bit, 32-bit and float grayscale are rescaled to 8 bits, not clipped.

    Upright: an EXIF orientation (a camera's rotated or mirrored JPEG) is applied, as the reference's stage 1 does
    (`ImageOps.exif_transpose`) and `datasets` does when it decodes; the tag is dropped, so a second call is a no-op.

    PIL's own `convert("RGB")` clips 16-bit values (mode `I;16`, e.g. 16-bit PNG) at 255, which turns such an image
    almost white. Alpha is dropped, as the reference's `Image.open(path).convert("RGB")` does.
    """
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = float(pixels.max()) if pixels.size else 0.0
        if image.mode.startswith("I;16") or (image.mode == "I" and 255 < peak <= 65535):
            pixels = pixels / 257.0  # 65535 -> 255
        elif image.mode == "I" and peak > 65535:
            pixels = pixels * (255.0 / peak)
        elif image.mode == "F" and peak <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        image = PILImage.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")
