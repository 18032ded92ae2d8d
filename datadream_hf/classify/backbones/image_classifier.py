"""Image-classification models (`AutoModelForImageClassification`: ViT, ConvNeXt, DINOv2, ...) as stage-3
classifiers: a head over the classes (fresh, or initialised from class-prompt text embeddings where the checkpoint
has a text tower), fine-tuned with a peft LoRA (the head trains whole) or in full."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoTokenizer, PreTrainedModel

from ...files import staged_files
from ...prompts import PromptTemplate
from ...validation import check_finite_weights
from .base import (
    FULL_WEIGHTS_NAME,
    ClassifierBackbone,
    ClassifierOutput,
    exclude_unreachable_targets,
    load_adapter_safetensors,
    read_classifier_config,
    save_adapter,
    saved_lora_config,
)
from .dual_encoder import class_prompt_embeddings, is_dual_encoder

logger = logging.getLogger(__name__)

# Attention query/value projections, as the models name them (transformers 5: q_proj/v_proj in ViT, DeiT, DINOv2,
# Swin, CLIP, SigLIP; query/value in older remote-free ports): the default LoRA placement, as the reference's Q and V.
ATTENTION_QV_NAMES = ("query", "value", "q_proj", "v_proj")


def classification_head_name(model: PreTrainedModel) -> str:
    """The name of the layer that outputs the class logits: the last `nn.Linear` with `num_labels` outputs."""
    heads = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == model.config.num_labels
    ]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear layer with {model.config.num_labels} outputs.")
    return heads[-1]


def default_lora_targets(model: PreTrainedModel, head_name: str) -> list[str]:
    """The attention query/value projections where the model has attention (the reference's Q and V); else (a
    convolutional model such as ConvNeXt) every other linear layer, whose short names are returned."""
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != head_name
    }
    attention = sorted(linear & set(ATTENTION_QV_NAMES))
    if attention:
        return attention
    if not linear:
        raise ValueError(
            f"{type(model).__name__} has no linear layer besides its head for a LoRA: pass --use_peft false (full "
            "fine-tuning) or --lora_target_modules."
        )
    return sorted(linear)


def text_head_init(model_name_or_path: str, revision, class_names, prompt_template, head: nn.Linear):
    """Class-prompt text embeddings as initial head weights, (num_classes, in_features), or None where the checkpoint
    has no text tower. As WiSE-FT and LP-FT start from the zero-shot head: the normalised text embeddings, brought
    back through the dual encoder's image projection where it has one (CLIP's `visual_projection`). An informed start,
    not the zero-shot classifier itself: the classification model pools its image features its own way."""
    if getattr(AutoConfig.from_pretrained(model_name_or_path, revision=revision), "text_config", None) is None:
        return None
    encoder, loading = AutoModel.from_pretrained(
        model_name_or_path, revision=revision, use_safetensors=True, output_loading_info=True
    )
    # A checkpoint saved as an image classifier keeps its config's text tower but not its weights.
    if not is_dual_encoder(type(encoder)) or any(key.startswith("text_") for key in loading["missing_keys"]):
        return None
    encoder.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, revision=revision)
    with torch.no_grad():
        text = class_prompt_embeddings(encoder, tokenizer, [prompt_template(c) for c in class_names])
    text = F.normalize(text, dim=-1)  # (C, D_text)
    projection = getattr(encoder, "visual_projection", None)
    if isinstance(projection, nn.Linear) and projection.in_features == head.in_features:
        return text @ projection.weight  # (C, D_text) @ (D_text, D_vision)
    if text.shape[-1] == head.in_features:
        return text
    logger.info(
        f"The head of {model_name_or_path!r} starts fresh: its text embeddings ({text.shape[-1]}) do not match the "
        f"head's input ({head.in_features})."
    )
    return None


def freeze_unused_parameters(model: PreTrainedModel) -> list[str]:
    """Freezes the parameters no logit depends on and returns their names: one backward pass through a blank image
    finds them (CLIP's vision post-layernorm and SigLIP's pooling head, which their classification models compute but
    bypass by mean-pooling). They would never train, and under DDP (`ddp_find_unused_parameters=False`) their missing
    gradients would stop the run."""
    config = getattr(model.config, "vision_config", model.config)
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    was_training = model.training
    model.eval()
    model(pixel_values=torch.zeros(1, getattr(config, "num_channels", 3), size, size)).logits.sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for name in unused:
        model.get_parameter(name).requires_grad_(False)
    return unused


class ImageClassifier(ClassifierBackbone):
    """An `AutoModelForImageClassification` model over a fixed list of classes.

    Args:
        model: the classification model, built with `num_labels=len(class_names)`.
        class_names: class names in label order.
        prompt_template: the class prompts (recorded; they initialise the head where a text tower exists).
        lora_config: a LoRA on the backbone (default targets: `default_lora_targets`) with the head trained whole;
            None: full fine-tuning, every weight on the logits' path trains (`freeze_unused_parameters`).
        head_init: initial head weights (num_classes, in_features), bias zero; None keeps the model's (fresh) head.
    """

    kind = "image_classifier"

    def __init__(
        self,
        model: PreTrainedModel,
        class_names: list[str],
        prompt_template: PromptTemplate | None = None,
        lora_config: LoraConfig | None = None,
        head_init: torch.Tensor | None = None,
    ):
        super().__init__(class_names, prompt_template, model.config._name_or_path)
        if model.config.num_labels != len(self.class_names):
            raise ValueError(f"The model has {model.config.num_labels} labels for {len(self.class_names)} classes.")
        head_name = classification_head_name(model)
        if head_init is not None:
            head = model.get_submodule(head_name)
            with torch.no_grad():
                head.weight.copy_(head_init.to(head.weight.dtype))
                head.bias.zero_()
        self.head_init = "text" if head_init is not None else "fresh"
        if lora_config is None:
            self.model = model.requires_grad_(True)
            frozen = freeze_unused_parameters(model)
            if frozen:
                logger.info(f"Frozen, as no logit depends on them: {', '.join(frozen)}.")
        else:
            if lora_config.target_modules is None:
                lora_config.target_modules = default_lora_targets(model, head_name)
            lora_config.modules_to_save = sorted(set(lora_config.modules_to_save or []) | {head_name})
            exclude_unreachable_targets(model, lora_config)
            self.model = get_peft_model(model, lora_config)

    @classmethod
    def from_base_pretrained(
        cls,
        model_name_or_path: str,
        class_names: list[str],
        prompt_template: PromptTemplate | None = None,
        lora_config: LoraConfig | None = None,
        revision: str | None = None,
        head_from_text: bool = True,
    ) -> ImageClassifier:
        """Loads the model (safetensors only, no remote code) with a head over `class_names` (a checkpoint's own
        head of another size is replaced), initialised from the class prompts where a text tower exists."""
        prompt_template = prompt_template or PromptTemplate()
        model = AutoModelForImageClassification.from_pretrained(
            model_name_or_path,
            revision=revision,
            use_safetensors=True,
            num_labels=len(class_names),
            id2label=dict(enumerate(class_names)),
            label2id={name: i for i, name in enumerate(class_names)},
            ignore_mismatched_sizes=True,
        )
        head_init = None
        if head_from_text:
            head = model.get_submodule(classification_head_name(model))
            head_init = text_head_init(model_name_or_path, revision, class_names, prompt_template, head)
        return cls(model, class_names, prompt_template, lora_config, head_init)

    @property
    def uses_lora(self) -> bool:
        return isinstance(self.model, PeftModel)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        logits = self.model(pixel_values=pixel_values).logits  # (B, C)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)

    def config_dict(self) -> dict:
        fine_tuning = "lora" if self.uses_lora else "full"
        return {**super().config_dict(), "fine_tuning": fine_tuning, "head_init": self.head_init}

    def summary(self) -> dict:
        return {**super().summary(), "head_init": self.head_init}

    # ---- weights I/O ----

    def save_pretrained(self, save_directory: str | os.PathLike, extra_config: dict | None = None) -> None:
        """LoRA: the peft adapter (the head among its saved modules); full fine-tuning: the whole model as a
        transformers checkpoint (`model.safetensors` + `config.json`, loadable by `AutoModelForImageClassification`).
        Then `classifier_config.json`. Each file appears whole; weights holding NaN or inf are refused."""
        save_directory = Path(save_directory)
        if self.uses_lora:
            save_adapter(self.model, save_directory)
        else:
            check_finite_weights(self.model.state_dict(), f"the classifier in {str(save_directory)!r}")
            with staged_files(save_directory, names=(FULL_WEIGHTS_NAME, "config.json")) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
        self.write_classifier_config(save_directory, extra_config)

    def load_trained_weights(self, directory: str | os.PathLike) -> None:
        """Loads the weights `save_pretrained` wrote into this model (e.g. the best checkpoint)."""
        if self.uses_lora:
            load_adapter_safetensors(self.model, directory, self.base_model_name_or_path)
            return
        if not (Path(directory) / FULL_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"No {FULL_WEIGHTS_NAME} in {str(directory)!r}: no fully fine-tuned model there.")
        # transformers renames some weights when it saves (e.g. ViT's to the older layout): read them back through it.
        saved = AutoModelForImageClassification.from_pretrained(str(directory), use_safetensors=True)
        result = self.model.load_state_dict(saved.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"The weights in {str(directory)!r} do not fit this model: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}. Were they trained on another base model?"
            )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        base_model_name_or_path: str | None = None,
        revision: str | None = None,
    ) -> ImageClassifier:
        """Rebuilds a saved classifier: the base model (from `classifier_config.json` unless given) + its adapter, or
        the fully fine-tuned model itself."""
        config = read_classifier_config(directory)
        class_names, template = config["class_names"], PromptTemplate(**config["prompt_template"])
        if (Path(directory) / FULL_WEIGHTS_NAME).is_file() and config.get("fine_tuning") == "full":
            model = AutoModelForImageClassification.from_pretrained(str(directory), use_safetensors=True)
            model.config._name_or_path = config["base_model_name_or_path"]
            classifier = cls(model, class_names, template)
            classifier.head_init = config.get("head_init", classifier.head_init)
            return classifier.eval()
        model = cls.from_base_pretrained(
            base_model_name_or_path or config["base_model_name_or_path"],
            class_names,
            template,
            lora_config=saved_lora_config(directory),
            revision=revision,
            head_from_text=False,  # the adapter holds the trained head
        )
        model.load_trained_weights(directory)
        return model.eval()
