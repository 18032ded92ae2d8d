"""The synthetic dataset, the stage-2 -> stage-3 contract: a generation folder's files, its shard format (written by
stage 2) and the `datasets` builder that reads a finished folder (stage 3, the tiny world's report).

A generation folder holds `generation_config.json` (what made it), `shards/<class folder>/shard-<start>-<end>.parquet`
(PNG bytes + per-image provenance) each with a `.json` manifest written after it, and, once complete,
`generation_manifest.json`, `sample_grid.png` and `README.md` (the dataset card, `generate.dataset`), whose YAML points
`datasets.load_dataset(<folder>)` at the shards themselves (no second copy of the images).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .faults import fault_point
from .files import atomic_write, file_sha256, write_json_atomic
from .run_folder import class_folder_name

GENERATION_CONFIG_NAME = "generation_config.json"
GENERATION_MANIFEST_NAME = "generation_manifest.json"
SHARDS_DIR = "shards"
SHARD_FILES = f"{SHARDS_DIR}/*/shard-*.parquet"  # what the dataset card points `load_dataset(<folder>)` at
SHARD_FORMAT_VERSION = 1

SHARD_SCHEMA = pa.schema(
    [
        ("label", pa.int64()),
        ("image_index", pa.int64()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("image", pa.binary()),  # PNG bytes: lossless, so the dataset holds exactly what the pipeline made
    ]
)
# A fusion run's shards (LoFT, `--fusion pairs`) also record each image's pair, between the prompt and the image.
FUSION_FIELDS = [
    ("fusion_adapters", pa.list_(pa.string())),  # the pair's keys in the stage-1 adapter_index.json
    ("fusion_rows", pa.list_(pa.int64())),  # the dataset rows of the K-shot images those adapters were trained on
    ("fusion_weights", pa.list_(pa.float64())),
]


def shard_schema(fusion: bool = False) -> pa.Schema:
    """The shard files' columns: `SHARD_SCHEMA`, with a fusion run's `FUSION_FIELDS` before the image."""
    if not fusion:
        return SHARD_SCHEMA
    fields = list(SHARD_SCHEMA)
    return pa.schema(fields[:-1] + [pa.field(name, kind) for name, kind in FUSION_FIELDS] + fields[-1:])


def is_fusion_run(generation_config: dict) -> bool:
    """Whether a run's `generation_config.json` describes a fusion run (its shards carry the fusion columns)."""
    return generation_config["generation"].get("fusion") is not None


class SyntheticDatasetError(InputError):
    """A generation folder that is missing, incomplete or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class Shard:
    """Images `start..end-1` of class `class_index`: the unit of work, of atomic writing and of resuming."""

    class_index: int
    start: int
    end: int

    @property
    def num_images(self) -> int:
        return self.end - self.start

    def relative_path(self, class_names: list[str]) -> str:
        folder = class_folder_name(self.class_index, class_names[self.class_index])
        return f"{SHARDS_DIR}/{folder}/shard-{self.start:06d}-{self.end:06d}.parquet"


def plan_shards(num_classes: int, images_per_class: int, shard_size: int) -> list[Shard]:
    """All shards of a run, class by class; the plan depends only on these three numbers, never on the processes."""
    return [
        Shard(c, start, min(start + shard_size, images_per_class))
        for c in range(num_classes)
        for start in range(0, images_per_class, shard_size)
    ]


def write_shard(
    output_dir: str | os.PathLike, shard: Shard, class_names: list[str], rows: dict[str, list], run_fingerprint: str
) -> Path:
    """Writes a shard's Parquet file, then its JSON manifest, each via temp file + rename.

    The manifest (with the Parquet file's sha256) is written last, so a shard counts as finished only once both are
    complete; a kill at any point leaves at most a temp file or an unlisted Parquet file, which a re-run replaces.
    """
    path = Path(output_dir) / shard.relative_path(class_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows, schema=shard_schema(fusion=FUSION_FIELDS[0][0] in rows))
    if table.num_rows != shard.num_images:
        raise ValueError(f"Shard {path.name} needs {shard.num_images} rows, got {table.num_rows}.")
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)
        fault_point("shard-write")  # test hook (datadream_hf.faults): the temp file may be partly written
    fault_point("shard-manifest")  # test hook: a Parquet file without its manifest is not a finished shard
    manifest = {
        "format_version": SHARD_FORMAT_VERSION,
        "run_fingerprint": run_fingerprint,
        "class_index": shard.class_index,
        "class_name": class_names[shard.class_index],
        "start": shard.start,
        "end": shard.end,
        "file": path.name,
        "num_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }
    write_json_atomic(path.with_suffix(".json"), manifest)
    return path


def is_shard_finished(
    output_dir: str | os.PathLike, shard: Shard, class_names: list[str], run_fingerprint: str
) -> bool:
    """True iff the shard's manifest exists, belongs to this run and matches its Parquet file byte for byte."""
    path = Path(output_dir) / shard.relative_path(class_names)
    try:
        with open(path.with_suffix(".json")) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    expected = {"run_fingerprint": run_fingerprint, "class_index": shard.class_index, "start": shard.start}
    if any(manifest.get(k) != v for k, v in expected.items()) or manifest.get("end") != shard.end:
        return False
    if not path.is_file() or path.stat().st_size != manifest.get("num_bytes"):
        return False
    return file_sha256(path) == manifest.get("sha256")


def remove_stale_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the temp files a killed run left in `shards/` (never a finished shard: those are not hidden .tmp)."""
    removed = []
    shards_dir = Path(output_dir) / SHARDS_DIR
    if shards_dir.is_dir():
        for tmp in shards_dir.glob("*/.*.tmp"):
            tmp.unlink()
            removed.append(tmp)
    return removed


def read_shard(output_dir: str | os.PathLike, shard: Shard, class_names: list[str], fusion: bool = False) -> pa.Table:
    return pq.read_table(Path(output_dir) / shard.relative_path(class_names), schema=shard_schema(fusion))


def read_generation_config(output_dir: str | os.PathLike) -> dict:
    """Reads `generation_config.json` of a generation folder; errors name the folder and what to run."""
    path = Path(output_dir) / GENERATION_CONFIG_NAME
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise SyntheticDatasetError(
            f"No {GENERATION_CONFIG_NAME} in {str(output_dir)!r}: is it the --output_dir of generate_synthetic.py?"
        ) from err
    except json.JSONDecodeError as err:
        raise SyntheticDatasetError(f"{str(path)!r} is not valid JSON ({err}); re-run generate_synthetic.py.") from err


def missing_shards(output_dir: str | os.PathLike, generation_config: dict | None = None) -> list[Shard]:
    """The shards of the run's plan that are not finished (empty when generation is complete)."""
    info = generation_config or read_generation_config(output_dir)
    params, names = info["generation"], info["class_names"]
    plan = plan_shards(len(names), params["images_per_class"], params["shard_size"])
    return [s for s in plan if not is_shard_finished(output_dir, s, names, info["fingerprint"])]


def _provenance(info: dict) -> dict:
    """Per-class provenance strings shared by the builder rows and the card."""
    base = info["base_model"]
    base_model = base["pretrained_model_name_or_path"] + (f"@{base['revision']}" if base.get("revision") else "")
    return {"base_model": base_model, "generation_params": json.dumps(info["generation"], sort_keys=True)}


class SyntheticDataDreamBuilder(datasets.GeneratorBasedBuilder):
    """Materializes a finished generation folder as a `datasets.Dataset` (one `train` split).

    Instantiate it directly (loading scripts are gone in datasets 5):

    ```py
    builder = SyntheticDataDreamBuilder(generation_dir="out/synthetic")
    builder.download_and_prepare()
    dataset = builder.as_dataset(split="train")
    ```
    Features: `image` (PNG bytes embedded in the Arrow files), `label` (ClassLabel with the class names), and
    provenance: `image_index`, `seed` (per-image seed), `prompt`, `adapter`, `base_model`, `generation_params` (JSON);
    a fusion run adds `fusion_adapters`, `fusion_rows` and `fusion_weights` (each image's pair), and its `adapter` is
    the pair's weighted sum, e.g. `0.5 * <source>/<class>/image_000003 + 0.5 * <source>/<class>/image_000011`.
    """

    VERSION = datasets.Version("1.0.0")
    DEFAULT_WRITER_BATCH_SIZE = 100  # rows hold whole PNGs: keep the writer's memory small

    def __init__(self, generation_dir: str | os.PathLike, cache_dir: str | None = None, **kwargs):
        self.generation_dir = Path(generation_dir)
        self.generation_config = read_generation_config(self.generation_dir)
        missing = missing_shards(self.generation_dir, self.generation_config)
        if missing:
            names = self.generation_config["class_names"]
            raise SyntheticDatasetError(
                f"Generation in {str(generation_dir)!r} is incomplete: {len(missing)} shard(s) missing or damaged, "
                f"e.g. {missing[0].relative_path(names)}. Re-run generate_synthetic.py with the same arguments to "
                "finish it (finished shards are kept)."
            )
        # The run fingerprint keys the cache: two generation runs never share a prepared dataset.
        kwargs.setdefault("hash", self.generation_config["fingerprint"][:16])
        kwargs.setdefault("dataset_name", "datadream_synthetic")
        super().__init__(cache_dir=cache_dir, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        config = self.generation_config
        return datasets.DatasetInfo(
            description="Synthetic images generated with DataDream (few-shot LoRA-adapted Stable Diffusion).",
            features=synthetic_features(config["class_names"], fusion=is_fusion_run(config)),
            citation=DATADREAM_CITATION,
        )

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={})]

    def _generate_examples(self):
        config = self.generation_config
        names, params = config["class_names"], config["generation"]
        provenance, fusion = _provenance(config), is_fusion_run(config)
        for shard in plan_shards(len(names), params["images_per_class"], params["shard_size"]):
            per_class = config["adapters"]["per_class"][shard.class_index]
            image_ids = {image["key"]: image["id"] for image in per_class.get("images", [])}
            rows = read_shard(self.generation_dir, shard, names, fusion=fusion).to_pylist()
            for row in rows:
                example = {
                    "image": {"bytes": row["image"], "path": None},
                    "label": row["label"],
                    "image_index": row["image_index"],
                    "seed": row["seed"],
                    "prompt": row["prompt"],
                    "adapter": per_class["id"],
                    **provenance,
                }
                if fusion:
                    example.update({name: row[name] for name, _ in FUSION_FIELDS})
                    example["adapter"] = " + ".join(
                        f"{weight:g} * {image_ids[key]}"
                        for key, weight in zip(row["fusion_adapters"], row["fusion_weights"])
                    )
                yield f"{row['label']}-{row['image_index']}", example


# A fusion run's per-image pair as `datasets` features (the `FUSION_FIELDS` columns).
FUSION_FEATURES = {
    "fusion_adapters": datasets.List(datasets.Value("string")),
    "fusion_rows": datasets.List(datasets.Value("int64")),
    "fusion_weights": datasets.List(datasets.Value("float64")),
}


def synthetic_features(class_names: list[str], fusion: bool = False) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            "image_index": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "prompt": datasets.Value("string"),
            "adapter": datasets.Value("string"),
            "base_model": datasets.Value("string"),
            "generation_params": datasets.Value("string"),
            **(FUSION_FEATURES if fusion else {}),
        }
    )


def shard_features(class_names: list[str], fusion: bool = False) -> datasets.Features:
    """The shard files' columns as `datasets` features, in file order: what `datasets.load_dataset(<generation
    folder>)` gives through the dataset card's YAML (PNG bytes as `Image`, the label as `ClassLabel`)."""
    features = {
        "label": datasets.ClassLabel(names=list(class_names)),
        "image_index": datasets.Value("int64"),
        "seed": datasets.Value("int64"),
        "prompt": datasets.Value("string"),
        "image": datasets.Image(),
        **FUSION_FEATURES,
    }
    return datasets.Features({name: features[name] for name in shard_schema(fusion).names})


def load_synthetic_dataset(generation_dir: str | os.PathLike, cache_dir: str | None = None) -> datasets.Dataset:
    """The finished generation folder as a `Dataset` (prepared once into the `datasets` cache, then memory-mapped)."""
    builder = SyntheticDataDreamBuilder(generation_dir=generation_dir, cache_dir=cache_dir)
    builder.download_and_prepare()
    return builder.as_dataset(split="train")


DATADREAM_CITATION = """@inproceedings{kim2024datadream,
  title={DataDream: Few-shot Guided Dataset Generation},
  author={Kim, Jae Myung and Bader, Jessica and Alaniz, Stephan and Schmid, Cordelia and Akata, Zeynep},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}"""
