"""The stage-3 output folder, beside the adapter and processor the Trainer saves: the run record (every argument but
the tokens, and the data it trained on), the report (each evaluation and where its images come from) and the model
card."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from ..cards import render_card
from ..files import write_json_atomic, write_text_atomic
from ..prompts import PromptTemplate
from ..run_folder import TRAINING_CONFIG_NAME
from ..versions import library_versions
from .metrics import report_markdown

CARD_TEMPLATE = "classifier_card.md"
REPORT_NAME = "report.json"
REPORT_MARKDOWN_NAME = "report.md"


def run_record(args, training_args, data: dict, prompt_template: PromptTemplate, train_dataset, classifier) -> dict:
    """`datadream_config.json`: the arguments (tokens left out), the classifier (backbone kind, fine-tuning, LoRA
    targets), classes, prompts, K-shot origin, batch composition."""
    real_per_batch, synthetic_per_batch = training_args.samples_per_batch()
    manifest = data["manifest"]
    return {
        "script_args": asdict(args),
        "training_args": {k: v for k, v in training_args.to_dict().items() if not k.endswith("_token")},
        "classifier": classifier.summary(),
        "class_names": data["class_names"],
        "prompt_template": prompt_template.to_dict(),
        "prompts": [prompt_template(name) for name in data["class_names"]],  # the classifier head's class prompts
        "manifest": None if manifest is None else {"k": manifest.k, "seed": manifest.seed, "source": manifest.source},
        "num_real": train_dataset.num_real,
        "num_synthetic": train_dataset.num_synthetic,
        "world_size": training_args.world_size,
        "real_per_batch": real_per_batch,
        "synthetic_per_batch": synthetic_per_batch,
        "library_versions": library_versions(),
    }


def run_report(training_args, trainer_state, results: dict) -> dict:
    """`report.json`: how the model was selected (on validation, never test) and each split's evaluation."""
    return {
        "selection": {
            "metric": training_args.metric_for_best_model,
            "split": "validation",
            "best_checkpoint": trainer_state.best_model_checkpoint,
            "best_metric": trainer_state.best_metric,
        },
        "evaluations": results,
        "train_mode": training_args.train_mode,
        "real_loss_weight": training_args.real_loss_weight,
        "library_versions": library_versions(),
    }


def write_outputs(output_dir: str | os.PathLike, args, training_args, record: dict, report: dict) -> None:
    """Writes the run record, `report.json`, `report.md` and the model card `README.md`, each atomically."""
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / TRAINING_CONFIG_NAME, record)
    write_json_atomic(output_dir / REPORT_NAME, report)
    write_text_atomic(output_dir / REPORT_MARKDOWN_NAME, report_markdown(report))
    write_text_atomic(
        output_dir / "README.md", render_classifier_card(args, training_args, record, report["evaluations"])
    )


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and not os.path.exists(source) and source.count("/") <= 1


def render_classifier_card(args, training_args, config: dict, results: dict) -> str:
    """The model card (`model_cards/classifier_card.md`) of a finished run, from its record and evaluations."""
    manifest = config["manifest"] or {}
    backbone = config["classifier"]
    targets = ",".join(backbone.get("lora_target_modules") or []) or args.lora_target_modules
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
        "backbone": f"{backbone['backbone']} ({backbone['model_class']})",
        "lora": f"r={args.lora_rank}, alpha={args.lora_alpha}, dropout={args.lora_dropout}, targets={targets}"
        if backbone["fine_tuning"] == "lora"
        else "none (every weight trained)",
        "seed": training_args.seed,
    }
    hub_datasets = [s for s in (args.real_dataset, args.synthetic_dataset) if _is_hub_id(s)]
    return render_card(
        CARD_TEMPLATE,
        base_model=args.model_name_or_path,
        backbone=backbone,
        license=args.license,
        hub_datasets=hub_datasets,
        class_names=config["class_names"],
        example_prompt=PromptTemplate(**config["prompt_template"])(config["class_names"][0]),
        real_dataset=args.real_dataset,
        real_split=args.real_split,
        k=manifest.get("k"),
        manifest_seed=manifest.get("seed"),
        manifest_fingerprint=(manifest.get("source") or {}).get("fingerprint"),
        num_real=config["num_real"],
        synthetic_dataset=args.synthetic_dataset,
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
