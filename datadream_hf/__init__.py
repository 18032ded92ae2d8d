"""datadream_hf: DataDream (ECCV'24, few-shot guided dataset generation) for diffusers, datasets and transformers.

The public API, as the README's "Use it from Python" uses it: the K-shot manifest, the three stages' settings and
entry points, the classifier and its Trainer. Each name is imported on first use, so `import datadream_hf` stays cheap.
"""

from __future__ import annotations

import importlib

from .console import silence_harmless_log_messages

__version__ = "0.1.0"

# Before any library logs: transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
# `CLIPImageProcessorPil`" lines (torchvision cannot be imported beside the CPU torch; the PIL processors are the ones
# every stage uses) would otherwise open every command's output.
silence_harmless_log_messages()

# Public name -> the module (under datadream_hf) that defines it.
_PUBLIC_API = {
    # The data every stage reads: a labelled dataset, the K real images per class, the class prompts.
    "load_labelled_dataset": "data",
    "FewShotManifest": "few_shot",
    "draw_few_shot": "few_shot",
    "PromptTemplate": "prompts",
    # Stage 1: adapt the generator.
    "GeneratorTrainingConfig": "adapt.config",
    "load_few_shot_data": "adapt.data",
    "train_generator": "adapt.train",
    # Stage 2: generate the synthetic dataset.
    "GenerationArguments": "generate.config",
    "GenerationConfig": "generate.config",
    "generate_synthetic_dataset": "generate.run",
    "load_synthetic_dataset": "synthetic",
    # Stage 3: train the classifier.
    "ClassifierArguments": "classify.config",
    "DataDreamTrainingArguments": "classify.config",
    "CLIPLoRAClassifier": "classify.modeling",
    "load_trained_classifier": "classify.backbones",
    "MixedRealSyntheticTrainer": "classify.trainer",
    "train_classifier": "classify.train",
}
__all__ = list(_PUBLIC_API)


def __getattr__(name: str):
    if name not in _PUBLIC_API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC_API[name]}"), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
