"""What a new user meets in the first hour: one-line input errors, mistyped paths refused at once, guardrails (fp16 on
a CPU, a far resolution, a warm-up as long as the run), failed starts that leave nothing behind, another stage's folder
named as such, the stage-2 folder loadable with `datasets.load_dataset`, the Trainer on plain datasets, the adapter
card's CPU/offline snippet, and piped logs without progress-bar redraws or per-step dicts."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from datadream_hf.classify.data import RealSyntheticBatchSampler, TransformedRows, load_synthetic_training_set
from datadream_hf.data import DatasetInputError, load_labelled_dataset
from datadream_hf.errors import InputError, is_input_error, run_script
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.generate import run as stage2_run
from datadream_hf.lora import LORA_WEIGHT_NAME
from datadream_hf.run_folder import LOCK_NAME, TRAINING_CONFIG_NAME
from datadream_hf.sources import SourceNotFoundError, check_source, looks_local
from datadream_hf.synthetic import SHARD_FILES, load_synthetic_dataset
from datadream_hf.tiny_world.digits import DIGIT_NAMES

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "training_scripts"
CLASSES = ["zero", "one"]
STAGE2_FLAGS = ["--images_per_class", "4", "--num_inference_steps", "2", "--batch_size", "2", "--shard_size", "2"]


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import generate_synthetic
        import train_classifier
        import train_datadream_lora
    finally:
        sys.path.remove(str(SCRIPTS))
    return {"stage1": train_datadream_lora, "stage2": generate_synthetic, "stage3": train_classifier}


@pytest.fixture(scope="module")
def stage1_manifest(digits, tmp_path_factory):
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    path = tmp_path_factory.mktemp("first-hour-data") / "manifest.json"
    draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train").save(path)
    return str(path)


def stage1_argv(tiny_sd, digits_path, manifest, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", tiny_sd, "--dataset", digits_path, "--class_names", ",".join(CLASSES),
        "--few_shot_manifest", manifest, "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size",
        "2", "--max_train_steps", "2", "--lr_warmup_steps", "0", "--report_to", "none", *extra,
    ]  # fmt: skip


def stage3_argv(tiny_clip, digits_path, manifest, output_dir, *extra):
    return [
        "--model_name_or_path", tiny_clip, "--real_dataset", digits_path, "--few_shot_manifest", manifest,
        "--train_mode", "real", "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size",
        "4", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--validation_per_class", "1", "--augmentation", "none", "--warmup_steps", "0", "--report_to", "none", *extra,
    ]  # fmt: skip


def run(scripts, stage: str, argv: list) -> object:
    script = scripts[stage]
    return script.main(script.parse_args([str(a) for a in argv]))


def written_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != LOCK_NAME) if folder.exists() else []


@pytest.fixture(scope="module")
def stage1_output(scripts, tiny_sd_path, digits_path, stage1_manifest, tmp_path_factory):
    """A real cls run of stage 1 (2 classes x 2 steps)."""
    output_dir = tmp_path_factory.mktemp("first-hour-stage1") / "adapters"
    run(scripts, "stage1", stage1_argv(tiny_sd_path, digits_path, stage1_manifest, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def stage2_output(scripts, tiny_sd_path, stage1_output, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("first-hour-stage2") / "synthetic"
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1_output, "--output_dir",
            output_dir, *STAGE2_FLAGS]  # fmt: skip
    run(scripts, "stage2", argv)
    return output_dir


# --- 1. paths: local or Hub, decided before anything loads -------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch, stage1_output):
    """A working folder holding `models/tiny-sd` (a model folder) and `adapters` (a stage-1 output)."""
    (tmp_path / "models" / "tiny-sd" / "unet").mkdir(parents=True)
    (tmp_path / "models" / "tiny-sd" / "unet" / "config.json").write_text("{}")
    shutil.copytree(stage1_output, tmp_path / "adapters")
    monkeypatch.chdir(tmp_path)
    return tmp_path


SOURCES = {
    # value: "local" / "hub", or the error message's pattern
    "models/tiny-sd": "local",
    "models/tiny-sdd": r"'models/tiny-sdd' does not exist \('.*models' exists and holds: tiny-sd\).*not tried",
    "./tiny-sd": r"'./tiny-sd' does not exist",
    "/nowhere/at/all": r"'/nowhere/at/all' does not exist \('/' exists",
    "a/b/c": r"'a/b/c' does not exist",
    "~/surely-not-a-folder-42": r"does not exist",
    "not a repo id!": r"neither an existing local path nor a Hub repo id",
    "some-org/some-model": r"no local path and no cached Hub repo, and the Hub is offline \(HF_HUB_OFFLINE=1\)",
    "adapters": r"'adapters' holds no unet/config.json, so it is not a Stable Diffusion model: it is a stage-1",
}


@pytest.mark.parametrize("value", list(SOURCES))
def test_sources_are_local_or_hub_before_anything_loads(value, workdir):
    expected = SOURCES[value]
    check = {"argument": "--pretrained_model_name_or_path", "required": "unet/config.json",
             "expected": "a Stable Diffusion model"}  # fmt: skip
    if expected in ("local", "hub"):
        assert check_source(value, **check) == expected
    else:
        with pytest.raises(SourceNotFoundError, match=expected):
            check_source(value, **check)


def test_hub_ids_are_tried_online_or_from_the_offline_cache(workdir, monkeypatch):
    from huggingface_hub import constants

    assert not looks_local("stabilityai/stable-diffusion-2-1-base") and looks_local("models/anything")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workdir / "hub"))
    (workdir / "hub" / "models--cached-org--cached-model").mkdir(parents=True)
    assert check_source("cached-org/cached-model", "--model") == "hub"  # offline, but cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert check_source("some-org/some-model", "--model") == "hub"  # online: the Hub answers


def test_every_stage_refuses_a_mistyped_path_at_once(
    scripts, tiny_sd_path, tiny_clip_path, digits_path, stage1_manifest, digits_manifest_path, stage1_output, tmp_path
):
    missing = str(tmp_path / "typo" / "model")
    out = tmp_path / "out"
    stage1 = stage1_argv(tiny_sd_path, digits_path, stage1_manifest, out)
    stage2 = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1_output, "--output_dir", out,
              *STAGE2_FLAGS]  # fmt: skip
    stage3 = stage3_argv(tiny_clip_path, digits_path, digits_manifest_path, out)
    cases = [
        ("stage1", stage1, "--pretrained_model_name_or_path"),
        ("stage1", stage1, "--dataset"),
        ("stage2", stage2, "--pretrained_model_name_or_path"),
        ("stage2", stage2, "--adapter_path"),
        ("stage3", stage3, "--model_name_or_path"),
        ("stage3", stage3, "--real_dataset"),
        ("stage3", [*stage3, "--train_mode", "real+synthetic", "--synthetic_dataset", stage1_output],
         "--synthetic_dataset"),
    ]  # fmt: skip
    for stage, argv, flag in cases:
        argv = list(argv)
        argv[argv.index(flag) + 1] = missing
        with pytest.raises(SourceNotFoundError, match=re.escape(f"'{missing}' does not exist")):
            run(scripts, stage, argv)
        assert not written_files(out), (stage, flag)
    from datadream_hf.cli import main as cli

    with pytest.raises(SourceNotFoundError, match=re.escape(f"Dataset '{missing}' does not exist")):
        cli(["few-shot", "--dataset", missing, "--output", str(tmp_path / "m.json")])


# --- 2. one line per input error -----------------------------------------------------------------------------------


def test_input_errors_print_one_line_and_debug_shows_the_traceback(
    scripts, tiny_sd_path, digits_path, stage1_manifest, tmp_path, capsys, monkeypatch
):
    script = scripts["stage1"]
    argv = stage1_argv(str(tmp_path / "no-such-model"), digits_path, stage1_manifest, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_script(script.main, script.parse_args, argv=argv, script=script.__file__)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert re.match(r"train_datadream_lora\.py: error: --pretrained_model_name_or_path '.*no-such-model' does not "
                    r"exist .*\(--debug shows the traceback\)$", err[0])  # fmt: skip
    with pytest.raises(SourceNotFoundError):  # --debug: the exception and its traceback
        run_script(script.main, script.parse_args, argv=[*argv, "--debug"], script=script.__file__)
    monkeypatch.setenv("DATADREAM_DEBUG", "1")
    with pytest.raises(SourceNotFoundError):
        run_script(script.main, script.parse_args, argv=argv, script=script.__file__)


def test_setting_errors_of_any_config_are_one_line_and_bugs_keep_their_traceback(scripts, tmp_path, capsys):
    script = scripts["stage3"]
    # Raised inside transformers' TrainingArguments while parsing: still the user's input.
    argv = ["--output_dir", str(tmp_path), "--real_dataset", "d", "--eval_strategy", "steps", "--eval_steps", "5"]
    with pytest.raises(SystemExit):
        run_script(script.main, script.parse_args, argv=argv, script=script.__file__)
    assert "requires the save and eval strategy to match" in capsys.readouterr().err

    def broken(args):
        return [][1]

    with pytest.raises(IndexError):
        run_script(broken, lambda argv: argv, argv=[])
    assert is_input_error(InputError("x")) and not is_input_error(ValueError("raised outside the package"))
    try:
        np.zeros(2).reshape(3)
    except ValueError as error:  # a ValueError from a library, not from this package: a bug, not input
        assert not is_input_error(error)


def test_the_cli_command_prints_one_line(tmp_path):
    command = [sys.executable, "-c", "from datadream_hf.cli import console_main; console_main()", "few-shot",
               "--dataset", str(tmp_path / "typo"), "--output", str(tmp_path / "m.json")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"datadream-hf: error: Dataset '{tmp_path / 'typo'}' does not exist")


# --- 3. a run that stopped before training leaves nothing that refuses the corrected command ----------------------


def test_stage1_failed_start_leaves_no_run_record(scripts, tiny_sd_path, digits_path, stage1_manifest, tmp_path):
    out = tmp_path / "out"
    wrong = stage1_argv(str(tmp_path / "typo"), digits_path, stage1_manifest, out)
    with pytest.raises(SourceNotFoundError):
        run(scripts, "stage1", wrong)
    assert not (out / TRAINING_CONFIG_NAME).exists()
    run(scripts, "stage1", stage1_argv(tiny_sd_path, digits_path, stage1_manifest, out))  # the corrected command
    assert (out / "adapter_index.json").is_file()

    # A record alone (an older run that stopped before its first checkpoint) is replaced, fresh or resumed.
    for extra in ([], ["--resume_from_checkpoint", "latest"]):
        other = tmp_path / f"other{len(extra)}"
        other.mkdir()
        shutil.copy(out / TRAINING_CONFIG_NAME, other / TRAINING_CONFIG_NAME)
        run(scripts, "stage1", stage1_argv(tiny_sd_path, digits_path, stage1_manifest, other, "--learning_rate",
                                           "5e-4", *extra))  # fmt: skip
        assert json.loads((other / TRAINING_CONFIG_NAME).read_text())["hparams"]["learning_rate"] == 5e-4


def test_stage2_run_that_never_finished_a_shard_is_replaced(
    scripts, tiny_sd_path, stage1_output, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1_output, "--output_dir", out,
            *STAGE2_FLAGS]  # fmt: skip
    wrong = list(argv)
    wrong[1] = str(tmp_path / "typo")
    with pytest.raises(SourceNotFoundError):
        run(scripts, "stage2", wrong)
    assert not written_files(out)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("as if the first batch did not fit")

    with monkeypatch.context() as patch:
        patch.setattr(stage2_run.SyntheticImageSampler, "sample", out_of_memory)
        with pytest.raises(MemoryError):
            run(scripts, "stage2", [*argv, "--batch_size", "4"])
    assert (out / "generation_config.json").is_file()
    run(scripts, "stage2", argv)  # other settings (batch size), but the folder's run never finished a shard
    assert json.loads((out / "generation_manifest.json").read_text())["complete"]


def test_stage3_failed_start_leaves_nothing(scripts, tiny_clip_path, digits_path, digits_manifest_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceNotFoundError):
        run(scripts, "stage3", stage3_argv(str(tmp_path / "typo"), digits_path, digits_manifest_path, out))
    assert not written_files(out)
    run(scripts, "stage3", stage3_argv(tiny_clip_path, digits_path, digits_manifest_path, out))
    assert (out / "report.json").is_file()


# --- 4. guardrails ------------------------------------------------------------------------------------------------


def test_fp16_on_a_cpu_is_refused_by_every_script(
    scripts, tiny_sd_path, tiny_clip_path, digits_path, stage1_manifest, digits_manifest_path, stage1_output, tmp_path
):
    out = tmp_path / "out"
    cases = {
        "stage1": stage1_argv(tiny_sd_path, digits_path, stage1_manifest, out, "--mixed_precision", "fp16"),
        "stage2": ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1_output, "--output_dir",
                   out, "--dtype", "float16", *STAGE2_FLAGS],
        "stage3": stage3_argv(tiny_clip_path, digits_path, digits_manifest_path, out, "--fp16", "true"),
    }  # fmt: skip
    for stage, argv in cases.items():
        with pytest.raises(InputError, match="fp16 on a CPU .*(no|auto|bf16)"):
            run(scripts, stage, argv)
        assert not written_files(out), stage


def warnings_from(caplog, pattern: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and re.search(pattern, r.message)]


def test_unwise_settings_are_warned_about_once(
    scripts,
    tiny_sd_path,
    tiny_clip_path,
    digits_path,
    stage1_manifest,
    digits_manifest_path,
    stage1_output,
    tmp_path,
    caplog,
):
    caplog.set_level(logging.WARNING)
    # Stage 1, cls mode with 2 classes: the reference's 100 warm-up steps for a 1-step run, at 4x the native 32 px.
    argv = stage1_argv(tiny_sd_path, digits_path, stage1_manifest, tmp_path / "s1", "--resolution", "128",
                       "--max_train_steps", "1")  # fmt: skip
    argv[argv.index("--lr_warmup_steps") + 1] = "100"
    run(scripts, "stage1", argv)
    assert len(warnings_from(caplog, r"--lr_warmup_steps 100 is not shorter than the run \(1 steps\)")) == 1
    assert len(warnings_from(caplog, r"--resolution 128 is far from this model's native 32 px.*~16x")) == 1

    caplog.clear()
    run(scripts, "stage2", ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1_output,
                            "--output_dir", tmp_path / "s2", "--resolution", "128", *STAGE2_FLAGS])  # fmt: skip
    assert len(warnings_from(caplog, r"--resolution 128 is far from this model's native 32 px")) == 1

    caplog.clear()
    run(scripts, "stage3", stage3_argv(tiny_clip_path, digits_path, digits_manifest_path, tmp_path / "s3",
                                       "--warmup_steps", "10"))  # fmt: skip
    assert len(warnings_from(caplog, r"--warmup_steps 10 is not shorter than the run \(2 steps\)")) == 1


# --- 5. another stage's folder as the synthetic dataset -------------------------------------------------------------


def saved_images(path: Path, labels: list[int], names: list[str], seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))
    return str(path)


def test_wrong_synthetic_dataset_is_named(scripts, digits, digits_path, stage1_output, stage2_output, tmp_path):
    real = load_labelled_dataset(digits_path, split="train")
    stage3_folder = tmp_path / "classifier"
    stage3_folder.mkdir()
    (stage3_folder / "classifier_config.json").write_text("{}")
    copy = tmp_path / "copy-of-real"
    shutil.copytree(digits_path, copy)
    cases = {
        str(stage1_output): r"is a stage-1 adapter folder .*; pass the stage-2 output",
        str(stage3_folder): r"is a stage-3 classifier folder .*; pass the stage-2 output",
        digits_path: r"holds the real training images \(--real_dataset\).*--train_mode real",
        str(copy): r"holds the real training images",
    }
    for source, message in cases.items():
        with pytest.raises(DatasetInputError, match=message):
            load_synthetic_training_set(source, DIGIT_NAMES, real=real, real_source=digits_path)
    # Accepted: a stage-2 folder and a plain `save_to_disk` folder of other images (e.g. an oracle control).
    assert len(load_synthetic_training_set(str(stage2_output), CLASSES, real=real, real_source=digits_path)) == 8
    plain = saved_images(tmp_path / "plain", [0, 1] * 3, CLASSES)
    assert len(load_synthetic_training_set(plain, CLASSES, real=real, real_source=digits_path)) == 6


# --- 6. the stage-2 folder, as `datasets` reads it ----------------------------------------------------------------


def test_generation_folder_loads_with_plain_load_dataset(stage2_output, tmp_path):
    dataset = datasets.load_dataset(str(stage2_output), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(dataset.features["image"], ImageFeature)
    assert dataset.features["label"] == ClassLabel(names=CLASSES)
    ours = load_synthetic_dataset(stage2_output, cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == ours.num_rows == 8
    for column in ("label", "image_index", "seed", "prompt"):
        assert list(dataset[column]) == list(ours[column]), column
    for a, b in zip(dataset, ours):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    card = yaml.safe_load((stage2_output / "README.md").read_text().split("---")[1])
    assert card["configs"][0]["data_files"] == [{"split": "train", "path": SHARD_FILES}]
    # No second copy of the images: the data files are the shards themselves.
    assert not (stage2_output / "data").exists()


# --- 7. the Trainer on plain datasets -----------------------------------------------------------------------------


def test_trainer_reads_a_plain_dataset_real_rows_first():
    features = Features({"x": Value("int64"), "label": ClassLabel(names=CLASSES), "is_real": Value("bool")})
    plain = Dataset.from_dict({"x": list(range(6)), "label": [0, 1, 0, 1, 0, 1],
                               "is_real": [False, True, False, True, True, False]}, features=features)  # fmt: skip

    def preprocess(batch):
        batch["pixel_values"] = [torch.full((3, 2, 2), float(x)) for x in batch["x"]]
        return batch

    rows = TransformedRows(plain.with_transform(preprocess))
    assert (rows.num_real, rows.num_synthetic) == (3, 3)
    assert [int(rows[i]["pixel_values"][0, 0, 0]) for i in range(6)] == [1, 3, 4, 0, 2, 5]
    assert [rows[i]["is_real"] for i in range(6)] == [True] * 3 + [False] * 3
    sampler = RealSyntheticBatchSampler(rows.num_real, rows.num_synthetic, real_per_batch=1, synthetic_per_batch=2)
    for batch in sampler:
        assert [rows[key]["is_real"] for key in batch] == [True, False, False]
    with pytest.raises(DatasetInputError, match=r"need `pixel_values`.*with_transform"):
        TransformedRows(plain)[0]


# --- 8. the adapter card's CPU / offline snippet ------------------------------------------------------------------


def test_adapter_card_snippets_run_on_a_cpu(stage1_output, tmp_path):
    from datadream_hf.adapt.outputs import render_adapter_card

    card = render_adapter_card(stage1_output)
    gpu, cpu = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert 'torch_dtype=torch.float16).to("cuda")' in gpu and 'subfolder="0000_zero"' in gpu
    assert "float16" not in cpu and "cuda" not in cpu and 'subfolder="0000_zero"' in cpu
    namespace = {}
    exec(compile(cpu.replace("path/to/this/folder", str(stage1_output)), "adapter_card.md", "exec"), namespace)
    assert namespace["image"].size == (32, 32)
    # dset: one adapter, no subfolder.
    dset = tmp_path / "dset"
    shutil.copytree(stage1_output, dset)
    record = json.loads((dset / TRAINING_CONFIG_NAME).read_text())
    (dset / TRAINING_CONFIG_NAME).write_text(json.dumps({**record, "mode": "dset"}))
    shutil.copy(dset / "0000_zero" / LORA_WEIGHT_NAME, dset / LORA_WEIGHT_NAME)
    assert 'load_lora_weights("path/to/this/folder")\n' in render_adapter_card(dset)


# --- 9. a piped run's log: lines, not redraws ---------------------------------------------------------------------


def test_piped_logs_hold_lines_not_bars_or_step_dicts(
    tiny_sd_path, tiny_clip_path, digits_path, stage1_manifest, digits_manifest_path, tmp_path
):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    stage2 = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", tmp_path / "s1", "--output_dir",
              tmp_path / "s2", *STAGE2_FLAGS]  # fmt: skip
    stage3 = stage3_argv(tiny_clip_path, digits_path, digits_manifest_path, tmp_path / "s3", "--logging_steps", "1",
                         "--eval_strategy", "steps", "--eval_steps", "1")  # fmt: skip
    runs = {
        "train_datadream_lora.py": stage1_argv(tiny_sd_path, digits_path, stage1_manifest, tmp_path / "s1"),
        "generate_synthetic.py": stage2,
        "train_classifier.py": stage3,
    }
    for script, argv in runs.items():
        result = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, argv)], env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-3000:]
        assert "\r" not in log and "it/s]" not in log, script  # no progress-bar redraws
        assert "{'loss'" not in log and "Traceback" not in log, script  # no per-step dicts
        for harmless in ("is_gradient_checkpointing", "requires torchvision", "pin_memory", "vocabulary"):
            assert harmless not in log, (script, harmless)
        assert len(log) < 3000, (script, log)
    stage1_log = json.loads((tmp_path / "s1" / "0000_zero" / "training_log.json").read_text())["log_history"]
    assert len(stage1_log) == 2  # the per-step losses are kept, in the files


def test_no_library_warning_opens_a_command():
    """transformers logs two torchvision-fallback lines when diffusers' pipelines first name the image processors
    (torchvision cannot be imported beside the CPU torch); importing datadream_hf first drops exactly those lines."""
    code = "from diffusers import StableDiffusionPipeline; from transformers import CLIPProcessor; print('imported')"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "requires torchvision (not installed)" not in bare.stderr:
        pytest.skip("this transformers/torchvision pair logs no fallback line")
    ours = subprocess.run([sys.executable, "-c", "import datadream_hf; " + code], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert ours.returncode == 0 and ours.stdout == "imported\n"
    assert ours.stderr == "", ours.stderr
