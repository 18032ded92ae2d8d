"""What breaks only on GPUs (issue 24), reproduced on the CPU: a second device stood for by `meta` tensors, CUDA mocked
where only its presence matters, and 2 gloo processes with short timeouts where the launcher is what is tested."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datadream_hf.adapt.grouped.loop import _stack_optimizer_states
from datadream_hf.adapt.grouped.optim import GroupedAdamW
from datadream_hf.testing import accelerate_launch_command

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
CLASSIFIER_SCRIPT = SCRIPTS / "train_classifier.py"
HYPER = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def _per_class_states(init: torch.Tensor, steps: int) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """Each class's plain AdamW after `steps` steps, its state as a checkpoint holds it (on the CPU)."""
    states, params = [], []
    for group in range(init.shape[0]):
        param = torch.nn.Parameter(init[group].clone())
        adamw = torch.optim.AdamW([param], **HYPER)
        for step in range(steps):
            param.grad = torch.full_like(param, float(step + group + 1))
            adamw.step()
        states.append(adamw.state_dict())
        params.append(param)
    return states, params


def test_grouped_adamw_resumed_onto_another_device_steps_there():
    """A checkpoint loads on the CPU; resumed onto parameters on another device (`meta` stands for CUDA), every
    state tensor (the per-class step counts included) moves to the parameters' device and the next step runs there.
    On the CPU the resumed step equals each class's AdamW continued."""
    torch.manual_seed(0)
    init = torch.randn(2, 3, 4)
    states, params = _per_class_states(init, steps=3)

    on_meta = torch.nn.Parameter(torch.empty(2, 3, 4, device="meta"))
    optimizer = GroupedAdamW([on_meta], 2, **HYPER)
    optimizer.load_state_dict(_stack_optimizer_states(states))
    assert {key: value.device.type for key, value in optimizer.state[on_meta].items()} == dict.fromkeys(
        ("step", "exp_avg", "exp_avg_sq"), "meta"
    )
    on_meta.grad = torch.empty_like(on_meta)
    optimizer.step()  # mixed devices: "Expected all tensors to be on the same device" before the fix

    stack = torch.nn.Parameter(torch.stack([p.detach() for p in params]))
    optimizer = GroupedAdamW([stack], 2, **HYPER)
    optimizer.load_state_dict(_stack_optimizer_states(states))
    stack.grad = torch.ones_like(stack)
    optimizer.step()
    for group, (param, state) in enumerate(zip(params, states)):
        adamw = torch.optim.AdamW([param], **HYPER)
        adamw.load_state_dict(state)
        param.grad = torch.ones_like(param)
        adamw.step()
        torch.testing.assert_close(stack.detach()[group], param.detach())
    assert optimizer.state[stack]["step"].tolist() == [4.0, 4.0]


# ---- stage 3's mixed precision ----


@pytest.fixture
def mocked_cuda(monkeypatch):
    """A machine with one bf16-capable CUDA GPU, as far as `TrainingArguments` can tell (it sets the device up). The
    process-wide Accelerate state it makes is dropped after the test (and any from before, which would hold the CPU):
    the next `Accelerator(cpu=True)` starts afresh."""
    import transformers.training_args
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "flags, launcher, expected",
    [
        ({"bf16": True}, None, "bf16"),  # refused before: fp16 defaulted on beside it
        ({}, None, "fp16"),  # the reference's fp16 on a GPU
        ({}, "bf16", "bf16"),  # `accelerate launch --mixed_precision bf16`
        ({}, "no", "no"),
        ({"fp16": False}, "bf16", "no"),  # a flag given wins over the launcher's setting
        ({"fp16": True}, "no", "fp16"),
    ],
)
def test_stage3_precision_follows_the_flags_then_accelerate_then_fp16_on_a_gpu(
    mocked_cuda, monkeypatch, tmp_path, flags, launcher, expected
):
    from datadream_hf.classify.config import DataDreamTrainingArguments

    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    args = DataDreamTrainingArguments(output_dir=str(tmp_path), **flags)
    assert args.device.type == "cuda"
    assert (args.fp16, args.bf16, args.mixed_precision) == (expected == "fp16", expected == "bf16", expected)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_stage3_script_takes_bf16_on_a_gpu(mocked_cuda, tmp_path):
    flags = ["--real_dataset", "x", "--few_shot_manifest", "m.json", "--train_mode", "real", "--bf16", "true"]
    _, training_args = _load_script("train_classifier").parse_args([*flags, "--output_dir", str(tmp_path)])
    assert (training_args.fp16, training_args.bf16, training_args.mixed_precision) == (False, True, "bf16")


# ---- stage 3: a multi-process resume mid-epoch ----


def _launch(script: Path, args: list, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 CPU (gloo) processes, one thread each."""
    command = accelerate_launch_command(script, 2) + [str(a) for a in args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_process_stage3_killed_mid_epoch_resumes_to_the_uninterrupted_runs_batches(
    tiny_clip_path, digits_path, digits_manifest_path, tmp_path
):
    """40 real images, 8 per batch and process: 3 steps per epoch. Killed inside step 5 (epoch 1, checkpoint-4 kept),
    the 2-process run resumes one step into epoch 1; its steps 5 and 6 must draw epoch 1's batches, as the
    uninterrupted run does (they drew epoch 0's: the resumed epoch's loader holds the sampler two wrappers deep)."""
    args = lambda out: [  # noqa: E731
        "--model_name_or_path", tiny_clip_path, "--real_dataset", digits_path, "--few_shot_manifest",
        digits_manifest_path, "--train_mode", "real", "--output_dir", out, "--per_device_train_batch_size", "8",
        "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--test_split", "none", "--validation_per_class", "1",
        "--augmentation", "none", "--mix_augmentation", "none", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--disable_tqdm", "true", "--seed", "0",
    ]  # fmt: skip
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    result = _launch(CLASSIFIER_SCRIPT, args(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    # What a kill inside step 5 leaves (test_reliability kills for real): checkpoint-4, complete, and nothing after.
    shutil.copytree(reference / "checkpoint-4", resumed / "checkpoint-4")
    result = _launch(CLASSIFIER_SCRIPT, [*args(resumed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]

    def step_losses(folder: Path) -> list:
        history = json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
        return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]

    assert len(step_losses(reference)) == 6 and step_losses(resumed) == step_losses(reference)
    weights = Path("checkpoint-6") / "adapter_model.safetensors"
    expected, got = _tensors(reference / weights), _tensors(resumed / weights)
    assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)


# ---- stage 2: main-only work past the process-group timeout ----

TIMEOUT_S, SLOW_S = 8, 11  # the gloo timeout the run is given, and how long each main-only step takes here
# `generate_synthetic.py` with its main-only steps slowed past the timeout: the library's tail (the sample grid, the
# run manifest and the card) and the script's (the `save_to_disk` copy; a Hub upload stands in the same place).
SLOW_STAGE2 = f"""
import importlib.util, sys, time
import datadream_hf.generate.run as run

def slow(step):
    def slowed(*args, **kwargs):
        time.sleep({SLOW_S})
        return step(*args, **kwargs)
    return slowed

spec = importlib.util.spec_from_file_location("generate_synthetic", {str(SCRIPTS / "generate_synthetic.py")!r})
script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = script
spec.loader.exec_module(script)
run.write_sample_grid = slow(run.write_sample_grid)
script.save_synthetic_dataset = slow(script.save_synthetic_dataset)
from datadream_hf.errors import run_script
run_script(script.main, script.parse_args)
"""


def test_two_process_stage2_completes_when_main_only_work_outlasts_the_timeout(tiny_sd_path, tmp_path):
    """Each main-only step sleeps past the process-group timeout (`--ddp_timeout`, short here): no other process
    waits on it at a barrier (it used to, and was aborted at the timeout, as NCCL's 10 minutes abort a real run's
    upload of 15-20 GB), so the run completes, its dataset and copy whole."""
    from datasets import load_from_disk

    from datadream_hf.testing import write_fake_stage1_output

    adapters = write_fake_stage1_output(tmp_path / "stage1", tiny_sd_path, ["zero", "one"], mode="cls", seed=0)
    script = tmp_path / "slow_generate_synthetic.py"
    script.write_text(SLOW_STAGE2)
    out, copy = tmp_path / "synthetic", tmp_path / "copy"
    result = _launch(script, [
        "--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", adapters, "--output_dir", out,
        "--images_per_class", "2", "--num_inference_steps", "1", "--batch_size", "2", "--shard_size", "1",
        "--save_to_disk", copy, "--ddp_timeout", TIMEOUT_S,
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for process in (1, 2):  # the work was really split
        assert f"Process {process}/2: 2 shard(s), 2 images to generate." in result.stderr
    assert (out / "README.md").is_file() and (out / "sample_grid.png").is_file()
    assert len(load_from_disk(str(copy))) == 4


# ---- stage 1: grouped clipping reached ----


def test_grouped_clipping_past_the_threshold_clips_each_class_alone(tiny_sd_path, digits, tmp_path, monkeypatch):
    """max_grad_norm 0.005 under gradient norms of ~0.02: every class is clipped at every step, and grouped training
    still ends where each class trained (and clipped) alone ends. Clipping the group as one (a global norm) misses by
    ~2e-2 relative here, 20x the tolerance; at the default 1.0 no norm reaches the threshold and both would pass."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    import datadream_hf.adapt.grouped.loop as grouped_loop
    from datadream_hf.adapt.config import GeneratorTrainingConfig
    from datadream_hf.adapt.data import FewShotData
    from datadream_hf.adapt.modeling import load_generator_models
    from datadream_hf.adapt.train import train_generator
    from datadream_hf.data import load_labelled_dataset
    from datadream_hf.few_shot import draw_few_shot
    from datadream_hf.lora import LORA_WEIGHT_NAME

    classes, max_grad_norm = ["zero", "one", "two"], 0.005
    dataset = load_labelled_dataset(digits, split="train", class_names=classes)
    data = FewShotData.from_dataset(dataset, draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train"))
    norms, clip = [], grouped_loop.clip_grad_norm_per_group_

    def recorded(*args, **kwargs):  # each step's (G,) norms, before clipping
        norms.append(clip(*args, **kwargs))
        return norms[-1]

    monkeypatch.setattr(grouped_loop, "clip_grad_norm_per_group_", recorded)
    adapters = {}
    for strategy in ("sequential", "grouped"):
        config = GeneratorTrainingConfig(
            pretrained_model_name_or_path=tiny_sd_path, output_dir=str(tmp_path / strategy), mode="cls",
            cls_strategy=strategy, resolution=32, train_batch_size=2, max_train_steps=3, lr_warmup_steps=0,
            learning_rate=1e-4, max_grad_norm=max_grad_norm, report_to=None,
        )  # fmt: skip
        train_generator(config, data, Accelerator(cpu=True), models=load_generator_models(config))
        folders = sorted(p.parent for p in (tmp_path / strategy).glob(f"*/{LORA_WEIGHT_NAME}"))
        adapters[strategy] = [load_file(str(folder / LORA_WEIGHT_NAME)) for folder in folders]
    assert len(norms) == 3 and all(n.shape == (3,) and bool((n > 2 * max_grad_norm).all()) for n in norms)
    for alone, grouped in zip(adapters["sequential"], adapters["grouped"]):
        assert set(alone) == set(grouped) and len(alone) > 0
        ups = [key for key in alone if key.endswith("up.weight")]
        difference = torch.cat([(alone[k] - grouped[k]).flatten() for k in ups]).norm()
        assert difference / torch.cat([alone[k].flatten() for k in ups]).norm() < 1e-3
