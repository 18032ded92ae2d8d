"""Test hook: SIGKILL this process at a named point of a run, so kill-and-resume tests are deterministic, not timed.

Set `DATADREAM_TEST_KILL_AT=<point>:<n>` (e.g. `checkpoint-write:2`) and the process kills itself with SIGKILL the n-th
time it reaches `kill_point("<point>")` in that process. Unset (the normal case), `kill_point` does nothing. Points:

    generator-step     stage 1, inside a training step: gradients computed, optimizer not stepped
    checkpoint-write   stage 1, a checkpoint's tensors are in its temp folder, its state JSON not yet written
    adapter-write      stage 1, a finished adapter is in its temp folder, not yet renamed into place
    shard-write        stage 2, a shard's Parquet temp file is written but not yet synced and renamed
    shard-manifest     stage 2, a shard's Parquet file is in place but its manifest is not yet written
    trainer-step       stage 3, inside a Trainer training step (loss computed, no backward yet)
    trainer-save       stage 3, the LoRA adapter of a checkpoint is saved, the optimizer and state not yet

It is a test hook, not a feature: nothing in a normal run sets the variable.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

KILL_AT_ENV = "DATADREAM_TEST_KILL_AT"
KILL_POINTS = (
    "generator-step",
    "checkpoint-write",
    "adapter-write",
    "shard-write",
    "shard-manifest",
    "trainer-step",
    "trainer-save",
)

_hits: Counter = Counter()


def parse_kill_spec(spec: str) -> tuple[str, int]:
    """`"checkpoint-write:2"` -> `("checkpoint-write", 2)`; a bad spec is an error naming the variable."""
    point, _, count = spec.partition(":")
    if point not in KILL_POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{KILL_AT_ENV}={spec!r} is invalid: use '<point>:<n>' with n >= 1 and a point in {list(KILL_POINTS)}."
        )
    return point, int(count)


def kill_point(name: str) -> None:
    """SIGKILLs this process if `DATADREAM_TEST_KILL_AT` names this point and this is its n-th hit here."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, count = parse_kill_spec(spec)
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == count:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
