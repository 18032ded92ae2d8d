"""The stage-1 -> stage-2 contract: `adapter_index.json`, which folder of a stage-1 output holds which adapter.

A stage-1 output holds `pytorch_lora_weights.safetensors` at the top (`dset`: one adapter for every class), in one
`class_folder_name(i, name)` folder per class (`cls`), or in one `<class folder>/image_<row>` folder per K-shot image
(`image`, LoFT: each adapter trained on one manifest row), the run record `datadream_config.json` and this index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .run_folder import class_folder_name

ADAPTER_INDEX_NAME = "adapter_index.json"
INDEX_MODES = ("dset", "cls", "image")


def image_adapter_folder(class_index: int, class_name: str, row: int) -> str:
    """The folder of the adapter trained on dataset row `row` (image mode): inside its class's folder."""
    return f"{class_folder_name(class_index, class_name)}/image_{row:06d}"


def image_adapter_index(class_names: list[str], indices: list[list[int]]) -> dict:
    """The index of an image-mode output: adapter `a` (0.., class by class in the manifest's draw order) was trained on
    dataset row `images[a]["row"]` of class `images[a]["class"]` and lives in `adapters[a]`."""
    adapters, images = {}, {}
    for class_index, rows in enumerate(indices):
        for row in rows:
            key = str(len(adapters))
            adapters[key] = image_adapter_folder(class_index, class_names[class_index], int(row))
            images[key] = {"class": class_index, "row": int(row)}
    return {"mode": "image", "class_names": list(class_names), "adapters": adapters, "images": images}


def adapter_index(mode: str, class_names: list[str]) -> dict:
    """The index of a stage-1 output: which folder holds which class's adapter (`cls`) or the single one (`dset`)."""
    if mode == "dset":
        return {"mode": "dset", "class_names": list(class_names), "adapters": {"all": "."}}
    return {
        "mode": "cls",
        "class_names": list(class_names),
        "adapters": {str(i): class_folder_name(i, name) for i, name in enumerate(class_names)},
    }


def adapter_folders(mode: str, class_names: list[str]) -> dict[str, str]:
    """Class name (or 'all' in dset mode) -> adapter folder relative to the output dir."""
    folders = adapter_index(mode, class_names)["adapters"]
    if mode == "dset":
        return {"all": folders["all"]}
    return {class_names[int(i)]: folder for i, folder in folders.items()}


def read_adapter_index(output_dir: str | os.PathLike) -> dict:
    """Reads and validates `adapter_index.json`; errors name the file and the bad field."""
    path = Path(output_dir) / ADAPTER_INDEX_NAME
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"No {ADAPTER_INDEX_NAME} in {str(output_dir)!r}: is it the output folder of train_datadream_lora.py?"
        ) from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); re-run stage 1 or restore the file.") from err
    if not isinstance(index, dict) or index.get("mode") not in INDEX_MODES:
        mode = index.get("mode") if isinstance(index, dict) else index
        raise ValueError(f"{str(path)!r}: field 'mode' must be one of {list(INDEX_MODES)}, got {mode!r}.")
    names, adapters = index.get("class_names"), index.get("adapters")
    if not isinstance(names, list) or not isinstance(adapters, dict):
        raise ValueError(f"{str(path)!r}: fields 'class_names' (list) and 'adapters' (dict) are required.")
    if not all(isinstance(folder, str) for folder in adapters.values()) or (
        index["mode"] == "dset" and "all" not in adapters
    ):
        raise ValueError(
            f"{str(path)!r}: field 'adapters' must map each class index (cls), image (image) or 'all' (dset) to a "
            f"folder name, got {adapters!r}."
        )
    for key, folder in adapters.items():
        resolved = (Path(output_dir) / folder).resolve()
        if not resolved.is_relative_to(Path(output_dir).resolve()):
            raise ValueError(
                f"{str(path)!r}: adapter folder {folder!r} of {key!r} points outside {str(output_dir)!r}."
            )
    if index["mode"] == "cls":
        missing = [i for i in range(len(names)) if str(i) not in adapters]
        if missing:
            raise ValueError(
                f"{str(path)!r}: no adapter for class(es) {[names[i] for i in missing]}; finish stage 1 for them."
            )
        owner: dict[Path, str] = {}
        for i, name in enumerate(names):
            folder = (Path(output_dir) / adapters[str(i)]).resolve()
            if folder in owner:
                raise ValueError(
                    f"{str(path)!r}: classes {owner[folder]!r} and {name!r} point at the same adapter folder "
                    f"{adapters[str(i)]!r}; in cls mode each class has its own adapter. Restore the index stage 1 "
                    "wrote (or train the classes in dset mode to share one adapter)."
                )
            owner[folder] = name
    if index["mode"] == "image":
        _check_image_index(index, path)
    return index


def _check_image_index(index: dict, path: Path) -> None:
    """Image mode: every adapter names its class and row, each row has one folder, every class has an adapter."""
    names, adapters, images = index["class_names"], index["adapters"], index.get("images")
    if not isinstance(images, dict) or set(images) != set(adapters):
        raise ValueError(f"{str(path)!r}: field 'images' must give the class and row of every adapter in 'adapters'.")
    for key, image in images.items():
        if not (isinstance(image, dict) and isinstance(image.get("class"), int) and isinstance(image.get("row"), int)
                and 0 <= image["class"] < len(names)):  # fmt: skip
            raise ValueError(
                f"{str(path)!r}: images[{key!r}] must be {{'class': 0..{len(names) - 1}, 'row': int}}, got {image!r}."
            )
    if len(set(adapters.values())) != len(adapters):
        raise ValueError(f"{str(path)!r}: two image adapters share a folder; each image has its own adapter.")
    missing = sorted(set(range(len(names))) - {image["class"] for image in images.values()})
    if missing:
        raise ValueError(
            f"{str(path)!r}: no image adapter for class(es) {[names[i] for i in missing]}; finish stage 1 for them."
        )


def image_adapters_by_class(index: dict) -> list[list[tuple[int, str]]]:
    """Image mode: per class, its adapters as (dataset row, folder), in the index's order."""
    per_class: list[list[tuple[int, str]]] = [[] for _ in index["class_names"]]
    for key, folder in index["adapters"].items():
        image = index["images"][key]
        per_class[image["class"]].append((image["row"], folder))
    return per_class
