#!/usr/bin/env python
"""Stage 3 of DataDream: fine-tune CLIP with LoRA on real K-shot + synthetic images (lambda-weighted CE).

Real images are the K-shot subset of the manifest drawn before stage 1; the validation split that picks the best
epoch is carved from the real training data outside that subset (never from test); the test split only feeds the
final report. Output: the peft adapter (safetensors), `classifier_config.json`, the processor, `report.json` /
`report.md` and a model card.

Paper setting (FGVC-Aircraft, 16 shots, 500 synthetic images per class, ViT-B/16; reference batch 64):

    accelerate launch training_scripts/train_classifier.py \
      --model_name_or_path openai/clip-vit-base-patch16 \
      --real_dataset <hub id or save_to_disk folder of aircraft> --real_split train --test_split test \
      --few_shot_manifest out/aircraft_16shot.json --dataset_preset fgvc_aircraft \
      --synthetic_dataset out/aircraft_synthetic --train_mode real+synthetic --real_loss_weight 0.8 \
      --per_device_train_batch_size 64 --num_train_epochs 60 --warmup_steps 0.05 \
      --output_dir out/aircraft_classifier

Real-only baseline (same K images): `--train_mode real` without `--synthetic_dataset`. Synthetic-only:
`--train_mode synthetic`. Several GPUs: `accelerate launch --num_processes 4 ...` or `torchrun --nproc_per_node 4`.
Offline tiny run: `datadream-hf tiny-models --output_dir models && datadream-hf digits --output_dir digits`, then
`--model_name_or_path models/tiny-clip --real_dataset digits --few_shot_manifest <manifest> --train_mode real`.

A killed run continues with the same command plus `--resume_from_checkpoint latest` (the newest complete checkpoint;
one the kill left half written is deleted, never loaded). A second run into a busy `--output_dir` is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import CLIPProcessor, HfArgumentParser, set_seed

from datadream_hf.augment import build_transforms
from datadream_hf.cards import render_card
from datadream_hf.classifier import DEFAULT_CLASSIFIER_BASE, CLIPLoRAClassifier
from datadream_hf.classifier_data import ImageClassificationDataset, load_synthetic_dataset, per_class_subset
from datadream_hf.data import DatasetInputError, class_names_of, load_labelled_dataset
from datadream_hf.few_shot import FewShotManifest
from datadream_hf.files import write_json_atomic, write_text_atomic
from datadream_hf.hub import push_folder_to_hub
from datadream_hf.lora import classifier_lora_config
from datadream_hf.metrics import classification_report, report_markdown
from datadream_hf.prompts import DEFAULT_TEMPLATE, PromptTemplate, domain_for_preset
from datadream_hf.run_folder import TRAINING_CONFIG_NAME, output_dir_lock
from datadream_hf.trainer import (
    DataDreamTrainingArguments,
    MixedRealSyntheticTrainer,
    accuracy_compute_metrics,
    check_fresh_output_dir,
)
from datadream_hf.versions import library_versions

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default=DEFAULT_CLASSIFIER_BASE, metadata={"help": "CLIP model id or path."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the CLIP model."})
    real_dataset: str | None = field(
        default=None, metadata={"help": "Real labelled data: Hub id, save_to_disk folder or image folder."}
    )
    real_split: str = field(default="train", metadata={"help": "Split holding the K-shot images."})
    image_column: str = field(default="image")
    label_column: str = field(default="label")
    class_names: str | None = field(default=None, metadata={"help": "Comma-separated classes to keep, in order."})
    few_shot_manifest: str | None = field(
        default=None,
        metadata={"help": "K-shot manifest (datadream-hf few-shot); required unless train_mode=synthetic."},
    )
    validation_split: str | None = field(
        default=None,
        metadata={"help": "A real split for model selection. Default: carved from real_split outside the K shots."},
    )
    validation_per_class: int = field(
        default=16, metadata={"help": "Validation images per class when carved from real_split."}
    )
    test_split: str | None = field(
        default="test", metadata={"help": "Real split for the final report only (never used for selection)."}
    )
    synthetic_dataset: str | None = field(
        default=None, metadata={"help": "Stage-2 dataset: save_to_disk folder or Hub id (columns image, label)."}
    )
    synthetic_split: str = field(default="train")
    synthetic_images_per_class: int | None = field(
        default=None, metadata={"help": "Use at most this many synthetic images per class (default: all)."}
    )
    dataset_preset: str | None = field(
        default=None, metadata={"help": "Prompt domain preset, e.g. fgvc_aircraft (same as stage 1)."}
    )
    domain: str | None = field(default=None, metadata={"help": "Domain word with trailing space; overrides preset."})
    prompt_template: str = field(default=DEFAULT_TEMPLATE)
    clean_class_names: bool = field(default=False, metadata={"help": "Replace '_' by ' ' in class names."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (reference: 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (reference: 32)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (reference: 0.1)."})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated modules of both towers (reference: Q and V)."}
    )
    license: str = field(default="mit", metadata={"help": "License in the model card (OpenAI CLIP weights: MIT)."})

    def __post_init__(self):
        if not self.real_dataset:
            raise ValueError("`--real_dataset` is required (the K-shot source, and the validation/test splits).")
        if self.validation_per_class < 1:
            raise ValueError(f"`--validation_per_class` must be >= 1, got {self.validation_per_class}.")
        if self.validation_split is not None and self.validation_split == self.test_split:
            raise ValueError(
                f"`--validation_split` and `--test_split` are both {self.test_split!r}: selecting the model on the "
                "test split inflates its accuracy. Use another split or leave `--validation_split` unset."
            )
        if self.lora_rank < 1:
            raise ValueError(f"`--lora_rank` must be >= 1, got {self.lora_rank}.")
        if self.dataset_preset is not None:
            domain_for_preset(self.dataset_preset)  # an unknown preset fails here, before any data is read


def parse_args(input_args: list[str] | None = None) -> tuple[ScriptArguments, DataDreamTrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, DataDreamTrainingArguments))
    # Model selection on the validation split at every epoch; only the best and the last checkpoint are kept.
    parser.set_defaults(
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        save_total_limit=2,
        logging_steps=10,
        report_to="none",
    )
    script_args, training_args = parser.parse_args_into_dataclasses(args=input_args)
    if training_args.train_mode != "real" and not script_args.synthetic_dataset:
        raise ValueError(f"`--train_mode {training_args.train_mode}` needs `--synthetic_dataset`.")
    if training_args.train_mode != "synthetic" and not script_args.few_shot_manifest:
        raise ValueError(
            f"`--train_mode {training_args.train_mode}` trains on the K-shot real images: pass `--few_shot_manifest` "
            "(the one stage 1 used; draw it with `datadream-hf few-shot`)."
        )
    return script_args, training_args


def prompt_template_of(args: ScriptArguments) -> PromptTemplate:
    domain = args.domain if args.domain is not None else domain_for_preset(args.dataset_preset or "imagenet")
    return PromptTemplate(domain=domain, template=args.prompt_template, clean_class_names=args.clean_class_names)


def load_data(args: ScriptArguments, training_args: DataDreamTrainingArguments) -> dict:
    """Real K-shot train rows, validation (outside the K shots), test, synthetic rows; errors before any training."""
    class_names = args.class_names.split(",") if args.class_names else None
    columns = {"image_column": args.image_column, "label_column": args.label_column, "class_names": class_names}
    real = load_labelled_dataset(args.real_dataset, split=args.real_split, **columns)
    names = class_names_of(real)
    manifest = FewShotManifest.load(args.few_shot_manifest) if args.few_shot_manifest else None
    data = {"class_names": names, "manifest": manifest, "real_train": None, "synthetic": None}
    if manifest is not None:
        data["real_train"] = manifest.select(real)  # checks it was drawn from this very dataset
    if args.validation_split:
        data["validation"] = load_labelled_dataset(args.real_dataset, split=args.validation_split, **columns)
        data["validation_source"] = f"real split `{args.validation_split}`"
    else:
        pool = manifest.complement(real) if manifest is not None else real
        if len(pool) == 0:
            raise DatasetInputError(
                f"Split {args.real_split!r} has no image outside the K-shot subset to validate on; pass "
                "`--validation_split` with a real validation split."
            )
        data["validation"] = per_class_subset(pool, args.validation_per_class, seed=training_args.seed)
        outside = "outside the K-shot subset" if manifest is not None else "(no K-shot subset)"
        data["validation_source"] = (
            f"real split `{args.real_split}` {outside}, up to {args.validation_per_class} per class"
        )
    data["test"] = (
        load_labelled_dataset(args.real_dataset, split=args.test_split, **columns) if args.test_split else None
    )
    if args.synthetic_dataset and training_args.train_mode != "real":
        data["synthetic"] = load_synthetic_dataset(
            args.synthetic_dataset,
            names,
            split=args.synthetic_split,
            images_per_class=args.synthetic_images_per_class,
            seed=training_args.seed,
        )
    if training_args.train_mode == "synthetic":
        data["real_train"] = None
    return data


def main(args: tuple[ScriptArguments, DataDreamTrainingArguments]) -> dict:
    script_args, training_args = args
    # The Hub upload is ours (push_folder_to_hub, after the report); keep the Trainer away from the Hub and the
    # token out of everything it writes.
    push_to_hub, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub, training_args.hub_token = False, None

    # 1. Data (every input check happens here, before the model loads).
    check_fresh_output_dir(training_args.output_dir, training_args.resume_from_checkpoint)
    data = load_data(script_args, training_args)
    # The main process holds the output folder for the rest of the run: a second run into it is refused.
    with output_dir_lock(training_args.output_dir, training_args.distributed_state):
        return train_and_report(script_args, training_args, data, push_to_hub, hub_token)


def train_and_report(script_args, training_args, data: dict, push_to_hub: bool, hub_token: str | None) -> dict:
    """Phases 2-5 of `main`: model, training, final evaluation, outputs and the optional upload."""
    class_names = data["class_names"]

    # 2. Model and transforms; seeded first, since the LoRA init draws from the global RNG (the Trainer seeds later).
    set_seed(training_args.seed)
    prompt_template = prompt_template_of(script_args)
    lora_config = classifier_lora_config(
        rank=script_args.lora_rank,
        alpha=script_args.lora_alpha,
        dropout=script_args.lora_dropout,
        target_modules=script_args.lora_target_modules.split(","),
    )
    model = CLIPLoRAClassifier.from_clip_pretrained(
        script_args.model_name_or_path, class_names, prompt_template, lora_config, revision=script_args.revision
    )
    processor = CLIPProcessor.from_pretrained(script_args.model_name_or_path, revision=script_args.revision)
    train_transform, eval_transform = build_transforms(
        processor.image_processor, training_args.augmentation, seed=training_args.seed + training_args.process_index
    )
    train_dataset = ImageClassificationDataset(data["real_train"], data["synthetic"], train_transform)
    validation = ImageClassificationDataset(data["validation"], transform=eval_transform)

    # 3. Train, selecting the best epoch on validation.
    trainer = MixedRealSyntheticTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=validation,
        processing_class=processor,
        compute_metrics=accuracy_compute_metrics(len(class_names)),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 4. Final evaluation of the selected model, saying where every number comes from.
    evaluations = {"validation": (validation, data["validation_source"])}
    if data["test"] is not None:
        test = ImageClassificationDataset(data["test"], transform=eval_transform)
        evaluations["test"] = (test, f"real split `{script_args.test_split}` (held out, report only)")
    results = {}
    for split, (dataset, source) in evaluations.items():
        prediction = trainer.predict(dataset, metric_key_prefix=split)
        results[split] = classification_report(
            prediction.predictions.argmax(-1), prediction.label_ids, class_names, source
        )

    real_per_batch, synthetic_per_batch = training_args.samples_per_batch()
    manifest = data["manifest"]
    config = {
        "script_args": asdict(script_args),
        "training_args": {k: v for k, v in training_args.to_dict().items() if not k.endswith("_token")},
        "class_names": class_names,
        "prompt_template": prompt_template.to_dict(),
        "manifest": None if manifest is None else {"k": manifest.k, "seed": manifest.seed, "source": manifest.source},
        "num_real": train_dataset.num_real,
        "num_synthetic": train_dataset.num_synthetic,
        "world_size": training_args.world_size,
        "real_per_batch": real_per_batch,
        "synthetic_per_batch": synthetic_per_batch,
        "library_versions": library_versions(),
    }
    report = {
        "selection": {
            "metric": training_args.metric_for_best_model,
            "split": "validation",
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_metric": trainer.state.best_metric,
        },
        "evaluations": results,
        "train_mode": training_args.train_mode,
        "real_loss_weight": training_args.real_loss_weight,
        "library_versions": library_versions(),
    }

    # 5. Outputs (main process): adapter, configs, report, card; then the optional upload.
    trainer.save_model(training_args.output_dir)
    if training_args.should_save:
        output_dir = Path(training_args.output_dir)
        write_json_atomic(output_dir / TRAINING_CONFIG_NAME, config)
        write_json_atomic(output_dir / "report.json", report)
        write_text_atomic(output_dir / "report.md", report_markdown(report))
        write_text_atomic(output_dir / "README.md", _render_card(script_args, training_args, config, results))
        if push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.resolve().name
            push_folder_to_hub(output_dir, repo_id, token=hub_token, private=bool(training_args.hub_private_repo))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if training_args.should_save:
        print(json.dumps({split: round(r["accuracy"], 4) for split, r in results.items()}))
    return report


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and not os.path.exists(source) and source.count("/") <= 1


def _render_card(script_args, training_args, config, results) -> str:
    manifest = config["manifest"] or {}
    hparams = {
        "learning_rate": training_args.learning_rate,
        "weight_decay": training_args.weight_decay,
        "lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "augmentation": training_args.augmentation,
        "mix_augmentation": training_args.mix_augmentation,
        "lora": f"r={script_args.lora_rank}, alpha={script_args.lora_alpha}, dropout={script_args.lora_dropout}, "
        f"targets={script_args.lora_target_modules}",
        "seed": training_args.seed,
    }
    hub_datasets = [s for s in (script_args.real_dataset, script_args.synthetic_dataset) if _is_hub_id(s)]
    return render_card(
        "classifier_card.md",
        base_model=script_args.model_name_or_path,
        license=script_args.license,
        hub_datasets=hub_datasets,
        class_names=config["class_names"],
        example_prompt=PromptTemplate(**config["prompt_template"])(config["class_names"][0]),
        real_dataset=script_args.real_dataset,
        real_split=script_args.real_split,
        k=manifest.get("k"),
        manifest_seed=manifest.get("seed"),
        manifest_fingerprint=(manifest.get("source") or {}).get("fingerprint"),
        num_real=config["num_real"],
        synthetic_dataset=script_args.synthetic_dataset,
        num_synthetic=config["num_synthetic"],
        train_mode=training_args.train_mode,
        real_loss_weight=training_args.real_loss_weight,
        real_per_batch=config["real_per_batch"],
        synthetic_per_batch=config["synthetic_per_batch"],
        selection_metric=training_args.metric_for_best_model,
        selection_split="validation",
        evaluations=results,
        hparams=hparams,
        library_versions=config["library_versions"],
    )


if __name__ == "__main__":
    main(parse_args())
