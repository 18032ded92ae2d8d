"""Dual-encoder classifiers (CLIP, SigLIP, SigLIP 2 fixed-resolution, other `AutoModel`s with `get_text_features` and
`get_image_features`): a peft LoRA on both towers, and a head made of the class-prompt text embeddings.

Faithful to the reference classifier (DataDream `classify/models/clip.py`): the head is recomputed through the
LoRA'd text tower at every training forward (so the text LoRA learns), cached in eval mode, and
logits = scale * cosine(image, class prompt) (+ the model's bias, SigLIP's `logit_bias`), scale and bias frozen.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from ...lora import CLASSIFIER_TARGET_MODULES, classifier_lora_config
from ...prompts import PromptTemplate
from .base import (
    ClassifierBackbone,
    ClassifierOutput,
    exclude_unreachable_targets,
    load_adapter_safetensors,
    read_classifier_config,
    save_adapter,
    saved_lora_config,
)

# How each model family's text tower was trained to read a prompt. SigLIP pools the LAST position of its text tower,
# so it reads prompts padded to its full length ("max_length", 64), as it was trained; the others pool the end token
# and take the shortest padding.
PADDING_BY_MODEL_TYPE = {"siglip": "max_length"}


def is_dual_encoder(model_class: type) -> bool:
    """Whether a model class gives text and image features (the head comes from the text tower)."""
    return all(callable(getattr(model_class, name, None)) for name in ("get_text_features", "get_image_features"))


def check_fixed_resolution(model: PreTrainedModel, name: str) -> None:
    """Refuses a dual encoder whose image tower needs more than `pixel_values` (SigLIP 2 NaFlex: patches plus
    `spatial_shapes` and `pixel_attention_mask`); stage 3 feeds square images at the processor's size."""
    parameters = inspect.signature(model.get_image_features).parameters
    extra = [p for p in ("spatial_shapes", "pixel_attention_mask", "image_sizes") if p in parameters]
    if extra:
        raise ValueError(
            f"--model_name_or_path {name!r} ({model.config.model_type}) is a variable-resolution model: its image "
            f"tower takes {', '.join(extra)} besides the pixels. Stage 3 trains on fixed-size images: use a "
            "fixed-resolution checkpoint (SigLIP 2: e.g. google/siglip2-base-patch16-224)."
        )


def class_prompt_tokens(model: PreTrainedModel, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The prompts tokenized as the model's text tower was trained to read them: its family's padding rule, at most
    its position count, and only the inputs its tokenizer gives the model (SigLIP's: no attention mask)."""
    padding = PADDING_BY_MODEL_TYPE.get(model.config.model_type, True)
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    tokens = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {key: tokens[key] for key in tokenizer.model_input_names if key in tokens}


def class_prompt_embeddings(model: PreTrainedModel, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The text embeddings of `prompts`, (num_prompts, projection_dim), not normalized."""
    return features(model.get_text_features(**class_prompt_tokens(model, tokenizer, prompts)))


def logit_scale(model: PreTrainedModel) -> torch.Tensor:
    """The factor on the cosine: exp(`logit_scale`) (CLIP, SigLIP), or 1 / `temperature` (ALIGN)."""
    if hasattr(model, "logit_scale"):
        return model.logit_scale.exp()
    if hasattr(model, "temperature"):
        return 1.0 / model.temperature
    raise ValueError(
        f"{type(model).__name__} has no `logit_scale` or `temperature`: the classifier does not know how it scales "
        "its cosine similarities into logits."
    )


def features(output) -> torch.Tensor:
    """The embeddings `get_*_features` return: a tensor, or (transformers 5) a model output's `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DualEncoderClassifier(ClassifierBackbone):
    """A dual encoder + LoRA image classifier over a fixed list of classes.

    Args:
        model: a dual encoder (`CLIPModel`, `SiglipModel`, ...; its weights stay frozen, only the LoRA trains).
        tokenizer: the model's tokenizer, used once to tokenize the class prompts with the model's own padding rule.
        class_names: class names in label order.
        prompt_template: how a class name becomes a prompt (use stage 1's template).
        lora_config: defaults to `datadream_hf.lora.classifier_lora_config()` (r=16, alpha=32, dropout 0.1 on
            q_proj/v_proj of both towers). Layers its targets name inside an `nn.MultiheadAttention` (SigLIP's vision
            pooling head) are excluded: a LoRA there would never act.
    """

    kind = "dual_encoder"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        class_names: list[str],
        prompt_template: PromptTemplate | None = None,
        lora_config: LoraConfig | None = None,
    ):
        super().__init__(class_names, prompt_template, model.config._name_or_path)
        lora_config = lora_config or classifier_lora_config()
        if lora_config.target_modules is None:
            lora_config.target_modules = set(CLASSIFIER_TARGET_MODULES)  # the reference's Q and V, both towers
        exclude_unreachable_targets(model, lora_config)
        # get_peft_model freezes every base weight, logit_scale and logit_bias included (the reference keeps CLIP's
        # at ~100).
        self.encoder = get_peft_model(model, lora_config)
        tokens = class_prompt_tokens(model, tokenizer, [self.prompt_template(name) for name in self.class_names])
        self.prompt_keys = list(tokens)
        for key, value in tokens.items():
            self.register_buffer(f"prompt_{key}", value, persistent=False)
        self._cached_head: torch.Tensor | None = None

    @classmethod
    def from_base_pretrained(
        cls,
        model_name_or_path: str,
        class_names: list[str],
        prompt_template: PromptTemplate | None = None,
        lora_config: LoraConfig | None = None,
        revision: str | None = None,
    ) -> DualEncoderClassifier:
        """Loads the base dual encoder (safetensors only, no remote code) and adds a fresh LoRA."""
        model = AutoModel.from_pretrained(model_name_or_path, revision=revision, use_safetensors=True)
        if not is_dual_encoder(type(model)):
            raise ValueError(
                f"--model_name_or_path {model_name_or_path!r} ({model.config.model_type}) has no text and image "
                "towers (`get_text_features`, `get_image_features`): it cannot be a dual-encoder classifier."
            )
        check_fixed_resolution(model, model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, revision=revision)
        return cls(model, tokenizer, class_names, prompt_template, lora_config)

    @property
    def dual_encoder(self) -> PreTrainedModel:
        """The LoRA-injected dual encoder inside the peft wrapper."""
        return self.encoder.get_base_model()

    def class_head(self) -> torch.Tensor:
        """L2-normalized text embeddings of the class prompts, (num_classes, projection_dim)."""
        tokens = {key: getattr(self, f"prompt_{key}") for key in self.prompt_keys}
        return F.normalize(features(self.dual_encoder.get_text_features(**tokens)), dim=-1)

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
        model = self.dual_encoder
        image = F.normalize(features(model.get_image_features(pixel_values=pixel_values)), dim=-1)  # (B, D)
        head = self._head().to(image.dtype)  # (C, D)
        logits = logit_scale(model) * image @ head.t()  # (B, C)
        if getattr(model, "logit_bias", None) is not None:  # SigLIP: one constant for every class
            logits = logits + model.logit_bias
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)

    # ---- weights I/O ----

    def save_pretrained(self, save_directory: str | os.PathLike, extra_config: dict | None = None) -> None:
        """Writes the peft adapter (`adapter_model.safetensors` + `adapter_config.json`) and `classifier_config.json`
        (backbone, class names, prompt template, base model, versions). Each file appears whole; LoRA weights holding
        NaN or inf are refused (`NonFiniteError`) and nothing is written."""
        save_directory = Path(save_directory)
        save_adapter(self.encoder, save_directory)
        self.write_classifier_config(save_directory, extra_config)

    def load_trained_weights(self, directory: str | os.PathLike) -> None:
        """Loads LoRA weights saved by `save_pretrained` into this model (e.g. the best checkpoint)."""
        load_adapter_safetensors(self.encoder, directory, self.base_model_name_or_path)
        self._cached_head = None

    @classmethod
    def from_pretrained(
        cls,
        adapter_directory: str | os.PathLike,
        base_model_name_or_path: str | None = None,
        revision: str | None = None,
    ) -> DualEncoderClassifier:
        """Rebuilds a saved classifier: the base model (from `classifier_config.json` unless given) + its adapter."""
        config = read_classifier_config(adapter_directory)
        model = cls.from_base_pretrained(
            base_model_name_or_path or config["base_model_name_or_path"],
            class_names=config["class_names"],
            prompt_template=PromptTemplate(**config["prompt_template"]),
            lora_config=saved_lora_config(adapter_directory),
            revision=revision,
        )
        model.load_trained_weights(adapter_directory)
        return model.eval()
