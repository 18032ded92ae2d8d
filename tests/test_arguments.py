"""The scripts' settings: one style for all three (HfArgumentParser over the stage's dataclasses), the flag spellings
they have always taken, and a JSON or YAML config file that gives exactly what the same flags give."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from datadream_hf.generate.config import GenerationInputError

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
STAGE1 = ["--pretrained_model_name_or_path", "m", "--dataset", "d", "--few_shot_manifest", "f.json"]
STAGE2 = ["--pretrained_model_name_or_path", "m", "--adapter_path", "adapters"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stage1():
    return load_script("train_datadream_lora")


@pytest.fixture(scope="module")
def stage2():
    return load_script("generate_synthetic")


@pytest.fixture(scope="module")
def stage3():
    return load_script("train_classifier")


def as_config_file(path: Path, values: dict) -> str:
    path.write_text(json.dumps(values) if path.suffix == ".json" else yaml.safe_dump(values))
    return str(path)


def test_stage1_flag_spellings(stage1):
    config, hub = stage1.parse_args(
        STAGE1 + ["--class_names", "zero, one,two", "--no-train_text_encoder", "--no-cache_latents", "--report_to",
                  "none", "--mode", "dset", "--max_train_steps", "3", "--hub_token", "t", "--push_to_hub"]
    )  # fmt: skip
    assert config.class_names == ["zero", "one", "two"]
    assert (config.train_text_encoder, config.cache_latents, config.report_to) == (False, False, None)
    assert (config.mode, config.max_train_steps, hub.push_to_hub, hub.hub_token) == ("dset", 3, True, "t")
    assert config.mixed_precision is None  # the Accelerator decides (`accelerate launch --mixed_precision`)
    spaced, _ = stage1.parse_args(STAGE1 + ["--class_names", "zero", "one", "two", "--no_train_text_encoder"])
    assert spaced.class_names == config.class_names and not spaced.train_text_encoder
    defaults, _ = stage1.parse_args(STAGE1)
    assert (defaults.train_text_encoder, defaults.cache_latents, defaults.report_to) == (True, True, "tensorboard")
    with pytest.raises(SystemExit):
        stage1.parse_args(STAGE1[:2])  # --dataset and --few_shot_manifest are required flags
    with pytest.raises(SystemExit):
        stage1.parse_args(STAGE1 + ["--mode", "both"])  # not a choice


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_stage1_config_file_equals_flags(stage1, tmp_path, suffix):
    flags = STAGE1 + ["--class_names", "zero,one", "--resolution", "32", "--no-train_text_encoder", "--hub_token", "t"]
    values = {"pretrained_model_name_or_path": "m", "dataset": "d", "few_shot_manifest": "f.json",
              "class_names": "zero,one", "resolution": 32, "train_text_encoder": False, "hub_token": "t"}  # fmt: skip
    assert stage1.parse_args([as_config_file(tmp_path / f"stage1{suffix}", values)]) == stage1.parse_args(flags)
    values["class_names"] = ["zero", "one"]
    assert stage1.parse_args([as_config_file(tmp_path / f"list{suffix}", values)]) == stage1.parse_args(flags)
    with pytest.raises(ValueError, match="resolutoin"):
        stage1.parse_args([as_config_file(tmp_path / f"typo{suffix}", {**values, "resolutoin": 32})])


def test_stage2_flag_spellings(stage2):
    args, config = stage2.parse_args(STAGE2 + ["--mixed_precision", "fp16", "--class_names", "a,b"])
    assert (config.dtype, args.class_names) == ("float16", ["a", "b"])
    _, same = stage2.parse_args(STAGE2 + ["--mixed_precision", "fp16", "--dtype", "float16"])
    assert same == config and "mixed_precision" not in config.to_dict()
    with pytest.raises(GenerationInputError, match="contradicts"):
        stage2.parse_args(STAGE2 + ["--mixed_precision", "bf16", "--dtype", "float32"])
    with pytest.raises(GenerationInputError, match="choose one"):
        stage2.parse_args(STAGE2 + ["--no_adapter", "--class_names", "a,b"])
    with pytest.raises(GenerationInputError, match="set `no_adapter`"):
        stage2.parse_args(["--pretrained_model_name_or_path", "m"])
    with pytest.raises(GenerationInputError, match="hub_dataset_id"):
        stage2.parse_args(STAGE2 + ["--push_to_hub"])
    frozen, _ = stage2.parse_args(["--pretrained_model_name_or_path", "m", "--no_adapter", "--class_names", "a,b"])
    assert frozen.no_adapter and frozen.adapter_path is None


@pytest.mark.parametrize("suffix", [".json", ".yml"])
def test_stage2_config_file_equals_flags(stage2, tmp_path, suffix):
    flags = STAGE2 + ["--images_per_class", "4", "--mixed_precision", "no", "--output_dir", "out"]
    values = {"pretrained_model_name_or_path": "m", "adapter_path": "adapters", "images_per_class": 4,
              "mixed_precision": "no", "output_dir": "out"}  # fmt: skip
    assert stage2.parse_args([as_config_file(tmp_path / f"stage2{suffix}", values)]) == stage2.parse_args(flags)


def test_stage3_config_file_equals_flags_and_keeps_the_script_defaults(stage3, tmp_path):
    flags = ["--real_dataset", "d", "--train_mode", "real", "--few_shot_manifest", "f.json", "--output_dir",
             str(tmp_path / "out"), "--max_steps", "4", "--real_loss_weight", "0.7"]  # fmt: skip
    values = {"real_dataset": "d", "train_mode": "real", "few_shot_manifest": "f.json",
              "output_dir": str(tmp_path / "out"), "max_steps": 4, "real_loss_weight": 0.7}  # fmt: skip
    from_flags = stage3.parse_args(flags)
    from_file = stage3.parse_args([as_config_file(tmp_path / "stage3.yaml", values)])
    assert from_file[0] == from_flags[0] and from_file[1].to_dict() == from_flags[1].to_dict()
    assert from_file[1].eval_strategy == "epoch" and from_file[1].load_best_model_at_end  # the script's defaults
    with pytest.raises(ValueError, match="--synthetic_dataset"):
        stage3.parse_args([as_config_file(tmp_path / "bad.json", {**values, "train_mode": "real+synthetic"})])
