"""What every stage-3 classifier is to the Trainer: `ClassifierBackbone`, the small interface each backbone module
implements (forward to class logits, save, load trained weights, reload), and the LoRA adapter I/O they share."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers.utils import ModelOutput

from ...files import staged_files, write_json_atomic
from ...lora import load_safetensors
from ...prompts import PromptTemplate
from ...run_folder import CLASSIFIER_CONFIG_NAME
from ...validation import check_finite_weights
from ...versions import library_versions

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
FULL_WEIGHTS_NAME = "model.safetensors"  # a fully fine-tuned model, saved as a transformers checkpoint
# The weights file of a finished classifier or a complete checkpoint: a LoRA adapter or a whole model.
WEIGHTS_NAMES = (ADAPTER_WEIGHTS_NAME, FULL_WEIGHTS_NAME)


@dataclass
class ClassifierOutput(ModelOutput):
    """`logits` (B, num_classes); `loss` is the plain cross-entropy when labels were given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ClassifierBackbone(nn.Module):
    """A classifier over a fixed list of classes, as `MixedRealSyntheticTrainer` and `train_classifier` use it.

    A backbone module subclasses it and sets `kind` (recorded in `classifier_config.json`, so a saved classifier
    reloads through the right module); it implements `forward(pixel_values, labels=None) -> ClassifierOutput`,
    `save_pretrained`, `load_trained_weights` (a checkpoint's weights into this model: resume, best epoch) and
    `from_pretrained` (a saved classifier, rebuilt).
    """

    kind: ClassVar[str]
    main_input_name = "pixel_values"

    def __init__(self, class_names: list[str], prompt_template: PromptTemplate | None, base_model_name_or_path: str):
        super().__init__()
        if not class_names:
            raise ValueError("`class_names` is empty; the classifier needs at least one class.")
        self.class_names = list(class_names)
        self.prompt_template = prompt_template or PromptTemplate()
        self.base_model_name_or_path = base_model_name_or_path

    def config_dict(self) -> dict:
        """`classifier_config.json`: what rebuilds this classifier (backbone kind, classes, prompts, base model)."""
        return {
            "backbone": self.kind,
            "class_names": self.class_names,
            "prompt_template": self.prompt_template.to_dict(),
            "prompts": [self.prompt_template(name) for name in self.class_names],
            "base_model_name_or_path": self.base_model_name_or_path,
            "library_versions": library_versions(),
        }

    def summary(self) -> dict:
        """What the run record and the card say about the model: its kind and class, how it is fine-tuned, the LoRA
        targets and the number of trained parameters."""
        peft_model = next((m for m in self.children() if isinstance(m, PeftModel)), None)
        model = peft_model.get_base_model() if peft_model is not None else next(self.children())
        targets = peft_model.peft_config["default"].target_modules if peft_model is not None else None
        return {
            "backbone": self.kind,
            "model_class": type(model).__name__,
            "model_type": model.config.model_type,
            "fine_tuning": "lora" if peft_model is not None else "full",
            "lora_target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }

    def write_classifier_config(self, save_directory: Path, extra_config: dict | None = None) -> None:
        write_json_atomic(save_directory / CLASSIFIER_CONFIG_NAME, {**self.config_dict(), **(extra_config or {})})

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, extra_config: dict | None = None) -> None:
        raise NotImplementedError

    def load_trained_weights(self, directory: str | os.PathLike) -> None:
        raise NotImplementedError


def read_classifier_config(directory: str | os.PathLike) -> dict:
    """The `classifier_config.json` of a saved classifier; an error that says what the folder should be."""
    path = Path(directory) / CLASSIFIER_CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"No {CLASSIFIER_CONFIG_NAME} in {str(directory)!r}: is it an output of train_classifier.py?"
        ) from err


def saved_lora_config(directory: str | os.PathLike) -> LoraConfig:
    """The `LoraConfig` an adapter was saved with, ready to train again (peft saves it in inference mode)."""
    lora_config = LoraConfig.from_pretrained(str(directory))
    lora_config.inference_mode = False
    return lora_config


def save_adapter(peft_model: PeftModel, save_directory: Path) -> None:
    """Writes the peft adapter (`adapter_model.safetensors` + `adapter_config.json`), each file whole (written aside,
    then renamed); weights holding NaN or inf are refused (`NonFiniteError`) and nothing is written."""
    check_finite_weights(get_peft_model_state_dict(peft_model), f"the classifier adapter in {str(save_directory)!r}")
    with staged_files(save_directory, names=(ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)) as tmp:
        # No base embeddings (the vocabulary is never resized), so no Hub lookup of the base model at every save.
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)


def load_adapter_safetensors(
    peft_model: PeftModel, adapter_directory: str | os.PathLike, base_model_name_or_path: str
) -> None:
    """Loads adapter weights saved by `save_adapter` into `peft_model`, refusing one of another shape or placement."""
    state_dict = load_safetensors(Path(adapter_directory) / ADAPTER_WEIGHTS_NAME)
    expected = get_peft_model_state_dict(peft_model)
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
            f"with that one (this model is {base_model_name_or_path!r})."
        )
    result = set_peft_model_state_dict(peft_model, state_dict)
    missing_lora = [key for key in result.missing_keys if "lora_" in key]
    if missing_lora or result.unexpected_keys:
        raise ValueError(
            f"Adapter in {str(adapter_directory)!r} does not fit this model: missing {missing_lora[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}. Was it trained with other LoRA targets or base model?"
        )


def exclude_unreachable_targets(model: nn.Module, lora_config: LoraConfig) -> list[str]:
    """Adds to `lora_config.exclude_modules` the layers its targets name inside an `nn.MultiheadAttention` (SigLIP's
    vision pooling head): that module's forward reads `out_proj.weight` directly, so a LoRA there would never act,
    and under DDP its parameters would never get a gradient. Returns the excluded names."""
    targets = lora_config.target_modules
    if isinstance(targets, str):  # a regex: the user chose the modules one by one
        return []
    unreachable = sorted(
        f"{owner}.{child}"
        for owner, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child and child.rsplit(".", 1)[-1] in set(targets)
    )
    if unreachable:
        lora_config.exclude_modules = sorted(set(lora_config.exclude_modules or []) | set(unreachable))
    return unreachable
