"""An exclusive lock on an output folder, so two runs never write into the same place at once."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".datadream.lock"


class OutputDirLockedError(RuntimeError):
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
