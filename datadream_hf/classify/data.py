"""Stage-3 data: the real K-shot, validation, test and synthetic rows of a run, the training set over them, the sampler
that fixes each batch's real/synthetic counts and each draw's augmentation seed, and the batch collator."""

from __future__ import annotations

import json
import math
from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from datasets import Image
from PIL import Image as PILImage
from torch.utils.data import Sampler

from ..class_names import display_class_names, rename_classes
from ..data import (
    DatasetInputError,
    class_names_of,
    image_digests,
    is_single_table,
    labels_of,
    load_labelled_dataset,
)
from ..few_shot import FewShotManifest, load_manifest_dataset
from ..sources import STAGE1_FOLDER, STAGE2_FOLDER, STAGE3_FOLDER, output_folder_kind
from ..synthetic import GENERATION_CONFIG_NAME, load_synthetic_dataset

if TYPE_CHECKING:
    from .config import ClassifierArguments, DataDreamTrainingArguments


class SampleKey(NamedTuple):
    """What the training sampler yields per sample: the dataset row and the seed of that draw's augmentation."""

    index: int
    seed: int


class RealSyntheticBatchSampler(Sampler[list[SampleKey]]):
    """Batches of exactly `real_per_batch` real and `synthetic_per_batch` synthetic samples, as `SampleKey`s.

    Indices `0..num_real-1` are real and `num_real..num_real+num_synthetic-1` synthetic (the layout of
    `ImageClassificationDataset`). Each side is a stream of reshuffled passes, so the smaller side (the K-shot real
    images) is cycled as the reference repeats it. An epoch lasts until the side that needs the most batches has
    been seen once. With `num_replicas` processes, all ranks draw the same global batches (shared seed) and rank r
    takes global batches r, r + num_replicas, ...: distinct batches, same ratio, same length on every rank.

    Every slot of every global batch also gets its own augmentation seed from (seed, epoch), so an image's
    augmentation depends on where it is drawn, not on dataloader workers or on what ran before: a run resumed from a
    checkpoint (the Trainer replays the sampler and skips the done batches) augments exactly as the uninterrupted one.
    """

    def __init__(
        self,
        num_real: int,
        num_synthetic: int,
        real_per_batch: int,
        synthetic_per_batch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        for name, count, per_batch in (
            ("real", num_real, real_per_batch),
            ("synthetic", num_synthetic, synthetic_per_batch),
        ):
            if per_batch < 0 or (per_batch > 0 and count == 0):
                raise ValueError(f"Batches need {per_batch} {name} images but the training set has {count}.")
        if real_per_batch + synthetic_per_batch < 1:
            raise ValueError("A batch needs at least one image: real_per_batch + synthetic_per_batch must be >= 1.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in 0..{num_replicas - 1}, got {rank}.")
        self.num_real, self.num_synthetic = num_real, num_synthetic
        self.real_per_batch, self.synthetic_per_batch = real_per_batch, synthetic_per_batch
        self.batch_size = real_per_batch + synthetic_per_batch  # read by accelerate
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        passes = [
            math.ceil(n / k)
            for n, k in ((self.num_real, self.real_per_batch), (self.num_synthetic, self.synthetic_per_batch))
            if k
        ]
        return math.ceil(max(passes) / self.num_replicas)

    def _stream(self, size: int, length: int, side: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, side])
        passes = [rng.permutation(size) for _ in range(math.ceil(length / size))] if length else []
        return np.concatenate(passes)[:length] if passes else np.zeros(0, dtype=np.int64)

    def __iter__(self):
        num_global = len(self) * self.num_replicas
        real = self._stream(self.num_real, num_global * self.real_per_batch, side=0)
        synthetic = self._stream(self.num_synthetic, num_global * self.synthetic_per_batch, side=1) + self.num_real
        seeds = np.random.default_rng([self.seed, self.epoch, 2]).integers(
            2**63 - 1, size=(num_global, self.batch_size)
        )
        r, s = self.real_per_batch, self.synthetic_per_batch
        for step in range(len(self)):
            g = step * self.num_replicas + self.rank  # this rank's global batch
            indices = real[g * r : (g + 1) * r].tolist() + synthetic[g * s : (g + 1) * s].tolist()
            yield [SampleKey(index, seed) for index, seed in zip(indices, seeds[g].tolist())]


def find_batch_sampler(loader) -> RealSyntheticBatchSampler | None:
    """The `RealSyntheticBatchSampler` under a dataloader's wrappers, however deep, or None.

    accelerate wraps it in a `BatchSamplerShard` under several processes, and a resumed epoch adds a
    `SkipBatchSampler` and a new `DataLoaderShard` over those: its `set_epoch` (and the Trainer's, one level deeper)
    no longer reaches the sampler, which would replay epoch 0's order for the rest of the resumed epoch.
    """
    seen, todo = set(), [loader]
    while todo:
        current = todo.pop()
        if isinstance(current, RealSyntheticBatchSampler):
            return current
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        todo.extend(getattr(current, name, None) for name in ("batch_sampler", "sampler", "base_dataloader"))
    return None


# Outputs of a deterministic transform kept in memory per dataset, when they all fit (CLIP ViT-B/16: ~0.6 MB each).
CACHE_BYTES = 512 << 20


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Real rows then synthetic rows of two normalized datasets (`image`, `label`), each item transformed to
    `{"pixel_values", "labels", "is_real"}`.

    Items are fetched by row index or by `SampleKey` (the training sampler's); a key's seed goes to a `transform`
    that takes a `seed` argument (`DataDreamAugmentation`) and comes back as the item's `augmentation_seed`. The
    outputs of a transform marked `deterministic` (`EvalTransform`) are computed once and kept, when all of them fit
    in `cache_bytes`: evaluations and augmentation-free training then decode each image once.
    """

    def __init__(self, real=None, synthetic=None, transform=None, cache_bytes: int = CACHE_BYTES):
        if real is None and synthetic is None:
            raise ValueError("ImageClassificationDataset needs real or synthetic rows, got neither.")
        if transform is None:
            raise ValueError("`transform` (PIL image -> pixel tensor) is required.")
        self.real, self.synthetic, self.transform = real, synthetic, transform
        self._transform_takes_seed = _takes_seed(transform)
        self.num_real = len(real) if real is not None else 0
        self.num_synthetic = len(synthetic) if synthetic is not None else 0
        # A deterministic transform's outputs are kept (decoding and processing an image once, not every epoch and
        # every evaluation) when all of them fit in `cache_bytes`; decided at the first item.
        self.cache_bytes = cache_bytes if getattr(transform, "deterministic", False) else 0
        self._cache: dict[int, tuple[torch.Tensor, int]] | None = {} if self.cache_bytes > 0 else None

    def __len__(self) -> int:
        return self.num_real + self.num_synthetic

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (key, None)
        is_real = index < self.num_real
        if self._cache is not None and index in self._cache:
            pixel_values, label = self._cache[index]
        else:
            row = self._row(index, is_real)
            if seed is not None and self._transform_takes_seed:
                pixel_values = self.transform(row["image"], seed=seed)
            else:
                pixel_values = self.transform(row["image"])
            label = int(row["label"])
            self._remember(index, pixel_values, label)
        item = {"pixel_values": pixel_values, "labels": label, "is_real": is_real}
        if seed is not None:
            item["augmentation_seed"] = seed
        return item

    def _row(self, index: int, is_real: bool) -> dict:
        try:  # datasets decodes the image here
            return self.real[index] if is_real else self.synthetic[index - self.num_real]
        except (OSError, ValueError, PILImage.DecompressionBombError) as err:
            side, row_index = ("real", index) if is_real else ("synthetic", index - self.num_real)
            raise DatasetInputError(
                f"Image of row {row_index} of the {side} data cannot be decoded ({err}). Remove or replace it."
            ) from err

    def _remember(self, index: int, pixel_values: torch.Tensor, label: int) -> None:
        if self._cache is None:
            return
        if not self._cache and pixel_values.nbytes * len(self) > self.cache_bytes:
            self._cache = None  # too large to keep: every item is decoded and processed when drawn
            return
        self._cache[index] = (pixel_values, label)


class TransformedRows(torch.utils.data.Dataset):
    """A `datasets.Dataset` whose items already hold `pixel_values` and a `label` (or `labels`), e.g. through
    `dataset.with_transform(...)` as in transformers' image-classification example, in the index layout of
    `ImageClassificationDataset`: its real rows (its `is_real` column; every row without one), then its synthetic rows.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        if "is_real" in dataset.column_names:
            is_real = np.asarray(
                dataset.with_format("numpy")["is_real"][:], dtype=bool
            )  # the raw column, untransformed
        else:
            is_real = np.ones(len(dataset), dtype=bool)
        self.rows = np.concatenate([np.flatnonzero(is_real), np.flatnonzero(~is_real)])
        self.num_real = int(is_real.sum())
        self.num_synthetic = len(dataset) - self.num_real

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index = key.index if isinstance(key, SampleKey) else key
        item = self.dataset[int(self.rows[index])]
        if "pixel_values" not in item or not ({"label", "labels"} & set(item)):
            raise DatasetInputError(
                f"Training items need `pixel_values` and `label` (or `labels`), got {sorted(item)}: give the dataset "
                "a transform that adds `pixel_values`, e.g. `dataset.with_transform(preprocess)`."
            )
        label = item["labels"] if "labels" in item else item["label"]
        return {
            "pixel_values": torch.as_tensor(item["pixel_values"]),
            "labels": int(label),
            "is_real": index < self.num_real,
        }


def _takes_seed(transform) -> bool:
    try:
        return "seed" in signature(transform).parameters
    except (TypeError, ValueError):  # a callable without a readable signature (some C extensions)
        return False


def per_class_rows(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of up to `per_class` rows of each label, chosen with a generator seeded by `seed`."""
    if per_class < 1:
        raise ValueError(f"`per_class` must be >= 1 (or None for all rows), got {per_class}.")
    rng = np.random.default_rng([seed, 3])
    keep = []
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        rows = np.flatnonzero(labels == label)
        keep += sorted(int(i) for i in rng.permutation(rows)[:per_class])
    return np.asarray(sorted(keep), dtype=np.int64)


def per_class_subset(dataset, per_class: int | None, seed: int = 0):
    """Up to `per_class` rows of each class, chosen with a seeded generator (all rows when `per_class` is None)."""
    if per_class is None:
        return dataset
    return dataset.select(per_class_rows(labels_of(dataset), per_class, seed))


def load_synthetic_training_set(
    source: str,
    class_names: list[str],
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    images_per_class: int | None = None,
    seed: int = 0,
    real=None,
    real_source: str | None = None,
    manifest: FewShotManifest | None = None,
):
    """Loads a stage-2 dataset (a `generate_synthetic.py` output folder, a `save_to_disk` folder or a Hub id) as
    `image` + `label`, dropping provenance columns, and checks that its classes are `class_names` in the same order.

    Another stage's output folder is refused by name, and so is the real dataset itself (`real_source`, the path, or
    `real`, the normalized real rows, when the synthetic rows are the same).
    """
    kind = output_folder_kind(source)
    if kind in (STAGE1_FOLDER, STAGE3_FOLDER):
        raise DatasetInputError(
            f"--synthetic_dataset {source!r} is {kind}; pass the stage-2 output (the --output_dir of "
            "generate_synthetic.py)."
        )
    if real_source is not None and _same_path(source, real_source):
        raise DatasetInputError(_REAL_AS_SYNTHETIC.format(source=source))
    if kind == STAGE2_FOLDER:
        _refuse_other_draw(source, manifest)
        source = load_synthetic_dataset(source)
    synthetic = load_labelled_dataset(source, split=split, image_column=image_column, label_column=label_column)
    names = class_names_of(synthetic)
    if names != list(class_names):
        raise DatasetInputError(
            f"The synthetic dataset {source!r} has classes {names[:5]}{'...' if len(names) > 5 else ''} "
            f"({len(names)}), but the real data has {list(class_names)[:5]}{'...' if len(class_names) > 5 else ''} "
            f"({len(class_names)}). Generate it from the same class list (stage 2 reads it from the stage-1 output)."
        )
    if real is not None and _same_rows(synthetic, real):
        raise DatasetInputError(_REAL_AS_SYNTHETIC.format(source=source))
    return per_class_subset(synthetic, images_per_class, seed)


def _refuse_other_draw(folder: str, manifest: FewShotManifest | None) -> None:
    """Refuses a stage-2 folder whose adapters learned from another K-shot draw than `manifest` (their images would
    carry real images the classifier's K shots leave out). Folders that record no draw (the frozen generator, older
    runs) pass."""
    drawn = _read_json(Path(folder) / GENERATION_CONFIG_NAME).get("few_shot")
    if manifest is None or not isinstance(drawn, dict) or drawn.get("indices") is None:
        return
    if [list(map(int, rows)) for rows in drawn["indices"]] != manifest.indices:
        raise DatasetInputError(
            f"--synthetic_dataset {folder!r} was generated with adapters trained on another K-shot draw "
            f"(K={drawn.get('k')}, seed {drawn.get('seed')}) than --few_shot_manifest {manifest.path!r} "
            f"(K={manifest.k}, seed {manifest.seed}): its images carry real images the classifier's K shots leave "
            "out. Run stages 1 and 2 with this manifest, or pass the manifest stage 1 used."
        )


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


_REAL_AS_SYNTHETIC = (
    "--synthetic_dataset {source!r} holds the real training images (--real_dataset): pass the stage-2 output (the "
    "--output_dir of generate_synthetic.py), or --train_mode real for a real-only run."
)


def _same_path(a: str, b: str) -> bool:
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.resolve() == second.resolve() if first.exists() and second.exists() else str(a) == str(b)


def _same_rows(a, b) -> bool:
    """Whether two normalized datasets hold the same rows: labels, then the stored first and last images."""
    if len(a) != len(b) or len(a) == 0 or not np.array_equal(labels_of(a), labels_of(b)):
        return False
    raw_a, raw_b = (d.cast_column("image", Image(decode=False)) for d in (a, b))
    return all(raw_a[i]["image"] == raw_b[i]["image"] for i in (0, len(a) - 1))


def collate_image_batch(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks items into `pixel_values` (B, 3, H, W), `labels` (B,) (from each item's `labels`, else `label`),
    `is_real` (B,) bool (True when absent) and, when every item has one, `augmentation_seeds` (B,)."""
    batch = {
        "pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features]),
        "labels": torch.tensor([f["labels"] if "labels" in f else f["label"] for f in features], dtype=torch.long),
        "is_real": torch.tensor([bool(f.get("is_real", True)) for f in features], dtype=torch.bool),
    }
    if all("augmentation_seed" in f for f in features):
        batch["augmentation_seeds"] = torch.tensor([f["augmentation_seed"] for f in features], dtype=torch.long)
    return batch


def load_classifier_data(args: ClassifierArguments, training_args: DataDreamTrainingArguments) -> dict:
    """Real K-shot train rows, validation and test rows (neither holding an image the model trains on), synthetic rows;
    every input check happens here, before any training.

    With a manifest, every real split is loaded with the manifest's classes, order and names. The test source is a
    split (`test_split`, of `test_dataset` or `real_dataset`), a folder (`test_dataset`) or a carve (`test_per_class`)
    of `real_split` outside the K shots and the validation carve; a test or validation source that is the table the
    K shots come from, or a test image that is byte-identical to a training or validation image, is refused.
    """
    manifest = FewShotManifest.load(args.few_shot_manifest) if args.few_shot_manifest else None
    load = _real_loader(args, manifest)
    if manifest is not None:
        manifest.check_split(args.real_dataset, args.real_split, "--real_split")
    real = load(args.real_dataset, args.real_split)
    names = class_names_of(real)
    data = {"class_names": names, "manifest": manifest, "real_train": None, "synthetic": None, "test": None}
    kshot_rows = []
    if manifest is not None:
        data["real_train"] = manifest.select(real)  # checks it was drawn from this very dataset
        kshot_rows = manifest.flat_indices
    pool = np.setdiff1d(np.arange(len(real)), np.asarray(kshot_rows, dtype=np.int64))  # rows outside the K shots
    outside = "outside the K-shot subset" if manifest is not None else "(no K-shot subset)"
    if args.validation_split:
        _refuse_same_table(args.real_dataset, args.validation_split, args, "The validation data")
        data["validation"] = load(args.real_dataset, args.validation_split)
        data["validation_source"] = f"real split `{args.validation_split}`"
        pool_left = pool
    else:
        if len(pool) == 0:
            raise DatasetInputError(
                f"Split {args.real_split!r} has no image outside the K-shot subset to validate on; pass "
                "`--validation_split` with a real validation split."
            )
        rows = pool[per_class_rows(labels_of(real)[pool], args.validation_per_class, seed=training_args.seed)]
        data["validation"] = real.select(rows)
        data["validation_source"] = (
            f"real split `{args.real_split}` {outside}, up to {args.validation_per_class} per class"
        )
        pool_left = np.setdiff1d(pool, rows)
    if args.test_per_class is not None:
        if len(pool_left) == 0:
            raise DatasetInputError(
                f"Split {args.real_split!r} has no image left outside the K shots and the validation carve to carve "
                "a test set from; pass `--test_dataset` or `--test_split` instead."
            )
        rows = pool_left[per_class_rows(labels_of(real)[pool_left], args.test_per_class, seed=training_args.seed + 1)]
        data["test"] = real.select(rows)
        data["test_source"] = (
            f"real split `{args.real_split}` outside the K-shot subset and the validation images, up to "
            f"{args.test_per_class} per class"
        )
    elif args.test_split or args.test_dataset:
        test_dataset, split = args.test_dataset or args.real_dataset, args.test_split or "test"
        _refuse_same_table(test_dataset, split, args, "The test data")
        data["test"] = load(test_dataset, split)
        single = is_single_table(test_dataset)
        data["test_source"] = f"real data {test_dataset}" if single else f"real split `{split}` of {test_dataset}"
    if data["test"] is not None:
        trained_on = [d for d in (data["real_train"], data["validation"]) if d is not None]
        _refuse_shared_images(data["test"], trained_on, data["test_source"])
        data["test_source"] += " (held out: no image of it is a training or validation image)"
    if args.synthetic_dataset and training_args.train_mode != "real":
        data["synthetic"] = load_synthetic_training_set(
            args.synthetic_dataset,
            names,
            split=args.synthetic_split,
            images_per_class=args.synthetic_images_per_class,
            seed=training_args.seed,
            real=real,
            real_source=args.real_dataset,
            manifest=manifest,
        )
    if training_args.train_mode == "synthetic":
        data["real_train"] = None
    return data


def _real_loader(args: ClassifierArguments, manifest: FewShotManifest | None):
    """`load(source, split)` of a real split: with the manifest's classes and names, else `--class_names` and the
    preset's curated names."""
    class_names = args.class_names.split(",") if args.class_names else None
    columns = {"image_column": args.image_column, "label_column": args.label_column}

    def load(source, split):
        if manifest is not None:
            return load_manifest_dataset(manifest, source, split, class_names=class_names, **columns)
        dataset = load_labelled_dataset(source, split=split, class_names=class_names, **columns)
        return rename_classes(dataset, display_class_names(class_names_of(dataset), args.dataset_preset))

    return load


def _refuse_same_table(source, split: str, args: ClassifierArguments, what: str) -> None:
    """Refuses `split` of `source` when it is the very table the K shots come from (same split, or a source without
    splits, such as an image folder, where every split name loads the same rows)."""
    if not _same_source(source, args.real_dataset):
        return
    if split == args.real_split or is_single_table(source):
        raise DatasetInputError(
            f"{what} (split {split!r} of {str(source)!r}) are the images of `--real_split` {args.real_split!r}"
            f"{' (the source has no splits)' if is_single_table(source) else ''}, which the K-shot training "
            "images come from: an accuracy on them is not held out. Pass `--test_dataset` with held-out images, "
            "`--test_per_class N` to carve a test set outside the K shots and the validation images, a "
            "`--test_split`/`--validation_split` of other images, or `--test_split none` for no test evaluation."
        )


def _same_source(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a is b or (isinstance(a, str) and a == b)


def _refuse_shared_images(test, trained_on: list, test_source: str) -> None:
    """Refuses a test set holding a byte-identical copy of a training or validation image."""
    seen = {digest for dataset in trained_on for digest in image_digests(dataset)}
    shared = [row for row, digest in enumerate(image_digests(test)) if digest in seen]
    if shared:
        raw = test.cast_column("image", Image(decode=False))
        example = raw[shared[0]]["image"].get("path") or f"row {shared[0]}"
        raise DatasetInputError(
            f"The test data ({test_source}) holds {len(shared)} image(s) identical to K-shot training or validation "
            f"images (e.g. {example!r}): its accuracy would not be held out. Remove them from the test data, or "
            "pass another `--test_dataset`/`--test_split`, or `--test_per_class N`."
        )
