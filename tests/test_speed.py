"""Speed paths give the same results: grouped cls training == sequential, cached latents == VAE every step, prompts
encoded once == per sample, direct adapter fusion == diffusers' fuse; grouped resume == uninterrupted; auto sizes its
groups from memory, halves one that runs out of it, and resumes across strategies; benchmarks run.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from datadream_hf.adapt.checkpoints import STATE_NAME, WEIGHTS_NAME, list_checkpoints
from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import FewShotData, build_units, make_step_batch, make_unit
from datadream_hf.adapt.grouped.loop import train_groups
from datadream_hf.adapt.grouped.lora import GroupedLoraLinear, contiguous_block_size
from datadream_hf.adapt.grouped.plan import group_units, resume_plan
from datadream_hf.adapt.grouped.sizing import (
    MemoryReading,
    PeakResidentBytes,
    choose_group_size,
    fitting_group_size,
    probe_group_memory,
)
from datadream_hf.adapt.latent_cache import LatentCache, encode_posterior
from datadream_hf.adapt.modeling import diffusion_loss, encode_prompts, load_generator_models
from datadream_hf.adapt.outputs import TRAINING_LOG_NAME, write_training_log
from datadream_hf.adapt.train import train_generator
from datadream_hf.data import load_labelled_dataset
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.lora import LORA_WEIGHT_NAME, load_safetensors
from datadream_hf.testing import accelerate_launch_command

CLASSES = ["zero", "one", "two"]
FOLDERS = ["0000_zero", "0001_one", "0002_two"]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# As test_stage1: 32 px, batch 2, 3 steps per class, a large lr so that 3 steps visibly train each adapter.
SMALL_RUN = {"resolution": 32, "train_batch_size": 2, "max_train_steps": 3, "lr_warmup_steps": 0,
             "learning_rate": 1e-3, "checkpointing_steps": 2, "mode": "cls", "report_to": None,
             "cls_strategy": "grouped"}  # fmt: skip


class Crash(RuntimeError):
    """Stands for a process killed mid-run."""


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def data(digits):
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    return FewShotData.from_dataset(dataset, draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train"))


def make_config(tiny_sd_path, output_dir, **overrides):
    return GeneratorTrainingConfig(**{**SMALL_RUN, "pretrained_model_name_or_path": tiny_sd_path,
                                      "output_dir": str(output_dir), **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_sd_path):
    return load_generator_models(make_config(tiny_sd_path, "unused"))


@pytest.fixture(scope="module")
def runs(tiny_sd_path, data, models, accelerator, tmp_path_factory):
    """The same 3-class cls run five ways, on one set of models (each way leaves the peft layers in place), at the
    paper's lr: Adam turns float rounding in near-zero gradients into differences of up to ~lr/10 per step."""
    root = tmp_path_factory.mktemp("speed-runs")
    variants = {
        "sequential": {"cls_strategy": "sequential"},
        "sequential-uncached": {"cls_strategy": "sequential", "cache_latents": False},
        "grouped": {"cls_strategy": "grouped"},
        "grouped-by-2": {"cls_strategy": "grouped", "classes_per_group": 2},
        "auto": {"cls_strategy": "auto"},
    }
    for name, overrides in variants.items():
        config = make_config(tiny_sd_path, root / name, learning_rate=1e-4, **overrides)
        train_generator(config, data, accelerator, models=models)
    return root


def adapters(folder):
    return [load_safetensors(Path(folder) / f / LORA_WEIGHT_NAME) for f in FOLDERS]


def relative_b_difference(a, b):
    """||B_a - B_b|| / ||B_a|| over the B ("up") factors, which start at 0 and hold all the training."""
    ups = [k for k in a if k.endswith("up.weight")]
    return (
        torch.cat([(a[k] - b[k]).flatten() for k in ups]).norm() / torch.cat([a[k].flatten() for k in ups]).norm()
    ).item()


def assert_close_adapters(expected, actual, atol=1e-5, rtol=1e-3):
    """Equal keys, every weight within `atol`, and the B factors within `rtol` relative to their size."""
    for a, b in zip(expected, actual):
        assert set(a) == set(b)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < atol, worst
        assert relative_b_difference(a, b) < rtol


# --- the grouped layer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7, 6), (5, 6)])
def test_grouped_layer_applies_each_samples_own_lora(shape):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    layer = GroupedLoraLinear(base, num_groups=3, rank=2, scaling=0.5)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(shape)
    index = torch.tensor([2, 0, 0, 1, 2])
    layer.group_index = index
    out = layer(x)
    for i, g in enumerate(index.tolist()):
        expected = base(x[i]) + (x[i] @ layer.lora_A[g].T @ layer.lora_B[g].T) * 0.5  # peft: base + B(A(x)) * s
        torch.testing.assert_close(out[i], expected)
    layer.group_index = index[:2]
    with pytest.raises(RuntimeError, match="group index"):
        layer(x)


@pytest.mark.parametrize("shape", [(6, 7, 6), (6, 6)])
def test_grouped_layer_block_path_equals_the_per_sample_path(shape):
    """Samples in equal contiguous blocks per group take the no-gather path: same outputs and gradients."""
    torch.manual_seed(0)
    layer = GroupedLoraLinear(torch.nn.Linear(6, 4), num_groups=3, rank=2, scaling=0.5)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(shape)
    layer.group_index = torch.tensor([0, 0, 1, 1, 2, 2])
    results = []
    for block_size in (None, contiguous_block_size(layer.group_index, 3)):
        layer.block_size = block_size
        out = layer(x)
        results.append((out, torch.autograd.grad((out * torch.arange(4.0)).sum(), [layer.lora_A, layer.lora_B])))
    assert layer.block_size == 2
    torch.testing.assert_close(results[1][0], results[0][0])
    for block, gathered in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(block, gathered)


@pytest.mark.parametrize(
    "index, num_groups, expected",
    [([0, 0, 1, 1, 2, 2], 3, 2), ([0, 1, 2], 3, 1), ([0, 1, 0, 1], 2, None), ([0, 0, 1], 2, None),
     ([0, 0, 1, 1], 3, None), ([1, 1, 0, 0], 2, None)],
)  # fmt: skip
def test_contiguous_block_size_detects_only_ordered_equal_blocks(index, num_groups, expected):
    assert contiguous_block_size(torch.tensor(index), num_groups) == expected


# --- grouped training == sequential -------------------------------------------------------------------------------


def test_grouped_equals_sequential_and_classes_differ(runs):
    sequential = adapters(runs / "sequential")
    for variant in ("grouped", "grouped-by-2", "auto"):
        assert_close_adapters(sequential, adapters(runs / variant))
    # The tolerance is far below what tells the classes apart.
    assert relative_b_difference(sequential[0], sequential[1]) > 100 * 1e-3
    # Same files: keys and LoRA metadata as the sequential path writes them, and the same output folder.
    for folder in FOLDERS:
        with safe_open(str(runs / "sequential" / folder / LORA_WEIGHT_NAME), "pt") as a:
            with safe_open(str(runs / "grouped" / folder / LORA_WEIGHT_NAME), "pt") as b:
                assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
    for name in ("adapter_index.json", "README.md"):
        assert (runs / "grouped" / name).read_text() == (runs / "sequential" / name).read_text()


def test_grouped_with_two_processes_matches_sequential(runs, digits, digits_path, tiny_sd_path, tmp_path):
    """A real 2-process `accelerate launch` of the default strategy (auto): both processes probe their memory and
    agree on one group size, each groups its own classes (process 0: zero and two in one forward pass; process 1: one
    alone), and every adapter equals the 1-process sequential run's to tolerance."""
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    manifest = tmp_path / "manifest.json"
    draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train").save(manifest)
    flags = {**SMALL_RUN, "learning_rate": 1e-4, "pretrained_model_name_or_path": tiny_sd_path, "dataset": digits_path,
             "class_names": ",".join(CLASSES), "few_shot_manifest": manifest, "output_dir": tmp_path / "out",
             "report_to": "none", "cls_strategy": "auto"}  # fmt: skip
    script = BENCHMARKS.parent / "training_scripts" / "train_datadream_lora.py"
    command = accelerate_launch_command(script, 2) + [str(a) for k, v in flags.items() for a in (f"--{k}", v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training adapters ['zero', 'two'] together" in result.stderr
    assert "Training adapters ['one'] together" in result.stderr
    assert "Grouped cls training: 2 classes per group (auto, " in result.stderr
    assert "of available RAM / 2 processes" in result.stderr  # the processes of one machine share its RAM
    grouping = json.loads((tmp_path / "out" / "datadream_config.json").read_text())["cls_grouping"]
    assert (grouping["num_processes"], grouping["groups"]) == (2, [["zero", "two"], ["one"]])
    assert_close_adapters(adapters(runs / "sequential"), adapters(tmp_path / "out"))


def test_cached_latents_equal_vae_every_step(runs):
    assert_close_adapters(adapters(runs / "sequential-uncached"), adapters(runs / "sequential"))


def test_grouped_adapter_loads_in_a_fresh_pipeline_and_changes_it(runs, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)

    def sample():
        return pipeline("a photo of a one", num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")

    base = sample().images
    pipeline.load_lora_weights(str(runs / "grouped" / FOLDERS[1]), use_safetensors=True)
    loaded = pipeline.get_active_adapters()[0]
    saved = load_safetensors(runs / "grouped" / FOLDERS[1] / LORA_WEIGHT_NAME)
    ups = {k: v for k, v in saved.items() if k.startswith("unet.") and k.endswith("up.weight")}
    state = get_peft_model_state_dict(pipeline.unet, adapter_name=loaded)
    for key, value in ups.items():
        peft_key = key.removeprefix("unet.").replace(".lora.up.weight", ".lora_B.weight")
        assert torch.equal(state[peft_key], value), key
    assert not (sample().images == base).all()


def test_models_keep_their_peft_layers_after_grouped_training(runs, models):
    for model in (models.unet, models.text_encoder):
        assert any(isinstance(m, LoraLayer) for m in model.modules())
        assert not any(isinstance(m, GroupedLoraLinear) for m in model.modules())
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in models.trainable_parameters())


def test_groups_and_process_split(data, models, tiny_sd_path, accelerator, runs, tmp_path):
    config = make_config(tiny_sd_path, tmp_path, classes_per_group=2, learning_rate=1e-4)
    units = build_units(config, data, models.tokenizer)
    assert [[u.name for u in group] for group in group_units(units, config, 2)] == [["zero", "one"], ["two"]]
    # Process 1 of 2 trains class "one" alone; its adapter equals the 1-process run's to tolerance.
    mine = build_units(config, data, models.tokenizer, process_index=1, num_processes=2)
    train_groups(models, mine, config, accelerator)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0001_one"]
    expected = adapters(runs / "sequential")[1]
    assert_close_adapters([expected], [load_safetensors(tmp_path / "0001_one" / LORA_WEIGHT_NAME)])


# --- grouped checkpoints and resume -------------------------------------------------------------------------------


def crash_at(unit_name, step, seen):
    def callback(unit, done):
        seen.append((unit.name, done))
        if (unit.name, done) == (unit_name, step):
            raise Crash(f"killed after step {done}")

    return callback


def test_grouped_resume_equals_uninterrupted(tiny_sd_path, data, models, accelerator, runs, tmp_path):
    """5 steps, checkpoints at 2 and 4; killed after step 5 with class two's checkpoint-4 lost (a kill between the
    classes' writes): the group resumes from the newest step all classes have, and ends bit-identical."""
    reference = tmp_path / "reference"
    config = make_config(tiny_sd_path, reference, max_train_steps=5)
    train_generator(config, data, accelerator, models=models)
    output = tmp_path / "resumed"
    interrupted = make_config(tiny_sd_path, output, max_train_steps=5)
    with pytest.raises(Crash):
        train_generator(interrupted, data, accelerator, models=models, step_callback=crash_at("two", 5, []))
    assert not any((output / f / LORA_WEIGHT_NAME).exists() for f in FOLDERS)
    assert [c.name for c in list_checkpoints(output / FOLDERS[0])] == ["checkpoint-2", "checkpoint-4"]
    # Per-class checkpoints in the sequential path's format: the same parameter names.
    sequential = list_checkpoints(runs / "sequential" / FOLDERS[0])[-1]
    assert set(load_safetensors(sequential / WEIGHTS_NAME)) == set(
        load_safetensors(output / FOLDERS[0] / "checkpoint-2" / WEIGHTS_NAME)
    )
    shutil.rmtree(output / FOLDERS[2] / "checkpoint-4")
    seen = []
    resumed = GeneratorTrainingConfig(**{**interrupted.to_dict(), "resume_from_checkpoint": "latest"})
    train_generator(resumed, data, accelerator, models=models, step_callback=crash_at(None, 0, seen))
    assert seen == [(name, step) for step in (3, 4, 5) for name in CLASSES]
    for folder in FOLDERS:
        a = load_safetensors(reference / folder / LORA_WEIGHT_NAME)
        b = load_safetensors(output / folder / LORA_WEIGHT_NAME)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), folder
        logs = [json.loads((run / folder / TRAINING_LOG_NAME).read_text()) for run in (reference, output)]
        assert logs[0] == logs[1] and [e["step"] for e in logs[0]["log_history"]] == [1, 2, 3, 4, 5]
    # A finished group is skipped on resume.
    seen.clear()
    train_generator(resumed, data, accelerator, models=models, step_callback=crash_at(None, 0, seen))
    assert seen == []


# --- auto: the group size from memory, running out of memory, resuming across strategies ---------------------------

GIB = 2**30


def sizing(overrides=None, num_classes=10, num_processes=1, previous=None, reading=None, agree=None):
    config = GeneratorTrainingConfig(pretrained_model_name_or_path="m", **(overrides or {}))
    measured = []

    def measure():
        measured.append(True)
        return reading

    return choose_group_size(config, num_classes, num_processes, previous, measure, agree), measured


@pytest.mark.parametrize(
    "reading, expected, why",
    [(MemoryReading(1 * GIB, 2 * GIB, 100 * GIB, "cuda"), 10, "capped at the 10 classes"),  # large: all classes
     (MemoryReading(10 * GIB, 18 * GIB, 60 * GIB, "cuda"), 5, "each further class 8.00 GiB"),  # 48 GiB usable
     (MemoryReading(10 * GIB, 18 * GIB, 20 * GIB, "cuda"), 1, "each further class"),  # room for one only
     (MemoryReading(30 * GIB, 50 * GIB, 20 * GIB, "cuda"), 1, "one class's step needs 30.00 GiB"),  # not even one
     (MemoryReading(10 * GIB, None, 100 * GIB, "cuda"), 1, "two-class step ran out of memory"),
     (MemoryReading(10 * GIB, 9 * GIB, 100 * GIB, "cuda"), 8, "each further class 10.00 GiB")],  # noise: 2nd >= 1st
)  # fmt: skip
def test_auto_sizes_the_group_to_the_memory_measured(reading, expected, why):
    chosen, measured = sizing(reading=reading)
    assert chosen.classes_per_group == expected and measured == [True]
    assert why in chosen.reason and "with the 20% safety margin" in chosen.reason and chosen.reason.startswith("auto")


def test_group_size_without_probing_forced_reused_or_one_class():
    large = MemoryReading(1, 2, 100 * GIB, "cuda")
    cases = [
        (sizing({"classes_per_group": 3}, reading=large), 3, "forced by --classes_per_group"),
        (sizing({"classes_per_group": 30}, reading=large), 10, "capped at the 10 classes"),
        (sizing({"cls_strategy": "grouped"}, reading=large), 10, "all of a process's classes"),
        (sizing(num_classes=1, reading=large), 1, "each process trains one class"),
        (sizing(num_classes=4, num_processes=4, reading=large), 1, "each process trains one class"),
        (sizing(previous={"classes_per_group": 4, "num_processes": 1}, reading=large), 4, "the resumed run recorded"),
    ]
    for (chosen, measured), expected, why in cases:
        assert (chosen.classes_per_group, measured) == (expected, []) and why in chosen.reason
    # Recorded with another process count, or by a sequential run: measured again.
    for previous in ({"classes_per_group": 4, "num_processes": 2}, {"strategy": "sequential", "num_processes": 1}):
        chosen, measured = sizing(previous=previous, reading=large)
        assert (chosen.classes_per_group, measured) == (10, [True])
    # Processes agree on the smallest size; a process without classes does not constrain it.
    chosen, _ = sizing(num_classes=10, num_processes=2, reading=large, agree=lambda size: min(size, 3))
    assert chosen.classes_per_group == 3 and "3 is the smallest size of the 2 processes" in chosen.reason
    chosen, _ = sizing(num_classes=3, num_processes=2, reading=None)
    assert chosen.classes_per_group == 2 and "trains no class" in chosen.reason


def test_cpu_probe_measures_a_second_class_and_changes_nothing(models, data, tiny_sd_path, tmp_path):
    config = make_config(tiny_sd_path, tmp_path)
    unit = build_units(config, data, models.tokenizer)[0]
    before = {name: p.detach().clone() for name, p in models.trainable_parameters().items()}
    reading = probe_group_memory(models, unit, config)
    assert 0 < reading.one < reading.two < reading.available and reading.source == "of available RAM"
    assert reading.method == "peak resident memory of a probe step"  # Linux
    assert all(torch.equal(before[name], p) for name, p in models.trainable_parameters().items())
    assert all(p.grad is None for p in models.trainable_parameters().values())
    assert not any(isinstance(m, GroupedLoraLinear) for m in models.unet.modules())


def test_cpu_probe_tries_no_two_class_step_that_one_class_steps_say_would_not_fit(monkeypatch, models, data, tmp_path,
                                                                                  tiny_sd_path):  # fmt: skip
    # Out of RAM, a CPU step is killed by the system rather than raising: a 512 px SD 2.1 probe of two classes at
    # batch 8 was killed at 24 GB here. The one-class step's reading decides whether the two-class one is tried.
    import datadream_hf.adapt.grouped.sizing as sizing

    groups = []
    monkeypatch.setattr(sizing, "_step_bytes", lambda models, unit, config, n, resident: groups.append(n) or 7 * GIB)
    monkeypatch.setattr(sizing, "_available_bytes", lambda device: (16 * GIB, "of available RAM"))
    config = make_config(tiny_sd_path, tmp_path)
    unit = build_units(config, data, models.tokenizer)[0]
    reading = sizing.probe_group_memory(models, unit, config)
    assert 2 not in groups and reading.two is None
    size, reason = fitting_group_size(reading, config.memory_safety_margin)
    assert size == 1 and "two one-class steps (14.00 GiB) exceed it, so no two-class step was tried" in reason
    monkeypatch.setattr(sizing, "_available_bytes", lambda device: (100 * GIB, "of available RAM"))
    assert sizing.probe_group_memory(models, unit, config).two == 7 * GIB and groups[-1] == 2


def test_cpu_probe_without_a_resident_peak_counts_saved_tensors(monkeypatch, models, data, tiny_sd_path, tmp_path):
    # Where /proc has no high-water mark (not Linux): the bytes the forward pass saves for the backward.
    monkeypatch.setattr(PeakResidentBytes, "supported", staticmethod(lambda: False))
    config = make_config(tiny_sd_path, tmp_path)
    reading = probe_group_memory(models, build_units(config, data, models.tokenizer)[0], config)
    assert reading.method == "bytes a probe step saves for backward" and 0 < reading.one < reading.two


def test_peak_resident_bytes_sees_a_transient_buffer_that_is_freed_inside_the_block():
    # What the saved-for-backward count missed: a buffer that lives and dies within the step (attention scores).
    with PeakResidentBytes() as outer:
        buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so its pages are resident
        del buffer
    assert 60 * 2**20 <= outer.peak < 200 * 2**20
    with PeakResidentBytes() as quiet:  # the mark is reset on entry: the earlier peak is not counted again
        pass
    assert quiet.peak < 16 * 2**20


def fake_probe(monkeypatch, one_class_bytes):
    """Makes the auto probe read `one_class_bytes` per class against 10 GiB (8 GiB usable), without measuring."""
    import datadream_hf.adapt.train as train_module

    def probe(models, unit, config):
        return MemoryReading(one_class_bytes, 2 * one_class_bytes, 10 * GIB, "faked")

    monkeypatch.setattr(train_module, "probe_group_memory", probe)


def grouping_of(output_dir):
    return json.loads((Path(output_dir) / "datadream_config.json").read_text())["cls_grouping"]


def test_auto_logs_and_records_the_size_it_chose(
    tiny_sd_path, data, models, accelerator, tmp_path, monkeypatch, caplog
):
    fake_probe(monkeypatch, 3 * GIB)  # 8 GiB usable: 2 classes per group
    caplog.set_level("INFO")
    seen = []
    train_generator(make_config(tiny_sd_path, tmp_path / "auto", cls_strategy="auto"), data, accelerator,
                    models=models, step_callback=crash_at(None, 0, seen))  # fmt: skip
    assert "Grouped cls training: 2 classes per group (auto, 10.00 GiB faked, 8.00 GiB with the 20%" in caplog.text
    assert seen == [(n, s) for s in (1, 2, 3) for n in ("zero", "one")] + [("two", s) for s in (1, 2, 3)]
    grouping = grouping_of(tmp_path / "auto")
    assert (grouping["strategy"], grouping["classes_per_group"], grouping["num_processes"]) == ("auto", 2, 1)
    assert grouping["groups"] == [["zero", "one"], ["two"]] and "each further class 3.00 GiB" in grouping["reason"]


def out_of_memory_at(call, group_size):
    """A grouped step that raises CUDA's out-of-memory error at its `call`-th call with `group_size` classes."""
    import datadream_hf.adapt.grouped.loop as loop

    real, calls = loop.grouped_training_step, []

    def step(models, grouped, state, batches, config):
        calls.append(len(batches))
        if len(batches) == group_size and calls.count(group_size) == call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (faked)")
        return real(models, grouped, state, batches, config)

    return step


def test_out_of_memory_halves_the_group_and_continues_from_its_checkpoint(
    tiny_sd_path, data, models, accelerator, runs, tmp_path, monkeypatch, caplog
):
    """3 classes in one group, checkpoint-2 written, out of memory in step 3: the classes continue from checkpoint-2 in
    groups of 2 (zero and one, then two); the adapters equal the sequential ones and the record says why."""
    import datadream_hf.adapt.grouped.loop as loop

    monkeypatch.setattr(loop, "grouped_training_step", out_of_memory_at(3, 3))
    caplog.set_level("INFO")
    seen = []
    config = make_config(tiny_sd_path, tmp_path / "out", cls_strategy="auto", learning_rate=1e-4)
    train_generator(config, data, accelerator, models=models, step_callback=crash_at(None, 0, seen))
    assert seen == [(n, s) for s in (1, 2) for n in CLASSES] + [("zero", 3), ("one", 3), ("two", 3)]
    assert "ran out of memory: continuing from its last checkpoint with 2 classes per group" in caplog.text
    assert_close_adapters(adapters(runs / "sequential"), adapters(tmp_path / "out"))
    grouping = grouping_of(tmp_path / "out")
    assert grouping["classes_per_group"] == 2 and grouping["reason"].startswith("halved after ['zero', 'one', 'two']")
    assert all(not list((tmp_path / "out" / f).glob(".*")) for f in FOLDERS)  # no temp folder left
    # A single class that does not fit is an error that says what to do.
    monkeypatch.setattr(loop, "grouped_training_step", out_of_memory_at(1, 1))
    with pytest.raises(torch.OutOfMemoryError, match="lower --train_batch_size"):
        train_generator(make_config(tiny_sd_path, tmp_path / "one", classes_per_group=1), data, accelerator,
                        models=models)  # fmt: skip


@pytest.fixture(scope="module")
def five_steps(tiny_sd_path, data, models, accelerator, tmp_path_factory):
    """The sequential 5-step run (checkpoints at 2 and 4) the cross-strategy resumes must end at."""
    output = tmp_path_factory.mktemp("five-steps")
    config = make_config(tiny_sd_path, output, max_train_steps=5, cls_strategy="sequential", learning_rate=1e-4)
    train_generator(config, data, accelerator, models=models)
    return output


def resumed(config, **overrides):
    return GeneratorTrainingConfig(**{**config.to_dict(), "resume_from_checkpoint": "latest", **overrides})


def test_a_sequential_run_resumes_as_auto_without_losing_a_step(
    tiny_sd_path, data, models, accelerator, five_steps, tmp_path
):
    """Killed in class one's step 5 (zero done, one at checkpoint-4, two not started); resumed with auto: one continues
    alone from checkpoint-4, two trains from its init, zero is not retrained."""
    config = make_config(tiny_sd_path, tmp_path, max_train_steps=5, cls_strategy="sequential", learning_rate=1e-4)
    with pytest.raises(Crash):
        train_generator(config, data, accelerator, models=models, step_callback=crash_at("one", 5, []))
    seen = []
    train_generator(resumed(config, cls_strategy="auto"), data, accelerator, models=models,
                    step_callback=crash_at(None, 0, seen))  # fmt: skip
    assert seen == [("one", 5)] + [("two", s) for s in range(1, 6)]
    assert_close_adapters(adapters(five_steps), adapters(tmp_path))
    assert grouping_of(tmp_path)["strategy"] == "auto"


def test_an_auto_run_resumes_as_sequential_and_back(tiny_sd_path, data, models, accelerator, five_steps, tmp_path):
    """auto, killed after step 5 before the export (all classes at checkpoint-4); resumed sequential, killed again in
    class one's step 5 (zero done); resumed auto: each class continues from its own latest checkpoint."""
    config = make_config(tiny_sd_path, tmp_path, max_train_steps=5, cls_strategy="auto", learning_rate=1e-4)
    with pytest.raises(Crash):
        train_generator(config, data, accelerator, models=models, step_callback=crash_at("two", 5, []))
    seen = []
    with pytest.raises(Crash):
        train_generator(resumed(config, cls_strategy="sequential"), data, accelerator, models=models,
                        step_callback=crash_at("one", 5, seen))  # fmt: skip
    assert seen == [("zero", 5), ("one", 5)] and grouping_of(tmp_path)["strategy"] == "sequential"
    seen.clear()
    train_generator(resumed(config), data, accelerator, models=models, step_callback=crash_at(None, 0, seen))
    assert seen == [("one", 5), ("two", 5)]  # one and two: checkpoint-4, but made by other groups
    assert_close_adapters(adapters(five_steps), adapters(tmp_path))


def test_a_resumed_auto_run_keeps_its_recorded_size(
    tiny_sd_path, data, models, accelerator, runs, tmp_path, monkeypatch, caplog
):
    """Sized to 2 per group, killed in the first group; resumed where memory would allow 3: the same groups as
    recorded (not measured again), ending bit-identical to the uninterrupted groups of 2."""
    fake_probe(monkeypatch, 3 * GIB)
    config = make_config(tiny_sd_path, tmp_path, cls_strategy="auto", learning_rate=1e-4)
    with pytest.raises(Crash):
        train_generator(config, data, accelerator, models=models, step_callback=crash_at("one", 3, []))
    fake_probe(monkeypatch, GIB)
    caplog.set_level("INFO")
    train_generator(resumed(config), data, accelerator, models=models)
    assert "2 classes per group (the size the resumed run recorded" in caplog.text
    assert "Training adapters ['zero', 'one'] together" in caplog.text
    for folder in FOLDERS:
        a = load_safetensors(runs / "grouped-by-2" / folder / LORA_WEIGHT_NAME)
        b = load_safetensors(tmp_path / folder / LORA_WEIGHT_NAME)
        assert all(torch.equal(a[k], b[k]) for k in a), folder


def test_resume_plan_keeps_a_group_whole_or_regroups_by_checkpoint(data, models, tiny_sd_path, tmp_path):
    """The plan read from the folder alone: a kill between a group's checkpoint writes keeps the group whole (from
    the step all hold); checkpoints made by other groups regroup the classes by (step, group)."""
    config = make_config(tiny_sd_path, tmp_path)
    units = build_units(config, data, models.tokenizer)

    def checkpoint(folder, step, trained_with):
        path = tmp_path / folder / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / STATE_NAME).write_text(json.dumps({"step": step, "trained_with": trained_with}))

    def plan():
        return [([u.name for u in start.units], start.step) for start in resume_plan(units, tmp_path)]

    assert plan() == [(CLASSES, 0)]
    for folder in FOLDERS:
        checkpoint(folder, 2, FOLDERS)
    checkpoint(FOLDERS[0], 4, FOLDERS)  # the group was killed while writing checkpoint-4
    assert plan() == [(CLASSES, 2)]
    # zero finished in this group (killed while the group exported): retrained with it for the same rounding.
    (tmp_path / FOLDERS[0] / LORA_WEIGHT_NAME).touch()
    write_training_log(tmp_path / FOLDERS[0], [], trained_with=FOLDERS)
    assert plan() == [(CLASSES, 2)]
    write_training_log(tmp_path / FOLDERS[0], [])  # zero finished alone (e.g. sequential): not retrained
    assert plan() == [(["one", "two"], 2)]
    checkpoint(FOLDERS[1], 6, None)  # one went on alone: it continues from there, two from where it is
    assert plan() == [(["one"], 6), (["two"], 2)]
    for folder in FOLDERS[1:]:
        (tmp_path / folder / LORA_WEIGHT_NAME).touch()
    assert plan() == []


# --- latent cache and prompt deduplication ------------------------------------------------------------------------


def test_latent_cache_holds_each_crops_posterior(models, data):
    from PIL import Image

    wide = [image.resize((34, 32)) for image in data.images[:2]]  # 3 crop offsets each at 32 px
    prompt_ids = torch.arange(6).reshape(2, 3)
    unit = make_unit("x", ".", 3, wide, [0, 1], prompt_ids, 32)
    device, dtype = models.device, torch.float32
    cache = LatentCache.build(models.vae, unit.images, 32, dtype, device)
    assert len(cache) == 6
    for step in range(3):
        plain = make_step_batch(unit, step, 2, 32, models.latent_shape(32), 1000)
        cached = make_step_batch(unit, step, 2, 32, models.latent_shape(32), 1000, cache)
        assert all(torch.equal(a, b) for a, b in zip(plain.as_tuple(), cached.as_tuple()))  # same draws
        mean, std = encode_posterior(models.vae, plain.pixel_values, dtype, device)
        torch.testing.assert_close(cached.latent_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.latent_std, std, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(
                diffusion_loss(models, cached, dtype), diffusion_loss(models, plain, dtype), atol=1e-5, rtol=1e-4
            )
    # Too many crop offsets: no cache (the step encodes, as the reference).
    tall = make_unit("y", ".", 3, [Image.new("RGB", (32, 60))], [0], prompt_ids, 32)
    assert LatentCache.build(models.vae, tall.images, 32, dtype, device) is None


def test_prompts_encoded_once_give_the_same_states_and_gradients(models, data):
    ids = models.tokenizer(["a photo of a one"] * 3 + ["a photo of a two"] * 2, padding="max_length",
                           max_length=models.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    params = [p for n, p in models.trainable_parameters().items() if n.startswith("text_encoder.")]
    results = []
    for encode in (lambda: models.text_encoder(ids, return_dict=False)[0], lambda: encode_prompts(models, ids).hidden):
        states = encode()
        grads = torch.autograd.grad((states * torch.linspace(0, 1, states.shape[-1])).sum(), params)
        results.append((states.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --- generation: direct fusion ------------------------------------------------------------------------------------


def test_direct_fusion_equals_diffusers_fuse_and_restores_the_base(runs, tiny_sd_path, tmp_path):
    from datadream_hf.generate.adapters import FusedAdapterSwitcher
    from datadream_hf.generate.sampling import load_generation_pipeline

    pipeline = load_generation_pipeline(tiny_sd_path)
    switcher = FusedAdapterSwitcher(pipeline)

    def weights():
        parts = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
        return {f"{c}.{n}": t.clone() for c, model in parts.items() for n, t in model.state_dict().items()}

    base = weights()
    file = runs / "grouped" / FOLDERS[1] / LORA_WEIGHT_NAME
    switcher.use(file)
    direct = weights()
    assert not switcher._peft_loaded and direct.keys() == base.keys()  # no peft layer was injected
    # Without r/alpha metadata the file goes through diffusers' load_lora_weights + fuse_lora instead.
    plain = tmp_path / "plain" / LORA_WEIGHT_NAME
    plain.parent.mkdir()
    save_file(load_safetensors(file), str(plain))
    switcher.use(plain)
    assert switcher._peft_loaded
    pipeline.unload_lora_weights()  # keeps the fused weights, drops the peft layers, to compare by name
    switcher._peft_loaded = False
    via_diffusers = weights()
    assert sum(not torch.equal(direct[k], base[k]) for k in base) > 0
    for key in base:
        assert torch.equal(direct[key], via_diffusers[key]), key
    switcher.reset()
    assert all(torch.equal(value, base[key]) for key, value in weights().items())


# --- configuration, script, benchmarks ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, culprit", [({"cls_strategy": "batched"}, "cls_strategy"),
                                                ({"classes_per_group": 0}, "classes_per_group"),
                                                ({"memory_safety_margin": 1.0}, "memory_safety_margin")])  # fmt: skip
def test_bad_speed_settings_name_the_field(overrides, culprit):
    with pytest.raises(ValueError, match=culprit):
        GeneratorTrainingConfig(pretrained_model_name_or_path="some/model", **overrides)


def test_grouped_optimizer_and_scaler_equal_one_adamw_and_gradscaler_per_group():
    """Group 1 overflows at step 2 (its loss is inf): only group 1 skips that step and backs off its scale, and both
    groups end where their own AdamW + GradScaler runs end, step counts and scales included."""
    from datadream_hf.adapt.grouped.optim import GroupedAdamW, GroupedGradScaler

    torch.manual_seed(0)
    init = torch.randn(2, 3, 4)
    targets = torch.randn(4, 2, 3, 4)  # step, group, ...
    targets[1, 1, 0, 0] = float("inf")
    hyper = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}

    stack = torch.nn.Parameter(init.clone())
    optimizer, scaler = GroupedAdamW([stack], 2, **hyper), GroupedGradScaler(2, init_scale=1024.0, growth_interval=2)
    for target in targets:
        losses = (stack * target).flatten(1).sum(dim=1)  # (G,)
        scaler.scale(losses).sum().backward()
        found_inf = scaler.unscale_([stack])
        optimizer.step(active=~found_inf)
        scaler.update(found_inf)
        optimizer.zero_grad(set_to_none=True)

    for group in range(2):
        param = torch.nn.Parameter(init[group].clone())
        adamw = torch.optim.AdamW([param], **hyper)
        reference = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        for target in targets:
            reference.scale((param * target[group]).sum()).backward()
            reference.step(adamw)
            reference.update()
            adamw.zero_grad(set_to_none=True)
        torch.testing.assert_close(stack.detach()[group], param.detach())
        sliced = {k: v[group] for k, v in optimizer.state[stack].items()}
        for key, value in adamw.state[param].items():
            torch.testing.assert_close(sliced[key], value, check_dtype=False)
        assert scaler.group_state_dict(group) == reference.state_dict()
    assert optimizer.state[stack]["step"].tolist() == [4.0, 3.0]  # group 1 skipped its overflowing step


def test_grouped_equals_sequential_under_fp16(tiny_sd_path, data, models, accelerator, tmp_path):
    """fp16 (frozen weights in half precision, loss scaling): grouped == sequential to tolerance, and the per-class
    checkpoints hold each class's own loss scaler in GradScaler's format."""
    results = {}
    for strategy in ("sequential", "grouped"):
        config = make_config(tiny_sd_path, tmp_path / strategy, mixed_precision="fp16", cls_strategy=strategy,
                             learning_rate=1e-4)  # fmt: skip
        train_generator(config, data, accelerator, models=load_generator_models(config))
        results[strategy] = adapters(tmp_path / strategy)
    assert_close_adapters(results["sequential"], results["grouped"], atol=1e-4, rtol=1e-2)
    for folder in FOLDERS:
        states = [json.loads((tmp_path / s / folder / "checkpoint-2" / STATE_NAME).read_text()) for s in results]
        assert states[0]["grad_scaler"] == states[1]["grad_scaler"] and states[0]["grad_scaler"]["scale"] > 0


def test_script_flags_reach_the_config(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent / "training_scripts"))
    import train_datadream_lora

    base = ["--pretrained_model_name_or_path", "m", "--dataset", "d", "--few_shot_manifest", "f.json"]
    config, _ = train_datadream_lora.parse_args(base + ["--cls_strategy", "grouped", "--classes_per_group", "4",
                                                        "--no-cache_latents"])  # fmt: skip
    assert (config.cls_strategy, config.classes_per_group, config.cache_latents) == ("grouped", 4, False)
    default, _ = train_datadream_lora.parse_args(base)
    assert (default.cls_strategy, default.classes_per_group, default.cache_latents) == ("auto", None, True)


def test_benchmarks_run_and_report_ratios(tiny_sd_path, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_generation
    import bench_stage1_cls

    stage1 = bench_stage1_cls.main(bench_stage1_cls.parse_args([
        "--pretrained_model_name_or_path", tiny_sd_path, "--resolution", "32", "--num_classes", "2", "--k", "2",
        "--train_batch_size", "2", "--max_train_steps", "2", "--skip_ablations", "--output_dir", str(tmp_path / "s1"),
        "--json", str(tmp_path / "s1.json"),
    ]))  # fmt: skip
    assert set(stage1) == {"reference", "auto", "ours"} and stage1["ours"]["max_relative_diff_B"] < 1e-3
    assert stage1["auto"]["max_relative_diff_B"] < 1e-3 and stage1["auto"]["classes_per_group"] == 2
    generation = bench_generation.main(bench_generation.parse_args([
        "--pretrained_model_name_or_path", tiny_sd_path, "--num_classes", "2", "--images_per_class", "1",
        "--num_inference_steps", "2", "--output_dir", str(tmp_path / "g"),
    ]))  # fmt: skip
    assert {"base", "ours", "ours+write", "unfused", "fusion", "reference"} <= set(generation)
    assert generation["reference"]["max_pixel_diff_vs_ours"] <= 2
    printed = capsys.readouterr().out
    assert "target >= 3x" in printed and "target < 5%" in printed and "target >= 0.80" in printed
    # Fusion alone: its base is the base pipeline sampled class by class beside it, and nothing else runs.
    fusion_only = bench_generation.main(bench_generation.parse_args([
        "--pretrained_model_name_or_path", tiny_sd_path, "--num_classes", "2", "--images_per_class", "2",
        "--num_inference_steps", "2", "--variants", "fusion", "--output_dir", str(tmp_path / "f"),
    ]))  # fmt: skip
    assert list(fusion_only) == ["base", "fusion"] and not (tmp_path / "f" / "adapters").exists()
    assert fusion_only["fusion"]["paired_base_images_per_s"] == fusion_only["base"]["images_per_s"] > 0
    assert "base sampled class by class beside it" in capsys.readouterr().out
    stage1_lines = printed[printed.index("Stage 1, cls mode") :].splitlines()
    assert stage1_lines[1].startswith("default path (auto, 2 classes per group) vs reference-style: ")
    for name in ("auto", "ours"):
        result = json.loads((tmp_path / "s1.json").read_text())["results"][name]
        assert result["speedup_vs_reference"] > 0 and result["steady_speedup_vs_reference"] > 0


def test_benchmark_model_choices(tmp_path, monkeypatch):
    import datadream_hf.tiny_world.benchmarking as benchmarking

    built = []
    monkeypatch.setattr(
        benchmarking, "save_random_generator", lambda name, path, device: built.append((name, path, device)) or "r"
    )
    assert benchmarking.benchmark_model(benchmarking.RANDOM_SDXL_BASE, tmp_path, "cuda") == ("r", False)
    assert built == [(benchmarking.RANDOM_SDXL_BASE, tmp_path / benchmarking.RANDOM_SDXL_BASE, "cuda")]
    assert benchmarking.benchmark_model("some/model", tmp_path, "cpu") == ("some/model", False)
    path, tiny = benchmarking.benchmark_model(None, tmp_path, "cpu")
    assert tiny and (Path(path) / "model_index.json").is_file() and len(built) == 1


def test_step_clock_counts_shared_spans_once():
    from datadream_hf.tiny_world.benchmarking import StepClock

    clock = StepClock("cpu")
    # Sequential: two classes one after the other, 3 steps each, 1 s per step, a 5 s load between them.
    clock.times = {"a": [0.0, 1.0, 2.0], "b": [7.0, 8.0, 9.0]}
    assert clock.seconds_per_class_step() == 1.0
    # Grouped: two classes stepped together, 2 s per shared step, so 1 s per class-step.
    clock.times = {"a": [0.0, 2.0, 4.0], "b": [0.0, 2.0, 4.0]}
    assert clock.seconds_per_class_step() == 1.0
    clock.times = {"a": [0.0], "b": [3.0]}
    with pytest.raises(ValueError, match="max_train_steps"):
        clock.seconds_per_class_step()


@pytest.mark.parametrize(
    "name, denoiser, parameters",
    [("random-sd21-base", "unet", 865_910_724), ("random-sdxl-base", "unet", 2_567_463_684),
     ("random-sd3-medium", "transformer", 2_028_328_000)],
)  # fmt: skip
def test_random_generators_have_the_real_models_denoiser_sizes(name, denoiser, parameters):
    # On the meta device: the architecture without allocating it. The counts are the released checkpoints'.
    from datadream_hf.tiny_world.benchmarking import RANDOM_GENERATORS

    pipeline = RANDOM_GENERATORS[name]("meta", 0)
    assert sum(p.numel() for p in getattr(pipeline, denoiser).parameters()) == parameters
