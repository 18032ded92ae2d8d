"""Stage-3 checkpoints as the Trainer writes them: which are complete (a kill can leave one half written), and refusing
a new run in a folder that holds another run's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..run_folder import checkpoint_folders, checkpoint_step, refuse_new_run
from .backbones.base import WEIGHTS_NAMES

TRAINER_STATE_NAME = "trainer_state.json"


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a Trainer checkpoint was fully written.

    The Trainer writes `trainer_state.json` last (after the adapter or model, optimizer, scheduler and RNG states),
    without a rename: a checkpoint counts as complete only when that file parses and names the checkpoint's own step.
    """
    path = Path(path)
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    step = checkpoint_step(path)
    return (step is None or state.get("global_step") == step) and any((path / n).is_file() for n in WEIGHTS_NAMES)


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-<step>` in `output_dir` (see `is_complete_checkpoint`), or None."""
    complete = [p for p in checkpoint_folders(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the checkpoints a killed run left half written; returns them."""
    removed = [p for p in checkpoint_folders(output_dir) if not is_complete_checkpoint(p)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def check_fresh_output_dir(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> None:
    """Refuses to start a new run (no `resume_from_checkpoint`) in a folder that holds another run's checkpoints or
    adapter: the Trainer would train beside them, and `--resume_from_checkpoint latest` would later mix the runs."""
    output_dir = Path(output_dir)
    if resume_from_checkpoint is not None or not output_dir.is_dir():
        return
    found = checkpoint_folders(output_dir) + [output_dir / n for n in WEIGHTS_NAMES if (output_dir / n).is_file()]
    refuse_new_run(output_dir, found, "a classifier run")
