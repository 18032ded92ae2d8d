"""Files that readers never see half written (a temp file beside the target, then a rename), strict JSON, and file
hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .errors import InputError


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = None):
    """Yields a file open on `.<name>.tmp` beside `path`; once the block ends, syncs it and renames it to `path`.

    If anything fails (the block, the sync, or the rename, e.g. `path` is a folder or the disk is full), the temp file
    is removed and `path` is untouched. Only a killed process leaves the temp file, for the next run to replace.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_files(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Yields a temp folder inside `folder`; the files written into it (only `names`, if given) are renamed into
    `folder` when the block ends, so each appears whole, and the temp folder is removed whatever happens (for writers
    that take a folder, e.g. `save_pretrained`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".staged-", suffix=".tmp") as tmp:
        yield Path(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if names is None or path.name in names:
                os.replace(path, folder / path.name)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def json_text(payload, indent: int | None = 2, where: str = "the payload") -> str:
    """`payload` as strict JSON: a NaN or infinite number is an error naming its key (`json.dumps` would write `NaN`,
    which is not JSON and which no strict reader parses)."""
    bad = non_finite_values(payload)
    if bad:
        key, value = bad[0]
        raise ValueError(
            f"Refusing to write {where}: {key} is {value}, which JSON cannot hold ({len(bad)} such value(s)); a NaN "
            "setting or loss upstream produced it."
        )
    return json.dumps(payload, indent=indent, ensure_ascii=False, allow_nan=False)


def non_finite_values(payload, key: str = "") -> list[tuple[str, float]]:
    """`(dotted key, value)` of every NaN / infinite float inside a JSON-like payload, e.g. `("log.3.loss", nan)`."""
    if isinstance(payload, float):
        return [] if math.isfinite(payload) else [(key or "the value", payload)]
    if isinstance(payload, dict):
        items = payload.items()
    elif isinstance(payload, (list, tuple)):
        items = enumerate(payload)
    else:
        return []
    return [found for k, value in items for found in non_finite_values(value, f"{key}.{k}" if key else str(k))]


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """`write_text_atomic` of `payload` as indented, strict JSON (`json_text`)."""
    write_text_atomic(path, json_text(payload, where=repr(str(path))))


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputPathError(InputError):
    """An output path that cannot be written: a file where a folder goes (or the reverse), or no write permission."""


def check_output_path(path: str | os.PathLike, flag: str, folder: bool = True) -> Path:
    """Checks, before any work, that the output `path` (a folder, or with `folder=False` a file) can be written:
    nothing of the other kind is in the way, at `path` or above it, and its nearest existing folder takes a new entry
    (probed by creating and removing a hidden temp folder: permissions, a read-only disk). Raises `OutputPathError`
    naming `flag` and the path; returns `path`. Nothing is left behind."""
    path = Path(path).expanduser()
    text = str(path)
    if path.exists() and path.is_dir() != folder:
        kind, wanted = ("a folder", "a file path") if path.is_dir() else ("a file", "a folder")
        raise OutputPathError(f"{flag} {text!r} is {kind}; pass {wanted}.")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(
            f"{flag} {text!r} cannot be made: {str(existing)!r} is a file, not a folder. Pass a path under a folder."
        )
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".datadream-write-check-").cleanup()
    except OSError as err:
        raise OutputPathError(
            f"{flag} {text!r} cannot be written: {str(existing)!r} refuses new entries ({err.strerror or err}). "
            "Pass a folder you can write to, or fix its permissions."
        ) from None
    return path


def check_safetensors(path: str | os.PathLike, what: str, fix: str) -> None:
    """Raises `InputError` ("`what` (path) cannot be read as safetensors (why): ... `fix`") unless safetensors can open
    `path` and read its header (a truncated, overwritten or non-safetensors file fails here; its tensors are not
    read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise InputError(
            f"{what} ({str(path)!r}) cannot be read as safetensors ({' '.join(str(err).split())}): the file is "
            f"damaged, or holds no safetensors weights. {fix}"
        ) from None
