"""Stage 3 of DataDream, whole: `train_classifier` loads the real K-shot, validation, test and synthetic rows, trains
the classifier (CLIP + LoRA as the paper, or another backbone: `backbones/`) with `MixedRealSyntheticTrainer` (the
best epoch chosen on validation, never on test), evaluates it (on a test set that holds no training or validation
image), and writes the weights, run record, report and card, holding the output folder's lock; then the optional Hub
upload."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from transformers import AutoConfig, AutoProcessor, set_seed

from .. import hub
from ..files import check_output_path
from ..run_folder import output_dir_lock
from ..sources import STAGE3_FOLDER, check_output_apart, check_source
from .augment import build_transforms
from .backbones import backbone_kind, load_classifier
from .checkpoints import check_fresh_output_dir
from .config import ClassifierArguments, DataDreamTrainingArguments, check_arguments
from .data import ImageClassificationDataset, load_classifier_data
from .metrics import classification_report
from .outputs import run_record, run_report, write_outputs
from .trainer import MixedRealSyntheticTrainer, accuracy_compute_metrics, use_quiet_console


def train_classifier(args: ClassifierArguments, training_args: DataDreamTrainingArguments) -> dict:
    """Runs stage 3 into `training_args.output_dir` and returns the report (`report.json`).

    `training_args.resume_from_checkpoint` = "latest" continues a killed run; a new run into a folder that holds
    another run's checkpoints or adapter is refused, as is a folder another run is using.
    """
    check_arguments(args, training_args)
    # The Hub upload is ours (after the report); keep the Trainer away from the Hub and the token out of everything
    # it writes.
    push_to_hub, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub, training_args.hub_token = False, None

    # 1. Data (every input check happens here, before the model loads), and an upload that would fail after training
    #    (offline, no token, no write access).
    if push_to_hub:
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
        hub.check_push_access(repo_id, hub_token, private=bool(training_args.hub_private_repo),
                              main_process=training_args.process_index == 0)  # fmt: skip
    check_source(
        args.model_name_or_path, "--model_name_or_path", required="config.json", expected="a transformers model"
    )
    check_output_path(training_args.output_dir, "--output_dir")  # a file in the way, no write permission
    inputs = {"--real_dataset": args.real_dataset, "--synthetic_dataset": args.synthetic_dataset,
              "--test_dataset": args.test_dataset, "--model_name_or_path": args.model_name_or_path}  # fmt: skip
    check_output_apart(training_args.output_dir, STAGE3_FOLDER, inputs)
    if args.classifier_type == "auto":  # a model stage 3 cannot classify with is refused before the data loads
        config = AutoConfig.from_pretrained(args.model_name_or_path, revision=args.revision)
        backbone_kind(config, args.model_name_or_path)
    check_fresh_output_dir(training_args.output_dir, training_args.resume_from_checkpoint)
    data = load_classifier_data(args, training_args)
    args.class_prompt_template().check_distinct(data["class_names"])  # the head must tell every class apart
    # The main process holds the output folder for the rest of the run: a second run into it is refused.
    with output_dir_lock(training_args.output_dir, training_args.distributed_state):
        return _train_and_report(args, training_args, data, push_to_hub, hub_token)


def _train_and_report(args, training_args, data: dict, push_to_hub: bool, hub_token: str | None) -> dict:
    """Phases 2-5 of `train_classifier`: model, training, final evaluation, outputs and the optional upload."""
    class_names = data["class_names"]

    # 2. Model and transforms; seeded first, since the LoRA init draws from the global RNG (the Trainer seeds later).
    set_seed(training_args.seed)
    prompt_template = args.class_prompt_template()
    targets = args.lora_target_modules.split(",") if args.lora_target_modules else None  # None: the backbone's
    lora_config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets
    )
    model = load_classifier(
        args.model_name_or_path, class_names, prompt_template, lora_config, args.revision, args.classifier_type,
        full_fine_tuning=not args.use_peft,
    )  # fmt: skip
    # The model's own processor: its image size and normalization (and, for a dual encoder, its tokenizer).
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, revision=args.revision)
    image_processor = getattr(processor, "image_processor", processor)
    train_transform, eval_transform = build_transforms(
        image_processor, training_args.augmentation, seed=training_args.seed + training_args.process_index
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
    use_quiet_console(trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 4. Final evaluation of the selected model, saying where every number comes from.
    evaluations = {"validation": (validation, data["validation_source"])}
    if data["test"] is not None:
        test = ImageClassificationDataset(data["test"], transform=eval_transform)
        evaluations["test"] = (test, data["test_source"])
    results = {}
    for split, (dataset, source) in evaluations.items():
        prediction = trainer.predict(dataset, metric_key_prefix=split)
        results[split] = classification_report(
            prediction.predictions.argmax(-1), prediction.label_ids, class_names, source
        )
    record = run_record(args, training_args, data, prompt_template, train_dataset, model)
    report = run_report(training_args, trainer.state, results)

    # 5. Outputs (main process): adapter, configs, report, card; then the optional upload, after the last collective
    #    (no process waits on it: `--ddp_timeout` bounds the waits at collectives).
    trainer.save_model(training_args.output_dir)
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        write_outputs(output_dir, args, training_args, record, report)
    trainer.accelerator.wait_for_everyone()
    if training_args.should_save and push_to_hub:
        repo_id = training_args.hub_model_id or output_dir.resolve().name
        hub.push_folder_to_hub(output_dir, repo_id, token=hub_token, private=bool(training_args.hub_private_repo))
    trainer.accelerator.end_training()
    return report
