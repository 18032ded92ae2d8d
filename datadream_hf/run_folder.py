"""Run folders, as all three stages use them: class folder names, the run record's name, refusing a folder that holds
another run, checkpoint naming and discovery, and the lock that keeps two runs out of one folder."""

from __future__ import annotations

import fcntl
import os
import re
import unicodedata
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

TRAINING_CONFIG_NAME = "datadream_config.json"  # what made a stage-1 or stage-3 output (stage 2: its own record)
CLASSIFIER_CONFIG_NAME = "classifier_config.json"  # beside every stage-3 adapter (its classes and prompts)
MAX_SLUG_LENGTH = 48
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOCK_NAME = ".datadream.lock"


def class_folder_name(index: int, class_name: str) -> str:
    """A folder name for a class that cannot escape its parent: `0007_snow_leopard` (index keeps names unique)."""
    ascii_name = unicodedata.normalize("NFKD", class_name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_name).strip("_-")[:MAX_SLUG_LENGTH]
    return f"{index:04d}_{slug}" if slug else f"{index:04d}"


# --- another run in the folder ----------------------------------------------------------------------------------


def refuse_new_run(output_dir: Path, found: list[Path], run_kind: str) -> None:
    """Refuses to start a new run (one not resumed) in a folder that holds another run's files, `found`: the new run
    would write beside them, and resuming later would mix the two. `run_kind` names it, e.g. "a stage-1 run"."""
    if found:
        raise ValueError(
            f"--output_dir {str(output_dir)!r} already holds {run_kind} ({found[0].name}, ...). Pass "
            "--resume_from_checkpoint latest to continue it, or choose an empty --output_dir."
        )


def settings_diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """`{"a.b": (old value, new value)}` for every setting of two nested run records that differs, in key order: what
    a run resumed into a folder (or re-run there) would change about the run the folder holds."""
    differing = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differing.update(settings_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            differing[f"{prefix}{key}"] = (a, b)
    return differing


# --- checkpoints ------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other name."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"checkpoint-{step}"


def checkpoint_folders(folder: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders under `folder`, oldest first (complete or not: each stage judges that)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)


# --- the lock ---------------------------------------------------------------------------------------------------


class OutputDirLockedError(InputError, RuntimeError):
    """Another live process holds the output folder."""


class OutputDirLock:
    """Holds `<output_dir>/.datadream.lock` with `flock` for the life of a run.

    The kernel drops the lock when its process dies, even on SIGKILL, so a killed run never blocks its resume.
    Take it on the main process only: the other ranks of the same run write into the folder too.

    Example:
        with OutputDirLock(args.output_dir):
            train(...)
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputDirLockedError(
                f"Output folder {str(self.path.parent)!r} is in use by another run (pid {holder}). Wait for it to "
                "finish, or pass another --output_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike, state=None):
    """Holds `OutputDirLock(output_dir)` on the main process of a (possibly distributed) run, for the `with` block.

    Args:
        state: an `accelerate.PartialState` or `Accelerator` (anything with `is_main_process` and
            `num_processes`); None for a single process. If another run holds the folder, every process of this run
            raises `OutputDirLockedError` (the main process tells the others), so none is left waiting at a barrier.
    """
    lock, error = OutputDirLock(output_dir), None
    if state is None or state.is_main_process:
        try:
            lock.acquire()
        except OutputDirLockedError as err:
            error = str(err)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        lock.release()
        raise OutputDirLockedError(error)
    try:
        yield lock
    finally:
        lock.release()
