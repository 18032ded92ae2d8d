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
from PIL import Image as PILImage
from PIL import ImageOps

from .errors import InputError
from .sources import check_source

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 is upright, 2-8 a flip and/or rotation to undo


class DatasetInputError(InputError):
    """Bad dataset input; the message names the culprit and what to do."""


def load_image_folder(path: str | os.PathLike, class_names: list[str] | None = None) -> Dataset:
    """Loads `path/<class name>/<image>` into a dataset; with `class_names`, in that order (else alphabetical).

    A link to a missing file or an unreadable entry (in the root or in a class folder) is an error naming it, as a
    corrupt image is: skipping it would silently drop images, or a whole class. Hidden entries are ignored; other
    files and sub-folders inside a class folder are skipped with a warning that names them.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetInputError(f"Image folder {str(root)!r} does not exist or is not a directory.")
    folders = sorted(p.name for p in _entries(root) if p.is_dir())
    if class_names is None:
        class_names = folders
    _check_class_names(class_names, where=str(root))
    if not class_names:
        raise DatasetInputError(
            f"Image folder {str(root)!r} has no class sub-folders (expected `<root>/<class>/*.png`)."
        )
    missing = [name for name in class_names if name not in folders]
    if missing:
        raise DatasetInputError(
            f"Class name(s) {missing} have no sub-folder in {str(root)!r}; found {folders}. Fix `class_names` or "
            "the folder layout."
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
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
            raise DatasetInputError(
                f"Class folder {str(root / name)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})."
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
        source: a `Dataset`/`DatasetDict`, a `save_to_disk` folder, an image folder (one sub-folder per class), or a
            Hub dataset id.
        split: the split to take from a `DatasetDict` or Hub dataset.
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
            return load_image_folder(root, class_names)
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
    """True when `source` has no splits (an image folder, a `Dataset` or its `save_to_disk` folder): every `split`
    name loads the same rows. A `DatasetDict`, its folder and a Hub id have splits."""
    if isinstance(source, (Dataset, DatasetDict)):
        return isinstance(source, Dataset)
    root = Path(source)
    return root.is_dir() and not (root / "dataset_dict.json").exists()


def dataset_fingerprint(dataset: Dataset) -> str:
    """A content fingerprint of a normalized dataset's labels and class names (image bytes are not read)."""
    payload = json.dumps({"class_names": class_names_of(dataset), "labels": labels_of(dataset).tolist()})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
