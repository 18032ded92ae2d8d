#!/usr/bin/env python
"""Stage 3 of DataDream: fine-tune CLIP (or SigLIP, ViT, ...) with LoRA on real K-shot + synthetic images (lambda CE).

Real images are the K-shot subset of the manifest drawn before stage 1 (which also gives the classes, their order and
names); the validation split that picks the best epoch is carved from the real training data outside that subset
(never from test); the test set only feeds the final report and holds no training or validation image: a split
(`--test_split`), a separate `--test_dataset` (e.g. a folder), or `--test_per_class N` carved outside the K shots and
the validation images; the report names it. Output: the peft adapter (safetensors), `classifier_config.json`, the
run record `datadream_config.json` (with the class prompts), the processor, `report.json` / `report.md`, a model card.

The defaults are the reference's recipe: batch 64 per device, AdamW lr 1e-4, weight decay 1e-4, a 3-epoch linear
warm-up from 1e-8 then a cosine down to 1e-8 (`--lr_scheduler_type cosine_with_min_lr`, `--warmup_epochs 3`), no
gradient clipping, fp16 autocast on a GPU (fp32 on CPU), MixUp/CutMix on 20% of the batches, lambda 0.8, 100 epochs;
`--dataset_preset` sets the paper's epochs where known and the Hub copy's columns and splits. Paper setting
(FGVC-Aircraft, 16 shots, 500 synthetic images per class, ViT-B/16; the preset sets 50 epochs, the `variant` label
column and the train/test splits):

    accelerate launch training_scripts/train_classifier.py \
      --model_name_or_path openai/clip-vit-base-patch16 \
      --real_dataset <hub id or save_to_disk folder of aircraft> \
      --few_shot_manifest out/aircraft_16shot.json --dataset_preset fgvc_aircraft \
      --synthetic_dataset out/aircraft_synthetic --train_mode real+synthetic \
      --output_dir out/aircraft_classifier

Other backbones (the kind is read from the model's config; same loss, batches and recipe): SigLIP
`--model_name_or_path google/siglip-base-patch16-224`, SigLIP 2 `google/siglip2-base-patch16-224` (fixed resolution),
an image-classification model such as `google/vit-base-patch16-224-in21k` (LoRA; `--use_peft false` fine-tunes every
weight), or a dual encoder's image tower under a head initialised from its text tower (`--classifier_type
image_classifier`).

Real-only baseline (same K images): `--train_mode real` without `--synthetic_dataset`. Synthetic-only:
`--train_mode synthetic`. Several GPUs: `accelerate launch --num_processes 4 ...` or `torchrun --nproc_per_node 4`.
Offline plumbing check: `datadream-hf tiny-models --output_dir models && datadream-hf digits --output_dir digits`, then
`--model_name_or_path models/tiny-clip --real_dataset digits --few_shot_manifest <manifest> --train_mode real` (a small
run: add `--max_steps 20 --per_device_train_batch_size 8`). The tiny test CLIP has RANDOM weights (a plumbing check
only); for meaningful offline runs use the tiny world's pre-trained CLIP (`datadream-hf tiny-world` prints its folder;
`datadream_hf.tiny_world.world.tiny_world_paths().clip`).

A killed run continues with the same command plus `--resume_from_checkpoint latest` (the newest complete checkpoint;
one the kill left half written is deleted, never loaded). A second run into a busy `--output_dir` is refused.

Every flag is a field of `ClassifierArguments` or `DataDreamTrainingArguments` (`datadream_hf.classify.config`, where
their help and checks live). A JSON or YAML file of them can stand for the flags: `train_classifier.py stage3.yaml`.
Bad input (a missing path, another stage's folder as `--synthetic_dataset`, fp16 on a CPU, ...) stops the script with
one line naming it; `--debug` adds the traceback.
"""

from __future__ import annotations

import json

from datadream_hf.arguments import ScriptArgumentParser
from datadream_hf.classify.config import (
    SCRIPT_DEFAULTS,
    ClassifierArguments,
    DataDreamTrainingArguments,
    check_arguments,
)
from datadream_hf.classify.train import train_classifier
from datadream_hf.console import setup_script_console
from datadream_hf.errors import run_script


def parse_args(input_args: list[str] | None = None) -> tuple[ClassifierArguments, DataDreamTrainingArguments]:
    parser = ScriptArgumentParser((ClassifierArguments, DataDreamTrainingArguments), defaults=SCRIPT_DEFAULTS)
    args, training_args = parser.parse(input_args)
    check_arguments(args, training_args)
    return args, training_args


def main(args: tuple[ClassifierArguments, DataDreamTrainingArguments]) -> dict:
    classifier_args, training_args = args
    setup_script_console()
    report = train_classifier(classifier_args, training_args)
    if training_args.should_save:
        print(json.dumps({split: round(r["accuracy"], 4) for split, r in report["evaluations"].items()}))
    return report


if __name__ == "__main__":
    run_script(main, parse_args)
