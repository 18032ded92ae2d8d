"""The paper's stage-3 classifier by its name: `CLIPLoRAClassifier`, the dual-encoder backbone on a CLIP model.

Every backbone kind lives in `backbones/` (CLIP, SigLIP, other dual encoders; image-classification models);
`train_classifier` picks the kind from the model's config (`backbones.load_classifier`).
"""

from __future__ import annotations

from peft import LoraConfig
from transformers import PreTrainedModel

from ..prompts import PromptTemplate
from ..run_folder import CLASSIFIER_CONFIG_NAME
from .backbones.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ClassifierOutput
from .backbones.dual_encoder import DualEncoderClassifier

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CLASSIFIER_CONFIG_NAME",
    "DEFAULT_CLASSIFIER_BASE",
    "CLIPLoRAClassifier",
    "ClassifierOutput",
]

DEFAULT_CLASSIFIER_BASE = "openai/clip-vit-base-patch16"


class CLIPLoRAClassifier(DualEncoderClassifier):
    """CLIP + LoRA image classifier over a fixed list of classes (reference: DataDream `classify/models/clip.py`): a
    `DualEncoderClassifier` on a `CLIPModel`, LoRA r=16, alpha=32, dropout 0.1 on q_proj/v_proj of both towers."""

    @classmethod
    def from_clip_pretrained(
        cls,
        model_name_or_path: str = DEFAULT_CLASSIFIER_BASE,
        class_names: list[str] | None = None,
        prompt_template: PromptTemplate | None = None,
        lora_config: LoraConfig | None = None,
        revision: str | None = None,
    ) -> CLIPLoRAClassifier:
        """Loads the base CLIP (safetensors only, no remote code) and adds a fresh LoRA."""
        return cls.from_base_pretrained(model_name_or_path, class_names or [], prompt_template, lora_config, revision)

    @property
    def clip_model(self) -> PreTrainedModel:
        """The LoRA-injected `CLIPModel` inside the peft wrapper."""
        return self.dual_encoder
