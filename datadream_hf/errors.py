"""Input errors and how the scripts report them: one line naming the culprit and the fix, the traceback only with
`--debug` (or `DATADREAM_DEBUG=1`); an unexpected exception keeps its traceback."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DATADREAM_DEBUG"
DEBUG_HELP = f"{DEBUG_FLAG} (or {DEBUG_ENV}=1): show the full traceback of an input error."
PACKAGE_ROOT = Path(__file__).resolve().parent


class InputError(ValueError):
    """Bad input (a path, a file, a setting); the message names the culprit and what to do. Base of the library's
    own input errors (`DatasetInputError`, `GenerationInputError`, ...)."""


def is_input_error(error: BaseException, script: str | os.PathLike | None = None) -> bool:
    """Whether `error` is bad input rather than a bug: an `InputError`, or a `ValueError` / missing-file error raised
    by this package's own code or by `script` (where it checks its arguments)."""
    if isinstance(error, InputError):
        return True
    if not isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    raised_in = Path(frames[-1].filename).resolve()
    return raised_in.is_relative_to(PACKAGE_ROOT) or (script is not None and raised_in == Path(script).resolve())


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(`--debug` given or `DATADREAM_DEBUG` set, `argv` without `--debug`)."""
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    return len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0"), rest


def run_script(main: Callable, parse_args: Callable, argv: list[str] | None = None, script: str | None = None):
    """Runs `main(parse_args(argv))` as a command: an input error (`is_input_error`) while parsing or running ends the
    process with one line on stderr and exit status 1, unless `--debug` is in `argv` or `DATADREAM_DEBUG=1`.

    Args:
        argv: the arguments (default: `sys.argv[1:]`); `--debug` is taken out before `parse_args` sees them.
        script: the script's file (its own argument checks count as input errors); default: `sys.argv[0]`.
    """
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    script = script or sys.argv[0]
    try:
        args = parse_args(argv)
    except ValueError as error:  # a setting's own check (ours or `TrainingArguments`'): the input, whoever raised it
        if debug:
            raise
        _exit_with_one_line(error, script)
    try:
        return main(args)
    except Exception as error:
        if debug or not is_input_error(error, script):
            raise
        _exit_with_one_line(error, script)


def _exit_with_one_line(error: Exception, script: str) -> None:
    print(f"{Path(script).name}: error: {one_line(error)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
    raise SystemExit(1) from None
