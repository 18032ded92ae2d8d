"""Stage 1 (train_datadream_lora): LoRA-only training, exact reload, cls == separate runs, resume, 2 processes, Hub."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from peft.utils import get_peft_model_state_dict

from datadream_hf.adapt.checkpoints import STATE_NAME, WEIGHTS_NAME, CheckpointError, list_checkpoints
from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import (
    FewShotData,
    build_units,
    make_step_batch,
    make_unit,
    resize_shorter_side,
    tokenize_prompts,
)
from datadream_hf.adapt.modeling import init_lora_weights_, load_generator_models
from datadream_hf.adapt.modes.cls import class_seed
from datadream_hf.adapt.outputs import TRAINING_LOG_NAME, push_adapters_to_hub
from datadream_hf.adapt.sequential import train_unit
from datadream_hf.adapt.train import train_generator
from datadream_hf.data import load_labelled_dataset
from datadream_hf.few_shot import FewShotManifest, draw_few_shot
from datadream_hf.lora import LORA_WEIGHT_NAME, load_safetensors, lora_parameters
from datadream_hf.testing import accelerate_launch_command

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_datadream_lora.py"
CLASSES = ["zero", "one", "two"]
SENTINEL_TOKEN = "hf_SENTINELtokenNEVERwrittenANYWHERE123"
# Tiny runs: 32 px, batch 2, 3 steps per adapter; a large lr so that a few steps visibly change the adapter. The
# sequential cls path, whose adapters are bit-identical to separate runs; grouped == sequential is in test_speed.py.
SMALL_RUN = {
    "resolution": 32,
    "train_batch_size": 2,
    "max_train_steps": 3,
    "lr_warmup_steps": 0,
    "learning_rate": 1e-3,
    "checkpointing_steps": 2,
    "mode": "cls",
    "cls_strategy": "sequential",
}


class Crash(RuntimeError):
    """Stands for a process killed mid-run."""


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def few_shot(digits, tmp_path_factory):
    """3 digit classes, K=2, as a FewShotData and as files (dataset folder + manifest) for the script."""
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    manifest = draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train")
    root = tmp_path_factory.mktemp("stage1-data")
    digits.save_to_disk(str(root / "digits"))
    manifest.save(root / "manifest.json")
    return FewShotData.from_dataset(dataset, manifest), str(root / "digits"), str(root / "manifest.json")


def make_config(tiny_sd_path, output_dir, **overrides):
    return GeneratorTrainingConfig(**{**SMALL_RUN, "pretrained_model_name_or_path": tiny_sd_path,
                                      "output_dir": str(output_dir), "report_to": None, **overrides})  # fmt: skip


def script_args(tiny_sd_path, data_path, manifest_path, output_dir, **overrides):
    flags = {
        **SMALL_RUN,
        "pretrained_model_name_or_path": tiny_sd_path,
        "dataset": data_path,
        "class_names": ",".join(CLASSES),
        "few_shot_manifest": manifest_path,
        "output_dir": str(output_dir),
        "report_to": "none",
        **overrides,
    }
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def read_adapter(path):
    return load_safetensors(Path(path) / LORA_WEIGHT_NAME)


def assert_same_adapters(first, second):
    a, b = read_adapter(first), read_adapter(second)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def training_log(folder):
    return json.loads((Path(folder) / TRAINING_LOG_NAME).read_text())["log_history"]


def subprocess_env():
    # Same thread count as this process, so CPU kernels reduce in the same order and results stay bit-exact.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cls_run(tiny_sd_path, few_shot, accelerator, tmp_path_factory):
    """An uninterrupted cls run (3 classes x 3 steps, checkpoint at step 2), base model loaded once."""
    data = few_shot[0]
    output_dir = tmp_path_factory.mktemp("cls-run")
    config = make_config(tiny_sd_path, output_dir)
    models = load_generator_models(config)
    train_generator(config, data, accelerator, models=models)
    return config, models, output_dir


@pytest.fixture(scope="module")
def dset_run(tiny_sd_path, few_shot, accelerator, tmp_path_factory):
    """An uninterrupted dset run over the 6 images (4 steps, a checkpoint every step, at most 2 kept)."""
    output_dir = tmp_path_factory.mktemp("dset-run")
    config = make_config(
        tiny_sd_path, output_dir, mode="dset", max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2
    )
    models = load_generator_models(config)

    def snapshot():  # later tests reuse `models`, so keep copies
        weights = {f"unet.{n}": p.detach().clone() for n, p in models.unet.named_parameters()}
        weights.update({f"text_encoder.{n}": p.detach().clone() for n, p in models.text_encoder.named_parameters()})
        return weights

    init_lora_weights_(models, config.lora_init, config.seed)  # the init train_unit starts from
    before = snapshot()
    train_generator(config, few_shot[0], accelerator, models=models)
    trained_lora = {}
    for part in ("unet", "text_encoder"):
        state = get_peft_model_state_dict(getattr(models, part), adapter_name="default")
        trained_lora[part] = {k: v.clone() for k, v in state.items()}
    return config, models, output_dir, {"before": before, "after": snapshot(), "lora": trained_lora}


# --- configuration ------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    config = GeneratorTrainingConfig(pretrained_model_name_or_path="some/model")
    assert (config.rank, config.lora_alpha or config.rank, config.lora_init) == (16, 16, "gaussian")
    assert (config.learning_rate, config.adam_weight_decay, config.lr_scheduler) == (1e-4, 1e-2, "cosine")
    assert (config.train_batch_size, config.num_train_epochs, config.lr_warmup_steps) == (8, 200, 100)
    assert (config.max_grad_norm, config.resolution, config.train_text_encoder) == (1.0, 512, True)
    assert config.prompt_template()("DHC-3-800") == "a photo of a DHC-3-800"


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"rank": 0}, "rank"),
        ({"resolution": 30}, "resolution"),
        ({"mode": "per_class"}, "mode"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler"),
        ({"max_train_steps": 0}, "max_train_steps"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"mode": "cls", "resume_from_checkpoint": "out/checkpoint-2"}, "resume_from_checkpoint"),
        ({"dataset_preset": "aircrafts"}, "aircrafts"),
        ({"domain": "aircraft"}, "domain"),
        ({"pretrained_model_name_or_path": ""}, "pretrained_model_name_or_path"),
    ],
)
def test_bad_config_names_the_field(overrides, culprit):
    values = {"pretrained_model_name_or_path": "some/model", **overrides}
    with pytest.raises(ValueError, match=culprit):
        GeneratorTrainingConfig(**values)


# --- data and randomness ------------------------------------------------------------------------------------------


def test_step_batch_is_seeded_and_crops_like_the_reference():
    from PIL import Image

    wide = Image.new("RGB", (90, 40), (255, 0, 0))
    assert resize_shorter_side(wide, 32).size == (72, 32)  # torchvision Resize(32): int(32 * 90 / 40)
    prompt_ids = torch.arange(6).reshape(2, 3)
    unit = make_unit("x", ".", 7, [wide, wide.rotate(90, expand=True), wide], [0, 1, 0], prompt_ids, 32)
    draw = lambda step: make_step_batch(unit, step, 2, 32, (4, 16, 16), 1000)  # noqa: E731
    first, again, other = draw(0), draw(0), draw(1)
    assert first.pixel_values.shape == (2, 3, 32, 32) and first.noise.shape == (2, 4, 16, 16)
    assert first.pixel_values.min() >= -1 and first.pixel_values.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(first.as_tuple(), again.as_tuple()))
    assert not torch.equal(first.noise, other.noise)
    # Steps 0 and 1 form epoch 0 (3 images, batch 2): every image once, the last batch smaller.
    assert len(draw(0)) + len(draw(1)) == 3 and len(draw(2)) == 2


def test_lora_weights_stay_fp32_under_bf16(tiny_sd_path, tmp_path):
    config = make_config(tiny_sd_path, tmp_path, mixed_precision="bf16")
    models = load_generator_models(config)
    trainable = models.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert models.unet.conv_in.weight.dtype == torch.bfloat16
    assert models.text_encoder.get_input_embeddings().weight.dtype == torch.bfloat16


# --- dset mode: parameters, reload, outputs -----------------------------------------------------------------------


def test_only_lora_parameters_train_and_they_change(dset_run):
    config, models, _, weights = dset_run
    trainable = models.trainable_parameters()
    expected = {f"unet.{n}" for n in lora_parameters(models.unet)} | {
        f"text_encoder.{n}" for n in lora_parameters(models.text_encoder)
    }
    assert set(trainable) == expected
    assert any(n.startswith("unet.") for n in trainable) and any(n.startswith("text_encoder.") for n in trainable)
    before, after = weights["before"], weights["after"]
    assert set(before) == set(after) and set(trainable) < set(before)
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(value, after[name]), f"LoRA weight {name} did not change"
        else:
            assert torch.equal(value, after[name]), f"frozen weight {name} changed"


def test_adapter_reloads_bit_exactly_and_changes_the_output(dset_run, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    _, _, output_dir, weights = dset_run
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)

    def sample():
        return pipeline("a photo of a one", num_inference_steps=3, generator=torch.manual_seed(0), output_type="np")

    base = sample().images
    pipeline.load_lora_weights(str(output_dir))
    loaded = pipeline.get_active_adapters()[0]
    for part in ("unet", "text_encoder"):
        expected = weights["lora"][part]
        actual = get_peft_model_state_dict(getattr(pipeline, part), adapter_name=loaded)
        assert set(expected) == set(actual) and len(expected) > 0
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key
    assert not (sample().images == base).all()


def test_dset_outputs_follow_the_contract(dset_run, few_shot):
    config, _, output_dir, _ = dset_run
    index = json.loads((output_dir / "adapter_index.json").read_text())
    assert index == {"mode": "dset", "class_names": CLASSES, "adapters": {"all": "."}}
    record = json.loads((output_dir / "datadream_config.json").read_text())
    assert record["base_model"]["pretrained_model_name_or_path"] == config.pretrained_model_name_or_path
    assert record["few_shot"]["fingerprint"] == few_shot[0].manifest.source["fingerprint"]
    assert record["few_shot"]["indices"] == few_shot[0].manifest.indices
    assert record["prompts"] == [f"a photo of a {name}" for name in CLASSES]
    assert record["hparams"]["rank"] == 16 and record["steps_per_adapter"] == 4
    assert {"torch", "diffusers", "peft"} <= set(record["library_versions"])
    card = ModelCard((output_dir / "README.md").read_text())
    assert {"datadream", "lora", "diffusers-training", "text-to-image"} <= set(card.data.tags)
    assert card.data.license == "openrail++"
    assert card.data.base_model is None  # a local folder is not a Hub id
    # Checkpoints: only the 2 newest kept, holding LoRA weights + optimizer/scheduler state, nothing else.
    checkpoints = list_checkpoints(output_dir)
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-3"]
    weights = load_safetensors(checkpoints[-1] / WEIGHTS_NAME)
    assert weights and all("lora_" in name for name in weights)
    state = json.loads((checkpoints[-1] / STATE_NAME).read_text())
    assert state["step"] == 3 and state["lr_scheduler"]["last_epoch"] == 3
    assert sorted(p.name for p in checkpoints[-1].iterdir()) == sorted(
        [WEIGHTS_NAME, "optimizer.safetensors", STATE_NAME]
    )


def test_card_names_a_hub_base_model(dset_run, tmp_path):
    from datadream_hf.adapt.outputs import render_adapter_card

    _, _, output_dir, _ = dset_run
    record = json.loads((output_dir / "datadream_config.json").read_text())
    record["base_model"]["pretrained_model_name_or_path"] = "stabilityai/stable-diffusion-2-1-base"
    (tmp_path / "datadream_config.json").write_text(json.dumps(record))
    card = ModelCard(render_adapter_card(tmp_path))
    assert card.data.base_model == "stabilityai/stable-diffusion-2-1-base"


# --- cls mode -----------------------------------------------------------------------------------------------------


def test_cls_adapters_differ_and_equal_separate_runs(cls_run, few_shot, accelerator, tmp_path):
    config, models, output_dir = cls_run
    data = few_shot[0]
    index = json.loads((output_dir / "adapter_index.json").read_text())
    folders = [output_dir / index["adapters"][str(i)] for i in range(len(CLASSES))]
    adapters = [read_adapter(folder) for folder in folders]
    key = next(k for k in adapters[0] if k.startswith("unet.") and k.endswith("up.weight"))
    assert not torch.equal(adapters[0][key], adapters[1][key]) and not torch.equal(adapters[1][key], adapters[2][key])

    # Class i's adapter == a dset run on class i's images alone, seeded with class_seed(seed, i).
    for i in (1, 2):
        rows = [r for r, label in enumerate(data.labels) if label == i]
        alone = FewShotData(
            images=[data.images[r] for r in rows],
            labels=[0] * len(rows),
            class_names=[CLASSES[i]],
            manifest=FewShotManifest(k=2, seed=0, class_names=[CLASSES[i]], indices=[[0, 1]]),
        )
        single = make_config(config.pretrained_model_name_or_path, tmp_path / f"alone-{i}", mode="dset",
                             seed=class_seed(config.seed, i))  # fmt: skip
        train_generator(single, alone, accelerator, models=models)
        assert_same_adapters(folders[i], tmp_path / f"alone-{i}")


def test_cls_loads_the_base_model_once(tiny_sd_path, few_shot, accelerator, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    loads, real = [], UNet2DConditionModel.from_pretrained
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: loads.append(1) or real(*a, **k))
    config = make_config(tiny_sd_path, tmp_path, max_train_steps=1)
    train_generator(config, few_shot[0], accelerator)
    assert len(loads) == 1
    assert all((tmp_path / folder / LORA_WEIGHT_NAME).is_file() for folder in ("0000_zero", "0001_one", "0002_two"))


def test_missing_or_mismatched_data_is_named_before_training(few_shot, tiny_sd_path, tmp_path):
    from datadream_hf.adapt.data import load_few_shot_data
    from datadream_hf.data import DatasetInputError

    _, data_path, manifest_path = few_shot
    with pytest.raises(DatasetInputError, match="few_shot_manifest"):
        load_few_shot_data(make_config(tiny_sd_path, tmp_path, dataset=data_path))
    with pytest.raises(DatasetInputError, match="missing.json"):
        load_few_shot_data(make_config(tiny_sd_path, tmp_path, dataset=data_path, few_shot_manifest="missing.json"))
    # The manifest was drawn over 3 of the 10 classes: it alone says which, in which order (no --class_names).
    data = load_few_shot_data(make_config(tiny_sd_path, tmp_path, dataset=data_path, few_shot_manifest=manifest_path))
    assert data.class_names == CLASSES
    # Only a real mismatch is refused.
    mismatch = {"dataset": data_path, "few_shot_manifest": manifest_path, "class_names": ["one"]}
    with pytest.raises(DatasetInputError, match=r"manifest's classes .* differ from the dataset's classes"):
        load_few_shot_data(make_config(tiny_sd_path, tmp_path, **mismatch))


# --- resume -------------------------------------------------------------------------------------------------------


def crash_at(unit_name, step, seen):
    def callback(unit, done):
        seen.append((unit.name, done))
        if (unit.name, done) == (unit_name, step):
            raise Crash(f"killed after step {done} of {unit.name}")

    return callback


def test_dset_resume_equals_uninterrupted(dset_run, few_shot, accelerator, tmp_path):
    config, models, reference, _ = dset_run
    interrupted = GeneratorTrainingConfig(**{**config.to_dict(), "output_dir": str(tmp_path)})
    with pytest.raises(Crash):
        train_generator(interrupted, few_shot[0], accelerator, models=models, step_callback=crash_at("all", 3, []))
    assert not (tmp_path / LORA_WEIGHT_NAME).exists() and not (tmp_path / "adapter_index.json").exists()
    seen = []
    resumed = GeneratorTrainingConfig(**{**interrupted.to_dict(), "resume_from_checkpoint": "latest"})
    train_generator(resumed, few_shot[0], accelerator, models=models, step_callback=crash_at(None, 0, seen))
    assert seen == [("all", 4)]  # continued after checkpoint-3, the last one written before the crash
    assert_same_adapters(reference, tmp_path)


def test_cls_resume_skips_finished_classes_and_equals_uninterrupted(cls_run, few_shot, accelerator, tmp_path):
    config, models, reference = cls_run
    interrupted = GeneratorTrainingConfig(**{**config.to_dict(), "output_dir": str(tmp_path)})
    with pytest.raises(Crash):
        train_generator(interrupted, few_shot[0], accelerator, models=models, step_callback=crash_at("one", 3, []))
    finished = tmp_path / "0000_zero" / LORA_WEIGHT_NAME
    stamp = finished.stat().st_mtime_ns
    seen = []
    resumed = GeneratorTrainingConfig(**{**interrupted.to_dict(), "resume_from_checkpoint": "latest"})
    train_generator(resumed, few_shot[0], accelerator, models=models, step_callback=crash_at(None, 0, seen))
    # zero: finished, skipped; one: from its checkpoint-2; two: from the start.
    assert seen == [("one", 3), ("two", 1), ("two", 2), ("two", 3)]
    assert finished.stat().st_mtime_ns == stamp
    for folder in ("0000_zero", "0001_one", "0002_two"):
        assert_same_adapters(reference / folder, tmp_path / folder)
        # The training log survives the crash through the checkpoint: the same steps, losses and lrs.
        assert training_log(tmp_path / folder) == training_log(reference / folder)
        assert [entry["step"] for entry in training_log(reference / folder)] == [1, 2, 3]


def test_output_dir_of_another_run_is_refused(dset_run, few_shot, accelerator):
    config, models, output_dir, _ = dset_run
    with pytest.raises(ValueError, match="resume_from_checkpoint latest"):
        train_generator(config, few_shot[0], accelerator, models=models)
    changed = GeneratorTrainingConfig(
        **{**config.to_dict(), "learning_rate": 5e-4, "resume_from_checkpoint": "latest"}
    )
    with pytest.raises(ValueError, match="learning_rate"):
        train_generator(changed, few_shot[0], accelerator, models=models)


def test_checkpoint_of_other_training_is_refused(dset_run, few_shot, accelerator, tmp_path):
    config, models, output_dir, _ = dset_run
    other = make_config(config.pretrained_model_name_or_path, tmp_path, mode="dset", max_train_steps=7,
                        resume_from_checkpoint=str(list_checkpoints(output_dir)[-1]))  # fmt: skip
    unit = build_units(other, few_shot[0], models.tokenizer)[0]
    with pytest.raises(CheckpointError, match="num_steps"):
        train_unit(models, unit, other, accelerator)


def test_sigkill_after_checkpoint_then_resume(dset_run, few_shot, tiny_sd_path, tmp_path):
    """A real SIGKILL in the 3rd step (after checkpoint-2 is on disk), then `--resume_from_checkpoint latest`."""
    config, _, reference, _ = dset_run
    _, data_path, manifest_path = few_shot
    output_dir = tmp_path / "run"
    args = script_args(tiny_sd_path, data_path, manifest_path, output_dir, mode="dset", max_train_steps=4,
                       checkpointing_steps=1, checkpoints_total_limit=2)  # fmt: skip
    killer = tmp_path / "kill_in_step_3.py"
    killer.write_text(
        "import os, runpy, signal, sys\n"
        "from datadream_hf.adapt import sequential as g\n"
        "real, calls = g.training_step, []\n"
        "def step(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "g.training_step = step\n"
        f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    killed = subprocess.run([sys.executable, str(killer), *args], env=subprocess_env(), capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert [c.name for c in list_checkpoints(output_dir)] == ["checkpoint-1", "checkpoint-2"]
    assert not (output_dir / LORA_WEIGHT_NAME).exists()
    resumed = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--resume_from_checkpoint", "latest"],
        env=subprocess_env(), capture_output=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert_same_adapters(reference, output_dir)


# --- several processes --------------------------------------------------------------------------------------------


def test_two_processes_split_classes_and_match_one_process(cls_run, few_shot, tiny_sd_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, reference = cls_run
    _, data_path, manifest_path = few_shot
    args = script_args(tiny_sd_path, data_path, manifest_path, tmp_path, report_to="tensorboard",
                       num_validation_images=1, validation_num_inference_steps=1)  # fmt: skip
    result = subprocess.run(accelerate_launch_command(SCRIPT, 2) + args, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 0 of 2 trains adapter(s) ['zero', 'two']" in result.stderr
    assert "Process 1 of 2 trains adapter(s) ['one']" in result.stderr
    for folder in ("0000_zero", "0001_one", "0002_two"):
        assert_same_adapters(reference / folder, tmp_path / folder)
        assert training_log(tmp_path / folder) == training_log(reference / folder)
    # The trackers live on process 0; the curves of the class process 1 trained reach them too.
    accumulator = EventAccumulator(str(tmp_path / "logs" / "datadream-lora"))  # --logging_dir / the project name
    accumulator.Reload()
    for folder in ("0000_zero", "0001_one"):
        logged = [(e.step, e.value) for e in accumulator.Scalars(f"{folder}/loss")]
        expected = [(entry["step"], entry["loss"]) for entry in training_log(reference / folder)]
        assert [step for step, _ in logged] == [1, 2, 3]
        assert all(abs(value - loss) <= 1e-6 * abs(loss) for (_, value), (_, loss) in zip(logged, expected))
        assert accumulator.Images(f"{folder}/validation")  # the validation sample, from either process
    assert json.loads((tmp_path / "adapter_index.json").read_text()) == json.loads(
        (reference / "adapter_index.json").read_text()
    )


def test_two_processes_split_dset_batches_and_match_one_process(dset_run, few_shot, tiny_sd_path, tmp_path):
    _, _, reference, _ = dset_run
    _, data_path, manifest_path = few_shot
    args = script_args(tiny_sd_path, data_path, manifest_path, tmp_path, mode="dset", max_train_steps=4,
                       checkpointing_steps=1, checkpoints_total_limit=2)  # fmt: skip
    result = subprocess.run(accelerate_launch_command(SCRIPT, 2) + args, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Each process computes half of every batch and gradients are summed: equal up to float summation order, which
    # Adam amplifies where a gradient is ~0. So compare the LoRA B ("up") weights, which start at 0 and hold all the
    # training, relative to their size.
    expected, actual = read_adapter(reference), read_adapter(tmp_path)
    assert set(expected) == set(actual)
    ups = [k for k in expected if k.endswith("up.weight")]
    difference = torch.cat([(actual[k] - expected[k]).flatten() for k in ups]).norm()
    assert difference < 1e-3 * torch.cat([expected[k].flatten() for k in ups]).norm()


# --- the script and the Hub ---------------------------------------------------------------------------------------


def uploaded_files(folder, ignore_patterns):
    """What `HfApi.upload_folder` would send: the folder's files minus the ignore patterns (as hub.py passes them)."""
    files = [p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()]
    patterns = ["checkpoint-*", "checkpoint-*/**", "*.tmp", ".*", "*.lock"] + list(ignore_patterns or [])
    return set(filter_repo_objects(files, ignore_patterns=patterns))


@pytest.mark.usefixtures("reachable_hub")  # the upload is checked before the run
def test_script_pushes_card_and_weights_without_the_token(few_shot, tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import train_datadream_lora

    from datadream_hf import hub

    pushed = {}

    def fake_push(folder, repo_id, token=None, ignore_patterns=None, **kwargs):
        pushed.update(repo_id=repo_id, token=token, files=uploaded_files(folder, ignore_patterns))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(hub, "push_folder_to_hub", fake_push)
    _, data_path, manifest_path = few_shot
    output_dir = tmp_path / "out"
    args = script_args(
        tiny_sd_path, data_path, manifest_path, output_dir, mode="cls", max_train_steps=2, checkpointing_steps=1,
        report_to="tensorboard", num_validation_images=2, validation_num_inference_steps=2, push_to_hub=True,
        hub_model_id="someone/datadream-digits", hub_token=SENTINEL_TOKEN,
    )  # fmt: skip
    train_datadream_lora.main(train_datadream_lora.parse_args(args))

    assert pushed["repo_id"] == "someone/datadream-digits" and pushed["token"] == SENTINEL_TOKEN
    for folder in ("0000_zero", "0001_one", "0002_two"):
        assert f"{folder}/{LORA_WEIGHT_NAME}" in pushed["files"] and f"{folder}/samples.png" in pushed["files"]
        assert (output_dir / folder / "checkpoint-1").is_dir()  # kept locally ...
    assert not any("checkpoint-" in f for f in pushed["files"])  # ... but not uploaded
    assert {"README.md", "adapter_index.json", "datadream_config.json"} <= pushed["files"]
    assert "![zero](0000_zero/samples.png)" in (output_dir / "README.md").read_text()
    assert list((output_dir / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SENTINEL_TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def test_push_refuses_an_unfinished_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_index.json"):
        push_adapters_to_hub(tmp_path, "someone/repo")


def test_prompts_are_tokenized_per_image(cls_run, few_shot):
    config, models, _ = cls_run
    units = build_units(config, few_shot[0], models.tokenizer, process_index=1, num_processes=2)
    assert [u.name for u in units] == ["one"] and units[0].seed == class_seed(config.seed, 1)
    expected = tokenize_prompts(models.tokenizer, ["a photo of a one"])[0]
    assert all(torch.equal(ids, expected) for ids in units[0].prompt_ids)
