"""The stage-3 backbones, one module per kind behind `base.ClassifierBackbone` (as peft keeps its tuners):

    base              the interface the Trainer and `train_classifier` call; the LoRA adapter I/O the kinds share
    dual_encoder      CLIP, SigLIP, SigLIP 2 (fixed resolution), other `AutoModel`s with text and image features:
                      the head is the class-prompt text embeddings
    image_classifier  `AutoModelForImageClassification` models (ViT, ConvNeXt, ...): a head over the classes

The kind is read from the model's config (`backbone_kind`); a saved classifier names its kind in
`classifier_config.json`. A new kind is one module and one line in `BACKBONES`.
"""

from __future__ import annotations

import os

from peft import LoraConfig
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, MODEL_MAPPING_NAMES

from ...lora import classifier_lora_config
from ...prompts import PromptTemplate
from .base import ClassifierBackbone, read_classifier_config
from .dual_encoder import DualEncoderClassifier, is_dual_encoder
from .image_classifier import ImageClassifier

BACKBONES: dict[str, type[ClassifierBackbone]] = {
    DualEncoderClassifier.kind: DualEncoderClassifier,
    ImageClassifier.kind: ImageClassifier,
}
CLASSIFIER_TYPES = ("auto", *BACKBONES)


def _is_dual_encoder_config(config: PretrainedConfig) -> bool:
    """Text and vision towers in the config, and an `AutoModel` class that gives text and image features (read from
    the mapping: no weights load)."""
    if getattr(config, "text_config", None) is None or getattr(config, "vision_config", None) is None:
        return False
    if config.model_type not in MODEL_MAPPING_NAMES:
        return False
    return is_dual_encoder(AutoModel._model_mapping[type(config)])


def backbone_kind(config: PretrainedConfig, name: str) -> str:
    """`dual_encoder` for a checkpoint with text and image towers (unless it was saved as an image classifier),
    `image_classifier` for one `AutoModelForImageClassification` builds; anything else is refused, naming `name`."""
    architectures = config.architectures or []
    if any(a.endswith("ForImageClassification") for a in architectures):
        return ImageClassifier.kind
    if _is_dual_encoder_config(config):
        return DualEncoderClassifier.kind
    if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return ImageClassifier.kind
    raise ValueError(
        f"--model_name_or_path {name!r} ({config.model_type}) has neither a text tower nor an image-classification "
        "head: stage 3 takes a dual encoder (CLIP, SigLIP, ...) or an AutoModelForImageClassification model (ViT, "
        "ConvNeXt, ...)."
    )


def load_classifier(
    model_name_or_path: str,
    class_names: list[str],
    prompt_template: PromptTemplate | None = None,
    lora_config: LoraConfig | None = None,
    revision: str | None = None,
    classifier_type: str = "auto",
    full_fine_tuning: bool = False,
) -> ClassifierBackbone:
    """A fresh classifier on the base model: its kind read from the config (`classifier_type="auto"`) or forced
    (`"image_classifier"` fine-tunes a dual encoder's image tower under a head initialised from its text tower).

    `lora_config` defaults to the reference's (r=16, alpha=32, dropout 0.1); its `target_modules=None` takes the
    kind's default (dual encoders: q_proj, v_proj of both towers; image classifiers: the attention query/value
    projections). `full_fine_tuning` trains every weight instead (image classifiers only).
    """
    if classifier_type not in CLASSIFIER_TYPES:
        raise ValueError(f"`classifier_type` must be one of {CLASSIFIER_TYPES}, got {classifier_type!r}.")
    config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
    kind = backbone_kind(config, model_name_or_path) if classifier_type == "auto" else classifier_type
    if kind == DualEncoderClassifier.kind:
        if full_fine_tuning:
            raise ValueError(
                f"--use_peft false: {model_name_or_path!r} is a dual encoder, fine-tuned with LoRA on both towers "
                "(its head comes from the text tower). Full fine-tuning is for image classifiers "
                "(--classifier_type image_classifier)."
            )
    if full_fine_tuning:
        lora_config = None
    elif lora_config is None:
        lora_config = classifier_lora_config()
        lora_config.target_modules = None  # the kind's own attention Q and V
    return BACKBONES[kind].from_base_pretrained(
        model_name_or_path, class_names, prompt_template, lora_config=lora_config, revision=revision
    )


def load_trained_classifier(
    directory: str | os.PathLike, base_model_name_or_path: str | None = None, revision: str | None = None
) -> ClassifierBackbone:
    """A saved classifier (a `train_classifier` output or checkpoint), rebuilt by the kind it names."""
    kind = read_classifier_config(directory).get("backbone", DualEncoderClassifier.kind)  # older outputs: CLIP
    return BACKBONES[kind].from_pretrained(directory, base_model_name_or_path, revision=revision)
