"""The stage-1 -> stage-2 contract: `adapter_index.json`, which folder of a stage-1 output holds which adapter.

A stage-1 output holds `pytorch_lora_weights.safetensors` at the top (`dset`: one adapter for every class) or in one
`class_folder_name(i, name)` folder per class (`cls`), the run record `datadream_config.json` and this index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .run_folder import class_folder_name

ADAPTER_INDEX_NAME = "adapter_index.json"


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
    if not isinstance(index, dict) or index.get("mode") not in ("dset", "cls"):
        mode = index.get("mode") if isinstance(index, dict) else index
        raise ValueError(f"{str(path)!r}: field 'mode' must be 'dset' or 'cls', got {mode!r}.")
    names, adapters = index.get("class_names"), index.get("adapters")
    if not isinstance(names, list) or not isinstance(adapters, dict):
        raise ValueError(f"{str(path)!r}: fields 'class_names' (list) and 'adapters' (dict) are required.")
    if not all(isinstance(folder, str) for folder in adapters.values()) or (
        index["mode"] == "dset" and "all" not in adapters
    ):
        raise ValueError(
            f"{str(path)!r}: field 'adapters' must map each class index (cls) or 'all' (dset) to a folder name, got "
            f"{adapters!r}."
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
    return index
