"""Where a model, dataset or adapter argument points, decided before anything loads: an existing local path or a Hub
repo id. A path that can only be local but does not exist is refused at once, naming it (tried as a Hub id it costs
about a minute of retries, then a connection error that never says the folder is missing), as is a Hub id in offline
mode with no cached copy; a folder another stage wrote is named as such."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .adapter_index import ADAPTER_INDEX_NAME
from .errors import InputError
from .files import OutputPathError
from .run_folder import CLASSIFIER_CONFIG_NAME, TRAINING_CONFIG_NAME
from .synthetic import GENERATION_CONFIG_NAME

STAGE1_FOLDER = "a stage-1 adapter folder (the --output_dir of train_datadream_lora.py)"
STAGE2_FOLDER = "a stage-2 generation folder (the --output_dir of generate_synthetic.py)"
STAGE3_FOLDER = "a stage-3 classifier folder (the --output_dir of train_classifier.py)"


class SourceNotFoundError(InputError):
    """A model, dataset or adapter argument that names nothing loadable: a missing path, a malformed or unreachable
    Hub id, or a folder of the wrong kind."""


def output_folder_kind(path) -> str | None:
    """Which stage wrote the folder `path` (`STAGE1_FOLDER`, ...), from the files each stage leaves; None for any
    other path or object."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return None
    path = Path(path)
    if (path / GENERATION_CONFIG_NAME).is_file():
        return STAGE2_FOLDER
    if (path / CLASSIFIER_CONFIG_NAME).is_file():
        return STAGE3_FOLDER
    if (path / ADAPTER_INDEX_NAME).is_file():
        return STAGE1_FOLDER
    try:
        record = json.loads((path / TRAINING_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return STAGE1_FOLDER if isinstance(record, dict) and record.get("stage") == "datadream_lora" else None


def looks_local(value: str) -> bool:
    """Whether `value` can only mean a local path: it starts with `./`, `../`, `/` or `~`, holds a backslash or more
    than one `/` (a Hub id is `name` or `owner/name`), ends with `/`, or its first part is a folder here (`models/
    tiny-sdd` beside a `models/` folder)."""
    if value in (".", "..") or value.startswith(("./", "../", "/", "~", ".\\")) or value.endswith(("/", os.sep)):
        return True
    if "\\" in value or value.count("/") > 1 or (os.sep != "/" and os.sep in value):
        return True
    return "/" in value and Path(value.split("/", 1)[0]).is_dir()


def _nearest_existing(path: Path) -> str:
    """Where the missing `path` stops existing, and what is there (the likely typo's neighbours)."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    entries = sorted(p.name for p in parent.iterdir() if not p.name.startswith(".")) if parent.is_dir() else []
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"{str(parent)!r} exists and holds: {shown or 'nothing'}"


def _is_cached(repo_id: str, repo_type: str) -> bool:
    """Whether the Hub cache (or, for a dataset, the `datasets` cache) holds a copy of `repo_id`."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folders = [Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)]
    if repo_type == "dataset":
        import datasets

        folders.append(Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___"))
    return any(folder.is_dir() for folder in folders)


def check_source(
    value: str | os.PathLike,
    argument: str,
    repo_type: str = "model",
    required: str | None = None,
    expected: str = "",
) -> str:
    """Returns "local" for an existing path, "hub" for a Hub repo id worth trying; raises `SourceNotFoundError`
    (naming `argument` and the path) for anything else, before any download or load.

    Args:
        argument: the flag or field, e.g. "--pretrained_model_name_or_path".
        repo_type: "model" or "dataset" (where the offline cache is looked up).
        required: a file a local folder must hold, e.g. "model_index.json"; `expected` says what such a folder is.
    """
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.exists():
        if required is not None and path.is_dir() and not (path / required).exists():
            kind = output_folder_kind(path)
            raise SourceNotFoundError(
                f"{argument} {text!r} holds no {required}, so it is not {expected or 'what this argument takes'}"
                + (f": it is {kind}." if kind else ".")
            )
        return "local"
    if looks_local(text):
        raise SourceNotFoundError(
            f"{argument} {text!r} does not exist ({_nearest_existing(path.absolute())}). Fix the path; it was not "
            "tried as a Hub repo id."
        )
    from huggingface_hub import is_offline_mode
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise SourceNotFoundError(
            f"{argument} {text!r} is neither an existing local path nor a Hub repo id ('owner/name')."
        ) from None
    if is_offline_mode() and not _is_cached(text, repo_type):
        raise SourceNotFoundError(
            f"{argument} {text!r} is no local path and no cached Hub repo, and the Hub is offline (HF_HUB_OFFLINE=1). "
            "Pass a local folder (e.g. a `save_pretrained` copy), or download it once with the Hub reachable."
        )
    return "hub"


def check_output_apart(output_dir: str | os.PathLike, kind: str, inputs: dict[str, object]) -> None:
    """Refuses an `--output_dir` that is another stage's folder (`kind` is the one this stage writes, e.g.
    `STAGE2_FOLDER`), or one of the run's input folders or inside one (`inputs`: flag -> value; only existing local
    folders count): the run would write its files among them, e.g. stage 1's adapter folders would become new class
    folders of the image folder it trains on, or stage 2's card would replace the adapters' card."""
    out = Path(output_dir).expanduser().resolve()
    found = output_folder_kind(out)
    if found is not None and found != kind:
        raise OutputPathError(
            f"--output_dir {str(output_dir)!r} is {found}; its files would be mixed with this run's. Pass a new "
            "folder."
        )
    for flag, value in inputs.items():
        if not isinstance(value, (str, os.PathLike)) or not Path(value).expanduser().is_dir():
            continue
        source = Path(value).expanduser().resolve()
        if out == source or out.is_relative_to(source):
            raise OutputPathError(
                f"--output_dir {str(output_dir)!r} is {'' if out == source else 'inside '}{flag} {str(value)!r}: the "
                "run would write its files among that input's. Pass a folder outside it."
            )
