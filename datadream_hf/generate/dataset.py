"""The finished synthetic dataset of stage 2: its sample grid, its dataset card (through which `datasets.load_dataset`
reads the folder), a `save_to_disk` copy and the Hub upload (Parquet + card). The package's own reader of a generation
folder, with every provenance column, is `synthetic.load_synthetic_dataset`."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import datasets
import yaml
from PIL import Image as PILImage

from .. import hub
from ..cards import render_card
from ..files import save_png_atomic, write_text_atomic
from ..grids import image_grid
from ..synthetic import (
    DATADREAM_CITATION,
    SHARD_FILES,
    Shard,
    is_fusion_run,
    load_synthetic_dataset,
    read_generation_config,
    read_shard,
    shard_features,
    synthetic_features,
)

SAMPLE_GRID_NAME = "sample_grid.png"
DATASET_CARD_TEMPLATE = "dataset_card.md"


def save_synthetic_dataset(
    generation_dir: str | os.PathLike, dataset_path: str | os.PathLike, cache_dir: str | None = None
) -> datasets.Dataset:
    """Builds the dataset and writes it with `save_to_disk` (reload with `datasets.load_from_disk(dataset_path)`)."""
    dataset = load_synthetic_dataset(generation_dir, cache_dir=cache_dir)
    dataset.save_to_disk(str(dataset_path))
    return dataset


def make_sample_grid(
    generation_dir: str | os.PathLike, images_per_class: int = 8, max_classes: int = 10
) -> PILImage.Image:
    """A grid with one row per class (the first `max_classes`) of that class's first images."""
    config = read_generation_config(generation_dir)
    names, params = config["class_names"], config["generation"]
    rows = []
    for c in range(min(len(names), max_classes)):
        shard = Shard(c, 0, min(params["shard_size"], params["images_per_class"]))  # the class's first shard
        table = read_shard(generation_dir, shard, names, fusion=is_fusion_run(config)).slice(0, images_per_class)
        rows.append([PILImage.open(io.BytesIO(b)).convert("RGB") for b in table.column("image").to_pylist()])
    return image_grid(rows)


def write_sample_grid(generation_dir: str | os.PathLike, **kwargs) -> Path:
    return save_png_atomic(make_sample_grid(generation_dir, **kwargs), Path(generation_dir) / SAMPLE_GRID_NAME)


def render_dataset_card(
    generation_dir: str | os.PathLike,
    license: str = "other",
    repo_id: str | None = None,
    pretty_name: str | None = None,
    hub_layout: bool = False,
) -> str:
    """The dataset card (README.md) of a generation folder, from `model_cards/dataset_card.md`.

    Args:
        license: License of the base model, which the generated images inherit (e.g. `openrail++` for SD 2.1).
        repo_id: The Hub dataset id, used in the card's loading snippet.
        hub_layout: the card of the Hub upload (`data/train-*` Parquet files of the built dataset) instead of the
            generation folder's own (its YAML points `datasets.load_dataset(<folder>)` at the shard files).
    """
    config = read_generation_config(generation_dir)
    names, params = config["class_names"], config["generation"]
    fusion = is_fusion_run(config)
    files, features = (
        ("data/train-*", synthetic_features(names, fusion))
        if hub_layout
        else (SHARD_FILES, shard_features(names, fusion))
    )
    metadata = {
        "license": license,
        "pretty_name": pretty_name or "DataDream synthetic dataset",
        "task_categories": ["image-classification"],
        "tags": ["datadream", "synthetic", "diffusers", "stable-diffusion", "lora"],
        "size_categories": [_size_category(len(names) * params["images_per_class"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}],
        "dataset_info": {"features": features._to_yaml_list()},
    }
    per_class = config["adapters"]["per_class"]
    classes = [
        {
            "label": i,
            "name": name,
            "prompt": config["prompts"][i],
            "adapter": per_class[i]["id"],
            "image_adapters": len(per_class[i].get("images", [])),
        }
        for i, name in enumerate(names)
    ]
    return render_card(
        DATASET_CARD_TEMPLATE,
        metadata_yaml=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True),
        pretty_name=metadata["pretty_name"],
        repo_id=repo_id or "<your-namespace>/<dataset-name>",
        hub_layout=hub_layout,
        license=license,
        base_model=config["base_model"],
        adapters=config["adapters"],
        prompt_template=config["prompt_template"],
        generation=params,
        scheduler_class=config["scheduler_class"],
        num_images=len(names) * params["images_per_class"],
        classes=classes,
        sample_grid=(Path(generation_dir) / SAMPLE_GRID_NAME).is_file(),
        library_versions=config["library_versions"],
        command=config.get("command"),
        citation=DATADREAM_CITATION,
    )


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "n>1M"


def write_dataset_card(generation_dir: str | os.PathLike, **kwargs) -> Path:
    path = Path(generation_dir) / "README.md"
    write_text_atomic(path, render_dataset_card(generation_dir, **kwargs))
    return path


def push_synthetic_dataset_to_hub(
    generation_dir: str | os.PathLike,
    repo_id: str,
    license: str = "other",
    token: str | None = None,
    private: bool = False,
    cache_dir: str | None = None,
) -> str:
    """Pushes the dataset as Parquet (`Dataset.push_to_hub`) with its card and sample grid. Returns the repo URL.

    The card goes first: `push_to_hub` then merges its `dataset_info`/`configs` YAML into that README instead of
    writing a bare one. The token is only passed to the Hub client, never written.
    """
    dataset = load_synthetic_dataset(generation_dir, cache_dir=cache_dir)
    if not (Path(generation_dir) / SAMPLE_GRID_NAME).is_file():
        write_sample_grid(generation_dir)
    with tempfile.TemporaryDirectory() as staging:
        Path(staging, "README.md").write_text(
            render_dataset_card(generation_dir, license=license, repo_id=repo_id, hub_layout=True), encoding="utf-8"
        )
        Path(staging, SAMPLE_GRID_NAME).write_bytes((Path(generation_dir) / SAMPLE_GRID_NAME).read_bytes())
        url = hub.push_folder_to_hub(
            staging,
            repo_id,
            repo_type="dataset",
            token=token,
            private=private,
            commit_message="Add DataDream dataset card",
        )
    dataset.push_to_hub(repo_id, token=token, private=private, commit_message="Upload DataDream synthetic images")
    return url
