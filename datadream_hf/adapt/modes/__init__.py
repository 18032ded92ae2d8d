"""Stage-1 training modes, one module each (`--mode`): which K-shot images train which adapter, and the mode's
defaults. The engine (`adapt.sequential`, `adapt.grouped`) sees only the units a mode makes.

    base   `TrainingMode` and `UnitSpec`, DataDream's defaults
    dset   one adapter for all classes (DataDream_dset)
    cls    one adapter per class (DataDream_cls)
    image  one adapter per K-shot image (LoFT), LoFT's defaults
"""

from __future__ import annotations

from . import cls, dset, image
from .base import TrainingMode

MODES: dict[str, TrainingMode] = {mode.name: mode for mode in (dset.MODE, cls.MODE, image.MODE)}


def get_mode(name: str) -> TrainingMode:
    """The mode named `name`; an unknown name is an error listing the modes."""
    if name not in MODES:
        raise ValueError(
            f"`mode` = {name!r} is invalid: use one of {list(MODES)} ("
            + "; ".join(f"'{m.name}': {m.help}" for m in MODES.values())
            + ")."
        )
    return MODES[name]
