"""image mode (LoFT, arXiv 2505.11703): one adapter per K-shot image, trained on that image alone, with LoFT's
placement and schedule as defaults (its `sd-finetune/main.py` and `run.sh`).

Stage 2 fuses these adapters in pairs per class; the index (`adapter_index.image_adapter_index`) gives each adapter's
class and dataset row.
"""

from __future__ import annotations

from ...adapter_index import image_adapter_folder, image_adapter_index
from ...lora import UNET_TARGET_MODULES
from .base import DATADREAM_DEFAULTS, TrainingMode, UnitSpec, derived_seed

# LoFT's defaults where they differ from DataDream's: rank 2 (alpha = rank, as both references), no text-encoder LoRA
# (LoFT's code adds one but leaves it out of the optimizer, so it stays a no-op), batch 1 (the one image), 600 epochs
# of one step, AdamW lr 1e-3 with 10 warm-up steps, CenterCrop at the resolution. Weight decay 1e-2, cosine, gradient
# clipping 1.0 and the gaussian init are DataDream's too. The prompt is DataDream's class prompt.
LOFT_DEFAULTS = {
    **DATADREAM_DEFAULTS,
    "rank": 2,
    "train_text_encoder": False,
    "train_batch_size": 1,
    "num_train_epochs": 600,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 10,
    "center_crop": True,
}
# LoFT's UNet targets: DataDream's + the added key/value projections of models that have them (not SD 2.1).
LOFT_UNET_TARGET_MODULES = (*UNET_TARGET_MODULES, "add_k_proj", "add_v_proj")
# Domain tag of the image seeds, so that (seed, class, row) never collides with cls mode's (seed, class).
_IMAGE = 3


def image_seed(seed: int, class_index: int, row: int) -> int:
    """The seed of the adapter of dataset row `row` (of class `class_index`): the same whichever process trains it,
    in whatever group, and whatever the other images of the manifest are."""
    return derived_seed(seed, _IMAGE, class_index, row)


def units(seed: int, class_names: list[str], labels: list[int], indices: list[list[int]]) -> list[UnitSpec]:
    """One unit per K-shot image, class by class in the manifest's draw order: the image index's adapter order."""
    specs, position = [], 0
    for c, rows in enumerate(indices):
        for row in rows:
            if labels[position] != c:
                raise ValueError(f"K-shot image {position} has label {labels[position]}, the manifest says class {c}.")
            folder = image_adapter_folder(c, class_names[c], int(row))
            specs.append(UnitSpec(folder, folder, image_seed(seed, c, int(row)), [position]))
            position += 1
    return specs


def card_rows(class_names, indices, prompts):
    return [(f"{class_names[c]} (row {row})", image_adapter_folder(c, class_names[c], int(row)), prompts[c])
            for c, rows in enumerate(indices) for row in rows]  # fmt: skip


MODE = TrainingMode(
    name="image",
    defaults=LOFT_DEFAULTS,
    unet_target_modules=LOFT_UNET_TARGET_MODULES,
    splits_adapters=True,
    units=units,
    index=image_adapter_index,
    card_rows=card_rows,
    help="one adapter per K-shot image (LoFT), with LoFT's settings as defaults",
)
