"""The stage-1 output folder (the stage-1 -> stage-2 contract, see `adapter_index`): the run record that refuses
another run's folder, each adapter's training log, the index and model card written once all adapters exist, the Hub
push.

`adapter_index.json`, `datadream_config.json`, `README.md`, and `pytorch_lora_weights.safetensors` (+ its
`training_log.json`, and `samples.png` with validation) at the top (dset), in one `class_folder_name(i, name)`
folder per class (cls) or in one `<class folder>/image_<row>` folder per K-shot image (image); `adapt.modes` says
which.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import hub
from ..adapter_index import ADAPTER_INDEX_NAME
from ..cards import render_card
from ..families import read_family
from ..files import write_json_atomic, write_text_atomic
from ..lora import LORA_WEIGHT_NAME
from ..run_folder import TRAINING_CONFIG_NAME, refuse_new_run, settings_diff
from ..versions import library_versions
from .data import total_steps
from .modes import get_mode
from .modes.cls import class_seed
from .modes.image import image_seed

if TYPE_CHECKING:
    from .config import GeneratorTrainingConfig
    from .data import FewShotData

CARD_TEMPLATE = "adapter_card.md"
SAMPLES_NAME = "samples.png"
TRAINING_LOG_NAME = "training_log.json"  # per adapter folder: its loss and lr at every step
CLS_GROUPING_KEY = "cls_grouping"  # of the run record: how cls mode grouped the classes, and why
# Config fields that do not change the trained weights: they may differ between a run and its resumption.
RUN_ONLY_FIELDS = frozenset(
    {
        "output_dir", "dataset", "few_shot_manifest", "checkpointing_steps", "checkpoints_total_limit",
        "resume_from_checkpoint", "report_to", "logging_dir", "validation_prompt", "num_validation_images",
        "validation_num_inference_steps", "license", "gradient_checkpointing", "ddp_timeout",
        # How cls classes are grouped changes the adapters by float rounding only: a run may resume with another
        # strategy or group size (`adapt.grouped.plan` continues every class from its own checkpoints).
        "cls_strategy", "classes_per_group", "memory_safety_margin",
    }
)  # fmt: skip
# Kept local when pushing: checkpoints (top-level ones are excluded by `hub.push_folder_to_hub`) and temp files.
PUSH_IGNORE_PATTERNS = ["*/checkpoint-*", "*/.*"]


def run_record(config: GeneratorTrainingConfig, data: FewShotData) -> dict:
    """`datadream_config.json`: base model, K-shot origin, prompts, LoRA and training settings, library versions."""
    template = config.prompt_template()
    family = read_family(config.pretrained_model_name_or_path, config.revision)
    record = {
        "stage": "datadream_lora",
        "generator_family": {"name": family.name, "pipeline_class": family.pipeline_class_name},
        "base_model": {
            "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
            "revision": config.revision,
            "variant": config.variant,
        },
        "mode": config.mode,
        "class_names": list(data.class_names),
        "few_shot": {
            "k": data.manifest.k,
            "seed": data.manifest.seed,
            "fingerprint": data.manifest.source.get("fingerprint"),
            "source": data.manifest.source,
            "indices": data.manifest.indices,
        },
        "prompt_template": template.to_dict(),
        "prompts": [template(name) for name in data.class_names],
        "lora": {
            "rank": config.rank,
            "alpha": config.lora_alpha or config.rank,
            "init": config.lora_init,
            **family.lora_record(config.train_text_encoder, family.denoiser_targets(config.unet_target_modules)),
        },
        "steps_per_adapter": total_steps(
            {"dset": len(data.images), "cls": data.manifest.k, "image": 1}[config.mode],
            config.train_batch_size,
            config.num_train_epochs,
            config.max_train_steps,
        ),
        "hparams": config.to_dict(),
        "library_versions": library_versions(),
    }
    if config.mode == "cls":
        record["class_seeds"] = {str(i): class_seed(config.seed, i) for i in range(len(data.class_names))}
    if config.mode == "image":  # by adapter key of the index: (seed, class, row) -> seed
        images = run_adapter_index("image", data.class_names, data.manifest.indices)["images"]
        record["image_seeds"] = {key: image_seed(config.seed, image["class"], image["row"])
                                 for key, image in images.items()}  # fmt: skip
    return record


def run_adapter_index(mode: str, class_names: list[str], indices: list[list[int]]) -> dict:
    """The `adapter_index.json` of a run (`adapt.modes`); `indices`: the manifest's rows per class."""
    return get_mode(mode).index(class_names, indices)


def _result_signature(record: dict) -> dict:
    """The parts of a run record that determine the adapters (a resumed run must match them)."""
    hparams = {k: v for k, v in record["hparams"].items() if k not in RUN_ONLY_FIELDS}
    few_shot = {k: record["few_shot"][k] for k in ("k", "seed", "fingerprint", "indices")}
    keys = ("base_model", "mode", "class_names", "prompts", "lora")
    return {"hparams": hparams, "few_shot": few_shot, **{k: record[k] for k in keys}}


def trained_artifacts(output_dir: Path) -> list[Path]:
    """What a stage-1 run that trained leaves: adapters, checkpoints, the index (its run record alone is not that)."""
    patterns = (ADAPTER_INDEX_NAME, LORA_WEIGHT_NAME, f"*/{LORA_WEIGHT_NAME}", "checkpoint-*", "*/checkpoint-*")
    return sorted(p for pattern in patterns for p in output_dir.glob(pattern)) if output_dir.is_dir() else []


def check_output_dir(output_dir: Path, record: dict, resume: bool) -> None:
    """Refuses an output dir that holds another run's adapters or checkpoints, or a resume whose settings differ from
    the run's. A run that never trained (its record alone: it stopped before its first checkpoint) is replaced."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} is a file; pass a folder.")
    trained = trained_artifacts(output_dir)
    if not resume:
        refuse_new_run(output_dir, trained, "a stage-1 run")
    previous = output_dir / TRAINING_CONFIG_NAME
    if resume and trained and previous.is_file():
        with open(previous) as f:
            old, new = _result_signature(json.load(f)), _result_signature(record)
        differing = {
            path: "(K-shot indices differ)" if path.rpartition(".")[2] == "indices" else values
            for path, values in settings_diff(old, new).items()
        }
        if differing:
            raise ValueError(
                f"Cannot resume into {str(output_dir)!r}: these settings differ from the run it holds "
                f"(before -> now): {differing}. Resume with the same settings, or choose an empty --output_dir."
            )


def write_run_record(output_dir: Path, record: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / TRAINING_CONFIG_NAME, record)


def read_cls_grouping(output_dir: Path) -> dict | None:
    """The `cls_grouping` of the run record in `output_dir` (None if there is none)."""
    path = Path(output_dir) / TRAINING_CONFIG_NAME
    return json.loads(path.read_text()).get(CLS_GROUPING_KEY) if path.is_file() else None


def record_cls_grouping(output_dir: Path, grouping: dict) -> None:
    """Sets the run record's `cls_grouping` (strategy, group size, why, process count, groups); main process only."""
    path = Path(output_dir) / TRAINING_CONFIG_NAME
    write_json_atomic(path, {**json.loads(path.read_text()), CLS_GROUPING_KEY: grouping})


def write_training_log(folder: Path, log_history: list[dict], trained_with: list[str] | None = None) -> None:
    """Writes an adapter's `training_log.json` (`{"log_history": [{"step", "loss", "lr"}, ...]}`), atomically;
    grouped cls training adds `"trained_with"`, the class folders of the group that made its last step."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    log = {"log_history": log_history}
    if trained_with is not None:
        log["trained_with"] = trained_with
    write_json_atomic(Path(folder) / TRAINING_LOG_NAME, log)


def training_log_trained_with(folder: Path) -> tuple[str, ...]:
    """The class folders the finished adapter in `folder` was last trained with (its own alone if not grouped)."""
    path = Path(folder) / TRAINING_LOG_NAME
    trained_with = json.loads(path.read_text()).get("trained_with") if path.is_file() else None
    return tuple(trained_with) if trained_with else (Path(folder).name,)


def missing_adapters(output_dir: Path, mode: str, class_names: list[str], indices: list[list[int]]) -> list[str]:
    """The folders of the run's adapters whose file is not written (yet)."""
    folders = run_adapter_index(mode, class_names, indices)["adapters"].values()
    return [folder for folder in folders if not (output_dir / folder / LORA_WEIGHT_NAME).is_file()]


def write_outputs(output_dir: Path, mode: str, class_names: list[str], indices: list[list[int]]) -> None:
    """Writes `adapter_index.json` and the model card; call once every adapter file exists."""
    write_json_atomic(output_dir / ADAPTER_INDEX_NAME, run_adapter_index(mode, class_names, indices))
    write_text_atomic(output_dir / "README.md", render_adapter_card(output_dir))


def render_adapter_card(output_dir: str | os.PathLike) -> str:
    """Renders `model_cards/adapter_card.md` from the run record in `output_dir` (never from arguments: no token)."""
    output_dir = Path(output_dir)
    with open(output_dir / TRAINING_CONFIG_NAME) as f:
        record = json.load(f)
    base = record["base_model"]["pretrained_model_name_or_path"]
    adapters = []
    rows = get_mode(record["mode"]).card_rows(record["class_names"], record["few_shot"]["indices"], record["prompts"])
    for name, folder, prompt in rows:
        sample = Path(folder) / SAMPLES_NAME
        adapters.append(
            {
                "name": name,
                "folder": folder,
                "prompt": prompt,
                "sample": sample.as_posix() if (output_dir / sample).is_file() else None,
            }
        )
    hparams = record["hparams"]
    shown = ("resolution", "center_crop", "train_batch_size", "num_train_epochs", "max_train_steps", "learning_rate",
             "lr_scheduler", "lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "mixed_precision",
             "seed")  # fmt: skip
    return render_card(
        CARD_TEMPLATE,
        # A local folder is not a valid `base_model` for the Hub's metadata: only Hub ids go in the YAML.
        base_model=None if Path(base).exists() else base,
        base_model_name=base,
        base_revision=record["base_model"]["revision"],
        license=hparams["license"],
        mode=record["mode"],
        class_names=record["class_names"],
        prompts=record["prompts"],
        prompt_template=record["prompt_template"],
        steps_per_adapter=record["steps_per_adapter"],
        few_shot=record["few_shot"],
        lora=record["lora"],
        # The denoiser's targets, under the family's name for it (`unet_target_modules`, `transformer_...`).
        denoiser_name="UNet" if "unet_target_modules" in record["lora"] else "transformer",
        denoiser_targets=record["lora"].get("unet_target_modules") or record["lora"]["transformer_target_modules"],
        hparams={k: hparams[k] for k in shown},
        adapters=adapters,
        versions=record["library_versions"],
    )


def push_adapters_to_hub(
    output_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False
) -> str:
    """Uploads a finished stage-1 folder (cls mode: one repo, a sub-folder per class); checkpoints stay local."""
    output_dir = Path(output_dir)
    for name in (ADAPTER_INDEX_NAME, TRAINING_CONFIG_NAME, "README.md"):
        if not (output_dir / name).is_file():
            raise FileNotFoundError(f"{str(output_dir)!r} has no {name}: finish training before pushing it.")
    return hub.push_folder_to_hub(
        output_dir,
        repo_id,
        repo_type="model",
        token=token,
        private=private,
        commit_message="Upload DataDream LoRA adapters",
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )
