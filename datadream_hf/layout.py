"""On-disk layout of stage outputs: safe per-class folder names, the adapter index, atomic JSON writes."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

ADAPTER_INDEX_NAME = "adapter_index.json"
TRAINING_CONFIG_NAME = "datadream_config.json"
MAX_SLUG_LENGTH = 48


def class_folder_name(index: int, class_name: str) -> str:
    """A folder name for a class that cannot escape its parent: `0007_snow_leopard` (index keeps names unique)."""
    ascii_name = unicodedata.normalize("NFKD", class_name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_name).strip("_-")[:MAX_SLUG_LENGTH]
    return f"{index:04d}_{slug}" if slug else f"{index:04d}"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes text to a temp file in the same folder and renames it, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """`write_text_atomic` of `payload` as indented JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False))


def adapter_index(mode: str, class_names: list[str]) -> dict:
    """The index of a stage-1 output: which folder holds which class's adapter (`cls`) or the single one (`dset`)."""
    if mode == "dset":
        return {"mode": "dset", "class_names": list(class_names), "adapters": {"all": "."}}
    return {
        "mode": "cls",
        "class_names": list(class_names),
        "adapters": {str(i): class_folder_name(i, name) for i, name in enumerate(class_names)},
    }


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
    if index.get("mode") not in ("dset", "cls"):
        raise ValueError(f"{str(path)!r}: field 'mode' must be 'dset' or 'cls', got {index.get('mode')!r}.")
    names, adapters = index.get("class_names"), index.get("adapters")
    if not isinstance(names, list) or not isinstance(adapters, dict):
        raise ValueError(f"{str(path)!r}: fields 'class_names' (list) and 'adapters' (dict) are required.")
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
    return index
