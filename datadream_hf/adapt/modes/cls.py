"""cls mode (DataDream_cls): one adapter per class, trained on that class's K images."""

from __future__ import annotations

from ...adapter_index import adapter_index
from ...lora import UNET_TARGET_MODULES
from ...run_folder import class_folder_name
from .base import DATADREAM_DEFAULTS, TrainingMode, UnitSpec, derived_seed


def class_seed(seed: int, class_index: int) -> int:
    """The seed of class `class_index`'s adapter in cls mode.

    Class i's adapter equals a dset-mode run on class i's images alone with `--seed class_seed(seed, i)`, whichever
    process trained it and in whatever order.
    """
    return derived_seed(seed, class_index)


def units(seed: int, class_names: list[str], labels: list[int], indices: list[list[int]]) -> list[UnitSpec]:
    specs = []
    for c, name in enumerate(class_names):
        positions = [p for p, label in enumerate(labels) if label == c]
        specs.append(UnitSpec(name, class_folder_name(c, name), class_seed(seed, c), positions))
    return specs


def card_rows(class_names, indices, prompts):
    return [(name, class_folder_name(c, name), prompts[c]) for c, name in enumerate(class_names)]


MODE = TrainingMode(
    name="cls",
    defaults=DATADREAM_DEFAULTS,
    unet_target_modules=tuple(UNET_TARGET_MODULES),  # paper Sec. 3.2
    splits_adapters=True,
    units=units,
    index=lambda class_names, indices: adapter_index("cls", class_names),
    card_rows=card_rows,
    help="one adapter per class (DataDream_cls)",
)
