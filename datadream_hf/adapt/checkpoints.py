"""Stage-1 checkpoints: `checkpoint-<step>/` folders holding only LoRA weights, optimizer and lr-scheduler state.

Tensors are stored as safetensors and everything else as JSON (no pickle, so loading a checkpoint cannot run code).
A checkpoint is written into a hidden temp folder and renamed into place, so a `checkpoint-<step>` folder is always
complete. No RNG state needs saving: every draw of step `s` comes from a generator seeded by `(unit seed, s)` (see
`adapt.data`), so restoring the step restores the randomness.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..faults import fault_point
from ..files import json_text
from ..lora import load_safetensors
from ..run_folder import checkpoint_folders, checkpoint_path
from ..validation import check_finite_weights

if TYPE_CHECKING:
    from .config import GeneratorTrainingConfig
    from .data import TrainingUnit

WEIGHTS_NAME = "lora_weights.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "training_state.json"


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def checkpoint_meta(unit: TrainingUnit, config: GeneratorTrainingConfig, num_steps: int) -> dict:
    """What an adapter's checkpoints belong to; `load_checkpoint` refuses a checkpoint whose meta differs."""
    return {
        "unit": unit.name, "seed": unit.seed, "num_images": len(unit), "num_steps": num_steps,
        "train_batch_size": config.train_batch_size, "rank": config.rank, "lora_alpha": config.lora_alpha,
    }  # fmt: skip


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete `checkpoint-<step>` folders under `folder` (their state JSON, written last, exists), oldest first."""
    return [p for p in checkpoint_folders(folder) if (p / STATE_NAME).is_file()]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(folder: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Deletes the oldest checkpoints beyond `total_limit` (after the newest one is safely written). Returns them."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(folder)
    removed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def remove_partial_checkpoints(folder: str | os.PathLike) -> None:
    """Removes temp folders left by a process killed while writing a checkpoint or an adapter."""
    folder = Path(folder)
    if folder.is_dir():
        for pattern in (".checkpoint-*.tmp", ".adapter-*.tmp"):
            for path in folder.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    parameters: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    grad_scaler: torch.amp.GradScaler,
    meta: dict,
    log_history: list[dict] | None = None,
    trained_with: list[str] | None = None,
) -> Path:
    """Writes `folder/checkpoint-<step>` atomically and returns its path.

    Args:
        parameters: the trainable (LoRA) parameters by name; nothing else of the model is saved.
        meta: what the checkpoint belongs to (unit, seed, total steps, ...); checked again on resume.
        log_history: the adapter's logged steps so far (`read_log_history` gives them back on resume).
        trained_with: the class folders of the group that made this step (grouped cls training); None: the adapter
            alone. Not part of `meta`: any strategy resumes from any checkpoint (`checkpoint_trained_with`).
    """
    folder = Path(folder)
    weights = {name: p.detach().cpu().contiguous() for name, p in parameters.items()}
    check_finite_weights(weights, f"checkpoint-{step} of {str(folder)!r}")
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = folder / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / WEIGHTS_NAME))
        optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_NAME))
        fault_point("checkpoint-write")  # test hook: the checkpoint is half written, in its temp folder only
        state = {
            "step": step,
            "meta": meta,
            "optimizer": optimizer_rest,
            "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": grad_scaler.state_dict() if grad_scaler.is_enabled() else None,
            "log_history": list(log_history or []),
            "trained_with": trained_with,
        }
        with open(tmp / STATE_NAME, "w") as f:
            f.write(json_text(state, indent=1, where=repr(str(tmp / STATE_NAME))))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step written by an earlier, interrupted attempt: identical content
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # e.g. a full disk: no half-written folder stays behind (a killed process leaves `tmp`)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(
    path: str | os.PathLike,
    parameters: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    grad_scaler: torch.amp.GradScaler,
    meta: dict,
) -> int:
    """Restores a checkpoint into the given objects and returns its step; refuses one made for other training."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a complete checkpoint (no {STATE_NAME}); pass a `checkpoint-<step>` folder "
            "written by train_datadream_lora.py, or `latest`."
        )
    with open(path / STATE_NAME) as f:
        state = json.load(f)
    differing = {k: (state["meta"].get(k), v) for k, v in meta.items() if state["meta"].get(k) != v}
    if differing:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} was made for other training: (checkpoint, now) = {differing}. Resume with the "
            "same settings, or start a new run in an empty --output_dir."
        )
    weights = load_safetensors(path / WEIGHTS_NAME)
    if set(weights) != set(parameters):
        missing, extra = sorted(set(parameters) - set(weights)), sorted(set(weights) - set(parameters))
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not match the model's LoRA parameters (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); it was made with another base model or LoRA configuration."
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(weights[name])
    optimizer.load_state_dict(_join_optimizer_state(load_safetensors(path / OPTIMIZER_NAME), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state["grad_scaler"] is not None and grad_scaler.is_enabled():
        grad_scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])


def read_log_history(path: str | os.PathLike) -> list[dict]:
    """The log entries (`{"step", "loss", "lr"}`) saved with a checkpoint; [] for checkpoints written without."""
    with open(Path(path) / STATE_NAME) as f:
        return list(json.load(f).get("log_history", []))


def checkpoint_trained_with(path: str | os.PathLike) -> tuple[str, ...]:
    """The class folders of the group that made this checkpoint's last step, or its adapter's folder alone."""
    path = Path(path)
    with open(path / STATE_NAME) as f:
        trained_with = json.load(f).get("trained_with")
    return tuple(trained_with) if trained_with else (path.parent.name,)
