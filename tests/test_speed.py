"""Speed paths give the same results: grouped cls training == sequential, cached latents == VAE every step, prompts
encoded once == per sample, direct adapter fusion == diffusers' fuse; grouped resume == uninterrupted; benchmarks run.
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
from datadream_hf.adapt.grouped.loop import group_units, train_groups
from datadream_hf.adapt.grouped.lora import GroupedLoraLinear, contiguous_block_size
from datadream_hf.adapt.latent_cache import LatentCache, encode_posterior
from datadream_hf.adapt.modeling import diffusion_loss, encode_prompts, load_generator_models
from datadream_hf.adapt.outputs import TRAINING_LOG_NAME
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
    """The same 3-class cls run four ways, on one set of models (each way leaves the peft layers in place), at the
    paper's lr: Adam turns float rounding in near-zero gradients into differences of up to ~lr/10 per step."""
    root = tmp_path_factory.mktemp("speed-runs")
    variants = {
        "sequential": {"cls_strategy": "sequential"},
        "sequential-uncached": {"cls_strategy": "sequential", "cache_latents": False},
        "grouped": {"cls_strategy": "grouped"},
        "grouped-by-2": {"cls_strategy": "grouped", "classes_per_group": 2},
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
    for variant in ("grouped", "grouped-by-2"):
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
    """A real 2-process `accelerate launch`: each process groups its own classes (process 0: zero and two in one
    forward pass; process 1: one alone), and every adapter equals the 1-process sequential run's to tolerance."""
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    manifest = tmp_path / "manifest.json"
    draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train").save(manifest)
    flags = {**SMALL_RUN, "learning_rate": 1e-4, "pretrained_model_name_or_path": tiny_sd_path, "dataset": digits_path,
             "class_names": ",".join(CLASSES), "few_shot_manifest": manifest, "output_dir": tmp_path / "out",
             "report_to": "none"}  # fmt: skip
    script = BENCHMARKS.parent / "training_scripts" / "train_datadream_lora.py"
    command = accelerate_launch_command(script, 2) + [str(a) for k, v in flags.items() for a in (f"--{k}", v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training adapters ['zero', 'two'] together" in result.stderr
    assert "Training adapters ['one'] together" in result.stderr
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
    assert [[u.name for u in group] for group in group_units(units, config)] == [["zero", "one"], ["two"]]
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
    for encode in (lambda: models.text_encoder(ids, return_dict=False)[0], lambda: encode_prompts(models, ids)):
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
                                                ({"classes_per_group": 0}, "classes_per_group")])  # fmt: skip
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
    assert (default.cls_strategy, default.cache_latents) == ("sequential", True)


def test_benchmarks_run_and_report_ratios(tiny_sd_path, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_generation
    import bench_stage1_cls

    stage1 = bench_stage1_cls.main(bench_stage1_cls.parse_args([
        "--pretrained_model_name_or_path", tiny_sd_path, "--resolution", "32", "--num_classes", "2", "--k", "2",
        "--train_batch_size", "2", "--max_train_steps", "2", "--skip_ablations", "--output_dir", str(tmp_path / "s1"),
        "--json", str(tmp_path / "s1.json"),
    ]))  # fmt: skip
    assert set(stage1) == {"reference", "ours"} and stage1["ours"]["max_relative_diff_B"] < 1e-3
    generation = bench_generation.main(bench_generation.parse_args([
        "--pretrained_model_name_or_path", tiny_sd_path, "--num_classes", "2", "--images_per_class", "1",
        "--num_inference_steps", "2", "--output_dir", str(tmp_path / "g"),
    ]))  # fmt: skip
    assert {"base", "ours", "ours+write", "unfused", "reference"} <= set(generation)
    assert generation["reference"]["max_pixel_diff_vs_ours"] <= 2
    printed = capsys.readouterr().out
    assert "target >= 3x" in printed and "target < 5%" in printed
    ours = json.loads((tmp_path / "s1.json").read_text())["results"]["ours"]
    assert ours["speedup_vs_reference"] > 0 and ours["steady_speedup_vs_reference"] > 0


def test_benchmark_model_choices(tmp_path, monkeypatch):
    import datadream_hf.tiny_world.benchmarking as benchmarking

    built = []
    monkeypatch.setattr(
        benchmarking, "save_random_sd21_base", lambda path, device: built.append((path, device)) or "r"
    )
    assert benchmarking.benchmark_model(benchmarking.RANDOM_SD21_BASE, tmp_path, "cuda") == ("r", False)
    assert built == [(tmp_path / benchmarking.RANDOM_SD21_BASE, "cuda")]
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
