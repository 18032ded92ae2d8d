"""The process-group timeout of the multi-process scripts (`--ddp_timeout`, as stage 3's `TrainingArguments` names
it) and the Accelerate objects that carry it to `torch.distributed.init_process_group`.

A process waiting at a barrier or broadcast for longer than this timeout aborts, and the launcher then kills the
others. NCCL's own default is 10 minutes (gloo's 30). The scripts keep main-only work (Hub uploads, `save_to_disk`
copies) after the last collective, so no process waits on it; what remains is one process finishing its share later
than another (stage 1: a class or group more; stage 2: a shard more), and model loading or downloading skew at the
start. The default, transformers' own for stage 3, gives those 30 minutes.
"""

from __future__ import annotations

from dataclasses import field
from datetime import timedelta

import torch

from .validation import COUNT

DEFAULT_DDP_TIMEOUT = 1800  # seconds: transformers' `TrainingArguments.ddp_timeout` default
DDP_TIMEOUT_RANGE = COUNT.with_hint("seconds; default 1800")
DDP_TIMEOUT_HELP = (
    "Seconds a process waits at a barrier or broadcast for the others before the run aborts (multi-process runs; "
    "NCCL's own default is 600). Raise it when one process may finish its share much later than another."
)


def ddp_timeout_field():
    """The `ddp_timeout` field of a stage's run-time arguments (stage 3 inherits `TrainingArguments`')."""
    return field(default=DEFAULT_DDP_TIMEOUT, metadata={"help": DDP_TIMEOUT_HELP})


def process_group_kwargs(ddp_timeout: int):
    """`InitProcessGroupKwargs` for `Accelerator(kwargs_handlers=[...])` with the timeout explicit."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout))


def process_state(ddp_timeout: int):
    """The `PartialState` of a script without an `Accelerator` (stage 2), with the timeout explicit; CPU-only machines
    need `cpu=True` to start several processes."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=ddp_timeout))
