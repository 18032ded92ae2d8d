"""dset mode (DataDream_dset): one adapter trained on every K-shot image, each with its class's prompt."""

from __future__ import annotations

from ...adapter_index import adapter_index
from ...lora import UNET_TARGET_MODULES
from .base import DATADREAM_DEFAULTS, TrainingMode, UnitSpec


def units(seed: int, class_names: list[str], labels: list[int], indices: list[list[int]]) -> list[UnitSpec]:
    return [UnitSpec("all", ".", seed, list(range(len(labels))))]


def card_rows(class_names, indices, prompts):
    return [("all", ".", None)]


MODE = TrainingMode(
    name="dset",
    defaults=DATADREAM_DEFAULTS,
    unet_target_modules=tuple(UNET_TARGET_MODULES),  # paper Sec. 3.2
    splits_adapters=False,
    units=units,
    index=lambda class_names, indices: adapter_index("dset", class_names),
    card_rows=card_rows,
    help="one adapter for all classes (DataDream_dset)",
)
