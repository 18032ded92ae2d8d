"""What the scripts print: timestamped log lines, progress bars only on a terminal (a piped log gets no redraws), and
the libraries' known harmless warnings silenced, each matched by its exact message."""

from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings
from operator import attrgetter

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# (category, start of the message): raised by the libraries, not by anything a user can change.
HARMLESS_WARNINGS = (
    # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecated (once per model wrap).
    (FutureWarning, "`is_gradient_checkpointing` is deprecated and will be removed in v6"),
    # The Trainer's evaluation loaders on a CPU (pinning needs a GPU; nothing is lost).
    (UserWarning, "'pin_memory' argument is set as true but no accelerator is found"),
)
# Logger -> start of the message, for libraries that log their warnings instead of raising them.
HARMLESS_LOG_MESSAGES = {
    # torchvision cannot be installed beside the CPU torch; the PIL image processors are the ones the stages use.
    "transformers.utils.import_utils": r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to",
    # The Trainer sorting its checkpoints by step number instead of by time: the order it uses anyway.
    "transformers.trainer_utils": "mtime may not be reliable on this filesystem, falling back to numerical ordering",
}
# Library -> the function that turns its progress bars off.
PROGRESS_BAR_SWITCHES = {
    "datasets": "disable_progress_bars",
    "diffusers": "utils.logging.disable_progress_bar",
    "huggingface_hub": "utils.disable_progress_bars",
    "transformers": "utils.logging.disable_progress_bar",
}
_configured = False
_filtered = False


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_harmless_log_messages() -> None:
    """Drops the `HARMLESS_LOG_MESSAGES` at their loggers, once per process. Cheap (no library is imported), so the
    package does it when it is imported: diffusers and transformers log the torchvision fallback when a module first
    names an image processor class, which for the scripts happens while their imports run, before `main`."""
    global _filtered
    if _filtered:
        return
    _filtered = True
    for name, pattern in HARMLESS_LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessage(pattern))


def on_terminal() -> bool:
    """Whether progress bars have a terminal to redraw on (tqdm writes to stderr)."""
    return sys.stderr.isatty()


def setup_script_console(libraries: tuple[str, ...] = ("datasets", "huggingface_hub", "transformers")) -> None:
    """Sets up a script's console, once per process: INFO log lines, the harmless warnings silenced and, when stderr is
    not a terminal, the progress bars of `libraries` (keys of `PROGRESS_BAR_SWITCHES`) turned off; the package's own
    bars turn themselves off there."""
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    silence_harmless_log_messages()
    if not on_terminal():
        for library in libraries:
            attrgetter(PROGRESS_BAR_SWITCHES[library])(importlib.import_module(library))()
