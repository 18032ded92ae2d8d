"""Files that readers never see half written (a temp file beside the target, then a rename), and their hashes."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from PIL import Image


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = None):
    """Yields a file open on `.<name>.tmp` beside `path`; once the block ends, syncs it and renames it to `path`.

    If the block raises (or the process dies), `path` is untouched and the temp file stays behind for the next run
    to replace or clean up.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """`write_text_atomic` of `payload` as indented JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False))


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
