"""Dataset presets: what the paper set for each of its ten datasets (domain word, curated class names, K, stage-3
epochs) and the column and split names of the Hugging Face Hub copy each preset follows."""

from __future__ import annotations

from dataclasses import dataclass

from .class_names import curated_class_names
from .prompts import DOMAIN_PRESETS


@dataclass(frozen=True)
class DatasetPreset:
    """One dataset's settings; a script flag given on the command line or in a config file still wins over them.

    Attributes:
        name: the preset (and `DOMAIN_PRESETS`) key, e.g. `fgvc_aircraft`.
        hub_dataset: the Hub copy whose layout the column and split names follow (None: no copy checked).
        image_column / label_column: its columns.
        train_split: the split the K shots are drawn from.
        test_split: its split of labelled held-out images (the official test set).
        k: real images per class (the paper: 16).
        classifier_epochs: stage-3 epochs where the authors gave them (None: unknown, the stage-3 default applies).
    """

    name: str
    hub_dataset: str | None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    k: int = 16
    classifier_epochs: int | None = None

    @property
    def domain(self) -> str:
        return DOMAIN_PRESETS[self.name]

    @property
    def class_names(self) -> list[str] | None:
        return curated_class_names(self.name)

    def flag_defaults(self) -> dict:
        """The script flags this preset sets (each script takes those it has): columns, splits, K, stage-3 epochs."""
        defaults = {
            "image_column": self.image_column,
            "label_column": self.label_column,
            "split": self.train_split,  # few-shot drawing and stage 1
            "real_split": self.train_split,  # stage 3
            "test_split": self.test_split,
            "k": self.k,
        }
        if self.classifier_epochs is not None:
            defaults["num_train_epochs"] = self.classifier_epochs
        return defaults


PRESETS: dict[str, DatasetPreset] = {
    preset.name: preset
    for preset in (
        # ImageNet's Hub test split has no labels: its official validation set is the test set.
        DatasetPreset("imagenet", "ILSVRC/imagenet-1k", test_split="validation"),
        DatasetPreset("caltech101", None),
        DatasetPreset("dtd", "tanganke/dtd"),
        DatasetPreset("eurosat", "tanganke/eurosat"),
        # 50 epochs: the authors' answer in ExplainableML/DataDream issue #2.
        DatasetPreset("fgvc_aircraft", "HuggingFaceM4/FGVC-Aircraft", label_column="variant", classifier_epochs=50),
        # Food-101's Hub copy names its official test set "validation".
        DatasetPreset("food101", "ethz/food101", test_split="validation"),
        DatasetPreset("flowers102", "dpdl-benchmark/oxford_flowers102"),
        DatasetPreset("pets", "timm/oxford-iiit-pet"),
        DatasetPreset("cars", "tanganke/stanford_cars"),
        DatasetPreset("sun397", "tanganke/sun397"),
    )
}


# Stage-3 recipes (`train_classifier.py --recipe`): the flag defaults each sets over the reference's (DataDream's, the
# stage-3 defaults). LoFT (ExplainableML/LoFT, arXiv 2505.11703; its classifier is DISEF's): trained on its synthetic
# images only, batch 256, 60 epochs with 6 warm-up epochs; the rest (AdamW lr 1e-4, wd 1e-4, cosine to 1e-8, fp16 on a
# GPU, MixUp/CutMix on 20% of the batches, CLIP q/v LoRA r16/alpha32/dropout .1) is DataDream's.
CLASSIFIER_RECIPES: dict[str, dict] = {
    "datadream": {},
    "loft": {
        "train_mode": "synthetic",
        "per_device_train_batch_size": 256,
        "num_train_epochs": 60,
        "warmup_epochs": 6,
    },
}


def recipe_flag_defaults(name: str | None) -> dict:
    """The stage-3 flag defaults of recipe `name` (None: DataDream's, i.e. none); an unknown name is an error."""
    if name is None:
        return {}
    if name not in CLASSIFIER_RECIPES:
        raise ValueError(f"`recipe` = {name!r} is invalid: use one of {list(CLASSIFIER_RECIPES)}.")
    return dict(CLASSIFIER_RECIPES[name])


def preset_flag_defaults(name: str | None) -> dict:
    """The flag defaults of preset `name`; none for a domain-only preset (e.g. `digits`), an unknown name (the
    stage's own check names it) or None."""
    preset = PRESETS.get(name) if name else None
    return preset.flag_defaults() if preset is not None else {}
