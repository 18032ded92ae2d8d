"""Test hook: make this process fail at a named point of a run, so fault tests are deterministic, not timed.

Each variable takes `<point>:<n>` (e.g. `checkpoint-write:2`) and acts the n-th time this process reaches
`fault_point("<point>")`:

    DATADREAM_TEST_KILL_AT   SIGKILL: the process dies at once (a crash, an OOM kill, a pulled plug)
    DATADREAM_TEST_STOP_AT   SIGSTOP: the process freezes there until it gets SIGCONT (two runs at once)
    DATADREAM_TEST_FAIL_AT   raises OSError(ENOSPC) there, as a write to a full disk does

Unset (the normal case), `fault_point` does nothing. Points:

    generator-step     stage 1, inside a training step: gradients computed, optimizer not stepped
    checkpoint-write   stage 1, a checkpoint's tensors are in its temp folder, its state JSON not yet written
    adapter-write      stage 1, a finished adapter is in its temp folder, not yet renamed into place
    shard-write        stage 2, a shard's Parquet temp file is written but not yet synced and renamed
    shard-manifest     stage 2, a shard's Parquet file is in place but its manifest is not yet written
    trainer-step       stage 3, inside a Trainer training step (loss computed, no backward yet)
    trainer-save       stage 3, the LoRA adapter of a checkpoint is saved, the optimizer and state not yet

It is a test hook, not a feature: nothing in a normal run sets the variables.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections import Counter

KILL_AT_ENV = "DATADREAM_TEST_KILL_AT"
STOP_AT_ENV = "DATADREAM_TEST_STOP_AT"
FAIL_AT_ENV = "DATADREAM_TEST_FAIL_AT"
FAULT_ENVS = (KILL_AT_ENV, STOP_AT_ENV, FAIL_AT_ENV)
KILL_POINTS = (
    "generator-step",
    "checkpoint-write",
    "adapter-write",
    "shard-write",
    "shard-manifest",
    "trainer-step",
    "trainer-save",
)

_hits: Counter = Counter()  # (variable, point) -> times reached in this process


def parse_kill_spec(spec: str, variable: str = KILL_AT_ENV) -> tuple[str, int]:
    """`"checkpoint-write:2"` -> `("checkpoint-write", 2)`; a bad spec is an error naming the variable."""
    point, _, count = spec.partition(":")
    if point not in KILL_POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{variable}={spec!r} is invalid: use '<point>:<n>' with n >= 1 and a point in {list(KILL_POINTS)}."
        )
    return point, int(count)


def fault_point(name: str) -> None:
    """Kills, stops or fails this process if a `DATADREAM_TEST_*_AT` variable names this point and this is its n-th
    hit here; does nothing otherwise."""
    for variable in FAULT_ENVS:
        spec = os.environ.get(variable)
        if not spec:
            continue
        point, count = parse_kill_spec(spec, variable)
        if point != name:
            continue
        _hits[variable, name] += 1
        if _hits[variable, name] != count:
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if variable == FAIL_AT_ENV:
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAIL_AT_ENV} at {name!r})")
        os.kill(os.getpid(), signal.SIGKILL if variable == KILL_AT_ENV else signal.SIGSTOP)
