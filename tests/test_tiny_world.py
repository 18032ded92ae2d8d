"""The tiny world: shipped weights load offline and sample deterministically; pre-training is deterministic and
label-free, leaves the few shots out and writes atomically; the sanity-check helpers measure what they say."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from datadream_hf.few_shot import draw_few_shot
from datadream_hf.tiny_world.checks import (
    class_fidelity,
    digit_probe_features,
    finetune_clip_lora,
    finetune_generator_lora,
    fit_digit_probe,
)
from datadream_hf.tiny_world.world import (
    TINY_WORLD_METADATA_NAME,
    TinyWorldConfig,
    build_tiny_world_clip,
    build_tiny_world_generator,
    clip_pixel_values,
    pretrain_tiny_world,
    pretraining_images,
    random_affine,
    render_tiny_world_card,
    tiny_world_paths,
)

# A handful of steps per phase: exercises every code path of the rebuild in seconds, not its quality.
SMOKE = {
    "vae_steps": 2,
    "vae_batch_size": 4,
    "unet_steps": 3,
    "unet_batch_size": 4,
    "unet_warmup_steps": 1,
    "clip_image_steps": 2,
    "clip_text_steps": 2,
    "clip_batch_size": 8,
}


def _generate(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        ["a photo of a zero", "a photo of a seven"], num_inference_steps=4, generator=generator, output_type="np"
    ).images


def test_shipped_generator_loads_offline_and_samples_deterministically(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = tiny_world_paths()
    pipe = StableDiffusionPipeline.from_pretrained(str(paths.generator))
    pipe.set_progress_bar_config(disable=True)
    first, second = _generate(pipe), _generate(pipe)
    assert first.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, _generate(pipe, seed=1))
    # Pre-training measured the latent scale (SD's 0.18215 would be wrong for this VAE) and stored it in the config.
    metadata = json.loads((paths.generator.parent / TINY_WORLD_METADATA_NAME).read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(metadata["vae_scaling_factor"])
    assert pipe.vae.config.scaling_factor != 0.18215
    assert all(
        p.suffix == ".safetensors" for p in paths.generator.rglob("*") if p.name.startswith("diffusion_pytorch")
    )


def test_shipped_weights_held_out_the_demo_few_shot_subset(digits):
    metadata = json.loads((tiny_world_paths().generator.parent / TINY_WORLD_METADATA_NAME).read_text())
    held_out = metadata["data"]["held_out_few_shot"]
    manifest = draw_few_shot(digits["train"], k=16, seed=0)
    assert held_out["indices"] == manifest.indices
    assert held_out["fingerprint"] == manifest.source["fingerprint"]
    assert metadata["data"]["num_pretraining_images"] == len(digits["train"]) - 160
    assert "versions" in metadata and "config" in metadata
    card = (tiny_world_paths().generator.parent / "README.md").read_text()
    assert metadata["rebuild_command"] in card


def test_shipped_clip_loads_offline_with_its_processor(monkeypatch, digits):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tiny_world_paths().clip
    model, processor = CLIPModel.from_pretrained(str(path)).eval(), CLIPProcessor.from_pretrained(str(path))
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    assert model.logit_scale.exp().item() == pytest.approx(TinyWorldConfig().logit_scale, rel=1e-5)
    images = [digits["test"][i]["image"] for i in range(4)]
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    # Pre-training normalised images itself; it must match what the processor gives at inference.
    as_tensor = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 255
    torch.testing.assert_close(clip_pixel_values(as_tensor, processor), pixel_values, atol=1e-5, rtol=0)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
    assert features.shape == (4, model.config.projection_dim) and torch.isfinite(features).all()


def test_pretraining_images_leave_out_the_few_shot_subset(digits):
    images, manifest = pretraining_images(TinyWorldConfig())
    assert images.shape == (len(digits["train"]) - 160, 3, 32, 32)
    assert 0.0 <= images.min() and images.max() <= 1.0
    shots = torch.from_numpy(
        np.stack([np.asarray(digits["train"][i]["image"], np.float32) for i in manifest.flat_indices])
    )
    shots = shots.permute(0, 3, 1, 2) / 255.0
    # No few-shot image is among the pre-training images.
    distances = torch.cdist(shots.flatten(1), images.flatten(1))
    assert distances.min() > 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_pretraining_smoke_is_deterministic_and_trains_the_right_parts(tmp_path):
    config = TinyWorldConfig(**SMOKE)
    first = pretrain_tiny_world(tmp_path / "a", config)
    pretrain_tiny_world(tmp_path / "b", config)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    init_pipe = build_tiny_world_generator(config.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "generator"))
    assert pipe.vae.config.scaling_factor == pytest.approx(first["vae_scaling_factor"])
    for name in ("vae", "unet"):
        before, after = getattr(init_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} did not train"
    # The text encoder stays frozen at its seeded initialisation.
    for key, value in init_pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[key], value, rtol=0, atol=0)

    init_clip, _ = build_tiny_world_clip(config.seed)
    clip = CLIPModel.from_pretrained(str(tmp_path / "a" / "clip"))
    before, after = init_clip.state_dict(), clip.state_dict()
    for tower in ("vision_model.", "text_model."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(tower)), f"{tower} not trained"

    card = (tmp_path / "a" / "README.md").read_text()
    assert "2 AdamW steps" in card and "held out" in card.lower()
    assert first["data"]["num_pretraining_images"] == 1097


def test_pretraining_replaces_an_existing_folder_without_leftovers(tmp_path):
    out = tmp_path / "tiny_world"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    pretrain_tiny_world(out, TinyWorldConfig(**SMOKE))
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_world"]
    assert {p.name for p in out.iterdir()} == {"generator", "clip", TINY_WORLD_METADATA_NAME, "README.md"}


@pytest.mark.parametrize(
    "field, value",
    [
        ("vae_steps", -1),
        ("unet_batch_size", 0),
        ("ema_decay", 1.0),
        ("caption_dropout", 1.5),
        ("clip_temperature", 0.0),
        ("logit_scale", -1.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TinyWorldConfig(**{field: value})


def test_random_affine_without_jitter_is_the_identity():
    images = torch.rand(3, 3, 32, 32)
    out = random_affine(images, torch.Generator().manual_seed(0), max_rotation=0.0, zoom=(1.0, 1.0), max_shift=0.0)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_digit_probe_reads_real_digits_and_not_noise(digits):
    train = [digits["train"][i] for i in range(len(digits["train"]))]
    probe = fit_digit_probe([r["image"] for r in train], [r["label"] for r in train])
    test = [digits["test"][i] for i in range(200)]
    real = class_fidelity(probe, [r["image"] for r in test], [r["label"] for r in test])
    assert real["accuracy"] > 0.9
    features = digit_probe_features([r["image"] for r in test[:2]])
    assert features.shape == (2, 64) and 0 <= features.min() and features.max() <= 16


def test_finetune_generator_lora_trains_only_lora(tiny_sd_path, digits):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images = [digits["train"][i]["image"] for i in range(4)]
    losses = finetune_generator_lora(
        pipe, images, ["a photo of a zero"] * 4, steps=2, learning_rate=1e-3, batch_size=2
    )
    assert len(losses) == 2
    state = pipe.unet.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and any(state[k].abs().sum() > 0 for k in lora_b)
    for key, value in base.items():
        if key in state:  # base weights the adapter wraps are renamed (base_layer); the rest must not move
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_finetune_clip_lora_trains_only_lora_and_keeps_logit_scale(tiny_clip_path, digits):
    model, processor = CLIPModel.from_pretrained(tiny_clip_path), CLIPProcessor.from_pretrained(tiny_clip_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    images = [digits["train"][i]["image"] for i in range(4)]
    labels = [digits["train"][i]["label"] for i in range(4)]
    prompts = [f"a photo of a {name}" for name in digits["train"].features["label"].names]
    losses = finetune_clip_lora(model, processor, images, labels, prompts, steps=2, learning_rate=1e-3, batch_size=4)
    assert len(losses) == 2 and all(np.isfinite(losses))
    state = model.state_dict()
    assert torch.equal(state["logit_scale"], base["logit_scale"])
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)
    for key, value in base.items():
        if key in state:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_card_renders_with_and_without_checks(tmp_path):
    metadata = json.loads((tiny_world_paths().generator.parent / TINY_WORLD_METADATA_NAME).read_text())
    metadata.pop("checks", None)
    card = render_tiny_world_card(tmp_path, metadata).read_text()
    assert "Sanity checks" not in card and metadata["rebuild_command"] in card
    metadata["checks"] = {"command": "python check.py", "markdown": "- probe 12.3%"}
    card = render_tiny_world_card(tmp_path, metadata).read_text()
    assert "## Sanity checks" in card and "- probe 12.3%" in card


def test_pretrain_script_flags_are_the_config_fields(monkeypatch):
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "training_scripts" / "pretrain_tiny_world.py"
    spec = importlib.util.spec_from_file_location("pretrain_tiny_world", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pretrain_tiny_world", script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    script_args, config = script.parse_args(["--output_dir", "out", "--unet_steps", "5", "--seed", "3"])
    assert script_args.output_dir == "out" and config.unet_steps == 5 and config.seed == 3
    assert config.vae_steps == TinyWorldConfig().vae_steps
    with pytest.raises(ValueError, match="unet_batch_size"):
        script.parse_args(["--output_dir", "out", "--unet_batch_size", "0"])
