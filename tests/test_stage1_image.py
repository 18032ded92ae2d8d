"""Stage 1, image mode (LoFT): LoFT's defaults with explicit flags winning, one adapter per K-shot image on the grouped
engine (each trained by its own image only, equal to one-at-a-time training), the index, and a killed run resumed."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import FewShotData, build_units, make_step_batch, make_unit
from datadream_hf.adapt.grouped.loop import grouped_losses
from datadream_hf.adapt.grouped.lora import GroupedLora
from datadream_hf.adapt.modeling import init_lora_weights_, load_generator_models
from datadream_hf.adapt.modes.image import image_seed
from datadream_hf.adapt.train import train_generator
from datadream_hf.adapter_index import image_adapters_by_class, read_adapter_index
from datadream_hf.data import load_labelled_dataset
from datadream_hf.faults import KILL_AT_ENV
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.lora import LORA_WEIGHT_NAME, load_safetensors

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_datadream_lora.py"
CLASSES = ["zero", "one"]
# 2 classes x K=2 = 4 image adapters, 3 steps each, a checkpoint every step. lr 1e-4 (LoFT's is 1e-3): Adam turns
# float rounding in near-zero gradients into differences of up to ~lr/10 per step, so the grouped == sequential
# tolerance stays far below the differences between images.
IMAGE_RUN = {"mode": "image", "resolution": 32, "max_train_steps": 3, "lr_warmup_steps": 0, "learning_rate": 1e-4,
             "checkpointing_steps": 1, "report_to": None}  # fmt: skip


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def few_shot(digits, digits_path, tmp_path_factory):
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    manifest = draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train")
    path = tmp_path_factory.mktemp("image-mode") / "manifest.json"
    manifest.save(path)
    return FewShotData.from_dataset(dataset, manifest), digits_path, str(path)


def make_config(tiny_sd_path, output_dir, **overrides):
    return GeneratorTrainingConfig(**{**IMAGE_RUN, "pretrained_model_name_or_path": tiny_sd_path,
                                      "output_dir": str(output_dir), **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_sd_path):
    return load_generator_models(make_config(tiny_sd_path, "unused"))


@pytest.fixture(scope="module")
def runs(tiny_sd_path, few_shot, models, accelerator, tmp_path_factory):
    """The same image-mode run grouped (the default, auto-sized) and one image after the other, on one model."""
    root = tmp_path_factory.mktemp("image-runs")
    for name, strategy in (("grouped", "auto"), ("sequential", "sequential")):
        config = make_config(tiny_sd_path, root / name, cls_strategy=strategy)
        train_generator(config, few_shot[0], accelerator, models=models)
    return root


def adapter_folders(output_dir):
    index = read_adapter_index(output_dir)
    return [index["adapters"][key] for key in sorted(index["adapters"], key=int)]


def read_adapters(output_dir):
    return [load_safetensors(Path(output_dir) / folder / LORA_WEIGHT_NAME) for folder in adapter_folders(output_dir)]


def max_difference(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def load_script():
    spec = importlib.util.spec_from_file_location("train_datadream_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- settings -----------------------------------------------------------------------------------------------------


def test_image_mode_defaults_are_lofts_and_an_explicit_flag_wins(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--dataset", "d", "--few_shot_manifest", "m.json", "--output_dir",
            str(tmp_path)]  # fmt: skip
    config, _ = load_script().parse_args([*base, "--mode", "image"])
    loft = {"rank": 2, "lora_alpha": 2, "lora_init": "gaussian", "train_text_encoder": False, "train_batch_size": 1,
            "num_train_epochs": 600, "max_train_steps": None, "learning_rate": 1e-3, "adam_weight_decay": 1e-2,
            "lr_scheduler": "cosine", "lr_warmup_steps": 10, "center_crop": True, "max_grad_norm": 1.0}  # fmt: skip
    assert {name: getattr(config, name) for name in loft} == loft
    assert config.unet_target_modules == ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    # An explicit flag wins in every mode, the DataDream value included; alpha follows an explicit rank.
    explicit, _ = load_script().parse_args(
        [
            *base,
            "--mode",
            "image",
            "--rank",
            "16",
            "--learning_rate",
            "1e-4",
            "--train_text_encoder",
            "--no_center_crop",
            "--lr_warmup_steps",
            "100",
        ]
    )
    assert (explicit.rank, explicit.lora_alpha, explicit.learning_rate) == (16, 16, 1e-4)
    assert (explicit.train_text_encoder, explicit.center_crop, explicit.lr_warmup_steps) == (True, False, 100)
    assert explicit.train_batch_size == 1  # not given: still LoFT's
    # cls keeps DataDream's; a LoFT value given to cls is kept too.
    cls = GeneratorTrainingConfig(pretrained_model_name_or_path="m", train_batch_size=1)
    assert (cls.rank, cls.train_text_encoder, cls.train_batch_size, cls.learning_rate, cls.center_crop) == (
        16, True, 1, 1e-4, False)  # fmt: skip
    # Resolved once: a config rebuilt from its record is the same config.
    assert GeneratorTrainingConfig(**config.to_dict()) == config
    with pytest.raises(ValueError, match="resume_from_checkpoint.*image mode pass 'latest'"):
        GeneratorTrainingConfig(pretrained_model_name_or_path="m", mode="image", resume_from_checkpoint="x/ckpt")


def test_tiny_world_image_mode_flags_are_what_the_script_accepts(tmp_path):
    from datadream_hf.tiny_world.recipe import TinyWorldRecipe

    recipe = TinyWorldRecipe()
    base = ["--pretrained_model_name_or_path", "m", "--dataset", "d", "--few_shot_manifest", "m.json", "--mode",
            "image", "--output_dir", str(tmp_path)]  # fmt: skip
    config, _ = load_script().parse_args([*base, *recipe.stage1_image_flags()])
    assert (config.max_train_steps, config.learning_rate, config.lr_warmup_steps) == (600, 1e-3, 10)
    assert (config.resolution, config.rank, config.train_batch_size, config.center_crop) == (32, 2, 1, True)
    assert TinyWorldRecipe.quick().stage1_image_flags()[3] == "1"  # the smoke run: one step per image


def test_center_crop_takes_the_middle_of_the_resized_image():
    pixels = torch.arange(48 * 32 * 3, dtype=torch.float32).reshape(32, 48, 3) % 251
    image = Image.fromarray(pixels.numpy().astype("uint8"))  # 48 wide, 32 high
    ids = torch.zeros(1, 4, dtype=torch.long)
    center = make_unit("u", "u", 0, [image], [0], ids, 32, center_crop_images=True)
    whole = make_unit("u", "u", 0, [image], [0], ids, 32)
    assert center.images[0].shape == (3, 32, 32) and whole.images[0].shape == (3, 32, 48)
    assert torch.equal(center.images[0], whole.images[0][:, :, 8:40])
    for step in range(3):  # every step trains on the whole center crop
        batch = make_step_batch(center, step, 1, 32, (4, 4, 4), 1000)
        assert torch.equal(batch.pixel_values[0], center.images[0])


def test_image_seeds_come_from_seed_class_and_row_whatever_the_process_split(few_shot, models, tiny_sd_path):
    data = few_shot[0]
    config = make_config(tiny_sd_path, "unused")
    one = build_units(config, data, models.tokenizer)
    split = [u for rank in (0, 1) for u in build_units(config, data, models.tokenizer, rank, 2)]
    assert sorted((u.folder, u.seed) for u in one) == sorted((u.folder, u.seed) for u in split)
    rows = [(c, row) for c, per_class in enumerate(data.manifest.indices) for row in per_class]
    assert [u.seed for u in one] == [image_seed(config.seed, c, row) for c, row in rows]
    assert len({u.seed for u in one}) == len(one) == 4 and all(len(u) == 1 for u in one)
    assert [u.class_indices for u in one] == [[c] for c, _ in rows]


# --- each adapter learns from its own image only ----------------------------------------------------------------


def test_each_images_loss_reaches_only_its_own_adapter(few_shot, models, tiny_sd_path):
    """A grouped step of three image adapters: image g's loss has gradient on adapter g only, and changing image 1
    changes adapter 1's gradient alone, bit for bit."""
    data = few_shot[0]
    config = make_config(tiny_sd_path, "unused", cache_latents=False)
    units = build_units(config, data, models.tokenizer)[:3]
    grouped = GroupedLora(models, len(units))
    generator = torch.Generator().manual_seed(0)

    def init(group):  # a trained-looking adapter: random A and B (gaussian init starts with B = 0)
        init_lora_weights_(models, config.lora_init, units[group].seed)
        for name, p in models.trainable_parameters().items():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)

    grouped.init_groups_(init)
    stacks = list(grouped.parameters().values())
    latent_shape, num_timesteps = models.latent_shape(32), models.noise_scheduler.config.num_train_timesteps

    def gradients(units, which=None):
        batches = [make_step_batch(u, 0, 1, 32, latent_shape, num_timesteps) for u in units]
        with grouped.attached():
            losses = grouped_losses(models, grouped, batches, config)
            (losses.sum() if which is None else losses[which]).backward()
        grads = [p.grad.detach().clone() for p in stacks]
        for p in stacks:
            p.grad = None
        return losses.detach(), grads

    _, alone = gradients(units, which=0)
    for grad in alone:
        assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    losses, grads = gradients(units)
    # Unit 1 (a zero) trained on another image (a one), with its own prompt and seed.
    other = make_unit(units[1].name, units[1].folder, units[1].seed, [data.images[3]], [0], units[1].prompt_ids, 32)
    changed_losses, changed = gradients([units[0], other, units[2]])
    assert changed_losses[1] != losses[1]
    assert torch.equal(changed_losses[[0, 2]], losses[[0, 2]])
    for before, after in zip(grads, changed):
        assert torch.equal(before[[0, 2]], after[[0, 2]])
    assert any(not torch.equal(before[1], after[1]) for before, after in zip(grads, changed))


def test_grouped_equals_sequential_and_images_differ(runs):
    grouped, sequential = read_adapters(runs / "grouped"), read_adapters(runs / "sequential")
    assert len(grouped) == 4
    worst = max(max_difference(a, b) for a, b in zip(sequential, grouped))
    assert worst < 1e-5, worst
    between_images = min(max_difference(sequential[i], sequential[j]) for i in range(4) for j in range(i))
    assert between_images > 100 * worst + 1e-4
    grouping = json.loads((runs / "grouped" / "datadream_config.json").read_text())["cls_grouping"]
    assert grouping["strategy"] == "auto" and sum(len(g) for g in grouping["groups"]) == 4
    for name in ("adapter_index.json", "README.md"):
        assert (runs / "grouped" / name).read_text() == (runs / "sequential" / name).read_text()


# --- the output folder ----------------------------------------------------------------------------------------------


def test_index_maps_every_adapter_to_its_class_and_row(runs, few_shot):
    data = few_shot[0]
    output = runs / "grouped"
    index = read_adapter_index(output)
    assert index["mode"] == "image" and index["class_names"] == CLASSES
    per_class = image_adapters_by_class(index)
    assert [[row for row, _ in adapters] for adapters in per_class] == data.manifest.indices
    for c, adapters in enumerate(per_class):
        for row, folder in adapters:
            assert folder == f"{c:04d}_{CLASSES[c]}/image_{row:06d}"
            weights = load_safetensors(output / folder / LORA_WEIGHT_NAME)
            # diffusers format, UNet only (no text-encoder LoRA in LoFT), rank 2
            assert weights and all(key.startswith("unet.") for key in weights)
            assert {w.shape[0] for k, w in weights.items() if "lora_A" in k or "lora.down" in k} == {2}
            assert (output / folder / "training_log.json").is_file()
    record = json.loads((output / "datadream_config.json").read_text())
    assert record["mode"] == "image" and record["steps_per_adapter"] == 3
    assert record["hparams"]["rank"] == 2 and record["hparams"]["center_crop"] is True  # resolved, not None
    assert record["lora"]["text_encoder_target_modules"] is None
    assert record["image_seeds"] == {
        key: image_seed(0, image["class"], image["row"]) for key, image in index["images"].items()
    }
    card = (output / "README.md").read_text()
    assert "There is one adapter per real image (LoFT" in card
    for folder in index["adapters"].values():
        assert f"`{folder}`" in card


def test_adapter_loads_in_a_pipeline(runs, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    folder = adapter_folders(runs / "grouped")[0]
    pipeline.load_lora_weights(str(runs / "grouped"), subfolder=folder, adapter_name="image0")
    assert "image0" in pipeline.get_list_adapters()["unet"]
    assert "text_encoder" not in pipeline.get_list_adapters()


# --- a killed run continues ---------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess: CPU kernels reduce in the same order, results bit-exact
    yield
    torch.set_num_threads(threads)


def test_killed_run_resumes_to_the_same_adapters(few_shot, tiny_sd_path, tmp_path, one_thread):
    """The script in image mode, 2 images per group: SIGKILLed inside the 5th grouped step (the second group's step 2,
    after the first group finished), then resumed with `--resume_from_checkpoint latest`: the first group is kept,
    the second continues from its checkpoint-1, and every adapter equals the uninterrupted run's bit for bit."""
    _, data_path, manifest_path = few_shot
    flags = {**IMAGE_RUN, "report_to": "none", "pretrained_model_name_or_path": tiny_sd_path, "dataset": data_path,
             "class_names": ",".join(CLASSES), "few_shot_manifest": manifest_path, "classes_per_group": 2}  # fmt: skip

    def args(output_dir, *extra):
        return [str(a) for k, v in {**flags, "output_dir": output_dir}.items() for a in (f"--{k}", v)] + list(extra)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", KILL_AT_ENV: "generator-step:5"}
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, str(SCRIPT), *args(killed)], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert not (killed / "adapter_index.json").exists()
    folders = sorted(p.parent.relative_to(killed).as_posix() for p in killed.glob(f"*/*/{LORA_WEIGHT_NAME}"))
    assert len(folders) == 2  # the first group's two images
    stamps = [(killed / f / LORA_WEIGHT_NAME).stat().st_mtime_ns for f in folders]
    script = load_script()
    script.main(script.parse_args(args(killed, "--resume_from_checkpoint", "latest")))
    reference = tmp_path / "reference"
    script.main(script.parse_args(args(reference)))
    assert [(killed / f / LORA_WEIGHT_NAME).stat().st_mtime_ns for f in folders] == stamps
    assert adapter_folders(killed) == adapter_folders(reference)
    for a, b in zip(read_adapters(reference), read_adapters(killed)):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
