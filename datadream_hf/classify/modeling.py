"""The stage-3 classifier: a CLIP model with a peft LoRA on both towers whose head is the class-prompt text embeddings.

Faithful to the reference classifier (DataDream `classify/models/clip.py`): the head is recomputed through the
LoRA'd text tower at every training forward (so the text LoRA learns), cached in eval mode, and
logits = logit_scale.exp() * cosine(image, class prompt) with `logit_scale` frozen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoTokenizer, CLIPModel
from transformers.utils import ModelOutput

from ..files import staged_files, write_json_atomic
from ..lora import classifier_lora_config, load_safetensors
from ..prompts import PromptTemplate
from ..run_folder import CLASSIFIER_CONFIG_NAME
from ..validation import check_finite_weights
from ..versions import library_versions

DEFAULT_CLASSIFIER_BASE = "openai/clip-vit-base-patch16"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


@dataclass
class ClassifierOutput(ModelOutput):
    """`logits` (B, num_classes); `loss` is the plain cross-entropy when labels were given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class CLIPLoRAClassifier(nn.Module):
    """CLIP + LoRA image classifier over a fixed list of classes.

    Args:
        clip_model: a `transformers.CLIPModel` (its weights stay frozen; only the LoRA parameters train).
        tokenizer: the model's tokenizer, used once to tokenize the class prompts.
        class_names: class names in label order.
        prompt_template: how a class name becomes a prompt (use stage 1's template).
        lora_config: defaults to `datadream_hf.lora.classifier_lora_config()` (r=16, alpha=32, dropout 0.1 on
            q_proj/v_proj of both towers).
    """

    main_input_name = "pixel_values"

    def __init__(
        self,
        clip_model: CLIPModel,
        tokenizer,
        class_names: list[str],
        prompt_template: PromptTemplate | None = None,
        lora_config: LoraConfig | None = None,
    ):
        super().__init__()
        if not class_names:
            raise ValueError("`class_names` is empty; the classifier needs at least one class.")
        self.class_names = list(class_names)
        self.prompt_template = prompt_template or PromptTemplate()
        self.base_model_name_or_path = clip_model.config._name_or_path
        # get_peft_model freezes every base weight, logit_scale included (the reference keeps it at ~100).
        self.clip = get_peft_model(clip_model, lora_config or classifier_lora_config())
        prompts = [self.prompt_template(name) for name in self.class_names]
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        self.register_buffer("prompt_input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("prompt_attention_mask", tokens["attention_mask"], persistent=False)
        self._cached_head: torch.Tensor | None = None

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
        clip_model = CLIPModel.from_pretrained(model_name_or_path, revision=revision, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, revision=revision)
        return cls(clip_model, tokenizer, class_names or [], prompt_template, lora_config)

    @property
    def clip_model(self) -> CLIPModel:
        """The LoRA-injected `CLIPModel` inside the peft wrapper."""
        return self.clip.get_base_model()

    def class_head(self) -> torch.Tensor:
        """L2-normalized text embeddings of the class prompts, (num_classes, projection_dim)."""
        features = self.clip_model.get_text_features(
            input_ids=self.prompt_input_ids, attention_mask=self.prompt_attention_mask
        ).pooler_output
        return F.normalize(features, dim=-1)

    def _head(self) -> torch.Tensor:
        if self.training:
            return self.class_head()
        # Eval: the head is a constant; compute it once. `train()` and weight loading drop the cache.
        if self._cached_head is None or self._cached_head.device != self.prompt_input_ids.device:
            with torch.no_grad():
                self._cached_head = self.class_head()
        return self._cached_head

    def train(self, mode: bool = True):
        self._cached_head = None
        return super().train(mode)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        image = self.clip_model.get_image_features(pixel_values=pixel_values).pooler_output  # (B, D)
        image = F.normalize(image, dim=-1)
        head = self._head().to(image.dtype)  # (C, D)
        logits = self.clip_model.logit_scale.exp() * image @ head.t()  # (B, C)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)

    # ---- adapter I/O ----

    def config_dict(self) -> dict:
        return {
            "class_names": self.class_names,
            "prompt_template": self.prompt_template.to_dict(),
            "prompts": [self.prompt_template(name) for name in self.class_names],
            "base_model_name_or_path": self.base_model_name_or_path,
            "library_versions": library_versions(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike, extra_config: dict | None = None) -> None:
        """Writes the peft adapter (`adapter_model.safetensors` + `adapter_config.json`) and `classifier_config.json`
        (class names, prompt template, base model, versions). Each file appears whole (written aside, then renamed);
        LoRA weights holding NaN or inf are refused (`NonFiniteError`) and nothing is written."""
        save_directory = Path(save_directory)
        check_finite_weights(
            get_peft_model_state_dict(self.clip), f"the classifier adapter in {str(save_directory)!r}"
        )
        with staged_files(save_directory, names=(ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)) as tmp:
            # No base embeddings (the vocabulary is never resized), so no Hub lookup of the base model at every save.
            self.clip.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        write_json_atomic(save_directory / CLASSIFIER_CONFIG_NAME, {**self.config_dict(), **(extra_config or {})})

    def load_adapter_weights(self, adapter_directory: str | os.PathLike) -> None:
        """Loads LoRA weights saved by `save_pretrained` into this model (e.g. the best checkpoint)."""
        state_dict = load_safetensors(Path(adapter_directory) / ADAPTER_WEIGHTS_NAME)
        expected = get_peft_model_state_dict(self.clip)
        mismatched = [
            (key, tuple(value.shape), tuple(expected[key].shape))
            for key, value in state_dict.items()
            if key in expected and value.shape != expected[key].shape
        ]
        if mismatched:
            key, found, wanted = mismatched[0]
            raise ValueError(
                f"Adapter in {str(adapter_directory)!r} does not fit this model: {key} has shape {found} but the "
                f"model's is {wanted} ({len(mismatched)} such weights). It was trained on another base model; load it "
                f"with that one (this model is {self.base_model_name_or_path!r})."
            )
        result = set_peft_model_state_dict(self.clip, state_dict)
        missing_lora = [key for key in result.missing_keys if "lora_" in key]
        if missing_lora or result.unexpected_keys:
            raise ValueError(
                f"Adapter in {str(adapter_directory)!r} does not fit this model: missing {missing_lora[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}. Was it trained with other LoRA targets or base model?"
            )
        self._cached_head = None

    @classmethod
    def from_pretrained(
        cls,
        adapter_directory: str | os.PathLike,
        base_model_name_or_path: str | None = None,
        revision: str | None = None,
    ) -> CLIPLoRAClassifier:
        """Rebuilds a saved classifier: the base CLIP (from `classifier_config.json` unless given) + its adapter."""
        adapter_directory = Path(adapter_directory)
        config_path = adapter_directory / CLASSIFIER_CONFIG_NAME
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"No {CLASSIFIER_CONFIG_NAME} in {str(adapter_directory)!r}: is it an output of train_classifier.py?"
            ) from err
        lora_config = LoraConfig.from_pretrained(str(adapter_directory))
        lora_config.inference_mode = False
        model = cls.from_clip_pretrained(
            base_model_name_or_path or config["base_model_name_or_path"],
            class_names=config["class_names"],
            prompt_template=PromptTemplate(**config["prompt_template"]),
            lora_config=lora_config,
            revision=revision,
        )
        model.load_adapter_weights(adapter_directory)
        return model.eval()
