"""The tiny world: shipped weights load offline and sample deterministically; the generator reads prompts with the
CLIP text tower; captions describe pixels and never name a digit; pre-training is deterministic and label-free, leaves
the few shots out and writes atomically; the sanity-check helpers measure what they say."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from datadream_hf.few_shot import draw_few_shot
from datadream_hf.tiny_world.captions import (
    CAPTION_WORDS,
    GRID_THRESHOLDS,
    INK_TERCILES,
    SLANT_TERCILES,
    DigitDescription,
    caption_thresholds,
    describe_digit,
)
from datadream_hf.tiny_world.checks import check_no_label_leak, class_fidelity, digit_probe_features, fit_digit_probe
from datadream_hf.tiny_world.digits import DIGIT_NAMES
from datadream_hf.tiny_world.pretraining import (
    CaptionedPool,
    clip_pixel_values,
    random_affine,
    sample_caption,
    to_pil,
)
from datadream_hf.tiny_world.world import (
    TINY_WORLD_METADATA_NAME,
    TinyWorldConfig,
    build_tiny_world_clip,
    build_tiny_world_generator,
    pretrain_tiny_world,
    pretraining_images,
    render_tiny_world_card,
    tiny_world_paths,
)

# A handful of steps per phase: exercises every code path of the rebuild in seconds, not its quality.
SMOKE = {
    "augmented_copies": 2,
    "vae_steps": 2,
    "vae_batch_size": 4,
    "unet_steps": 3,
    "unet_batch_size": 4,
    "unet_warmup_steps": 1,
    "clip_steps": 2,
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


def _assert_text_tower_is_the_encoder(clip: CLIPModel, text_encoder) -> None:
    tower = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    encoder = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    assert tower.keys() == encoder.keys()
    for key, value in tower.items():
        torch.testing.assert_close(encoder[key], value, rtol=0, atol=0, msg=key)


def test_shipped_generator_reads_prompts_with_the_shipped_clip_text_tower():
    paths = tiny_world_paths()
    pipe = StableDiffusionPipeline.from_pretrained(str(paths.generator))
    clip, processor = CLIPModel.from_pretrained(str(paths.clip)), CLIPProcessor.from_pretrained(str(paths.clip))
    _assert_text_tower_is_the_encoder(clip, pipe.text_encoder)
    assert pipe.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    # Each caption word and digit name has its own token sequence (most are one token), none falls back to bytes.
    spelled = {word: tuple(pipe.tokenizer.tokenize(word)) for word in (*CAPTION_WORDS, *DIGIT_NAMES)}
    assert len(set(spelled.values())) == len(spelled)
    assert all(len(tokens) <= 4 for tokens in spelled.values()), spelled
    assert sum(len(tokens) == 1 for tokens in spelled.values()) >= 20


def test_pretraining_smoke_is_deterministic_and_trains_the_right_parts(tmp_path):
    config = TinyWorldConfig(**SMOKE)
    first = pretrain_tiny_world(tmp_path / "a", config)
    pretrain_tiny_world(tmp_path / "b", config)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    init_clip, init_processor = build_tiny_world_clip(config.seed)
    init_pipe = build_tiny_world_generator(init_clip, init_processor, config.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "generator"))
    clip = CLIPModel.from_pretrained(str(tmp_path / "a" / "clip"))
    assert pipe.vae.config.scaling_factor == pytest.approx(first["vae_scaling_factor"])
    for name in ("vae", "unet"):
        before, after = getattr(init_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} did not train"
    before, after = init_clip.state_dict(), clip.state_dict()
    for tower in ("vision_model.", "text_model."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(tower)), f"{tower} not trained"
    # The generator's text encoder is the trained CLIP text tower, frozen while the UNet learned to read it.
    _assert_text_tower_is_the_encoder(clip, pipe.text_encoder)

    card = (tmp_path / "a" / "README.md").read_text()
    assert "held out" in card.lower() and first["rebuild_command"] in card
    assert first["data"]["num_pretraining_images"] == 1097
    assert first["captions"]["distinct_captions"] > 100
    assert not set(first["captions"]["example"].split()) & set(DIGIT_NAMES)


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
        ("attribute_dropout", -0.1),
        ("augmented_copies", 0),
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


def _digit_image(cells: list[tuple[int, int]]) -> Image.Image:
    """A 32 px image with ink (255) on the 4x4 blocks of the given (row, column) cells of the 8x8 scan grid."""
    scan = np.zeros((8, 8), np.uint8)
    for row, column in cells:
        scan[row, column] = 255
    return Image.fromarray(scan).resize((32, 32), Image.NEAREST).convert("RGB")


def test_captions_say_where_the_ink_is_and_count_loops():
    corner = describe_digit(_digit_image([(0, 0), (0, 1), (1, 0), (1, 1)]))
    assert corner.ink == (("left",), (), (), ())
    assert corner.caption().startswith("a photo of a") and "top left" in corner.caption()
    assert corner.loops == 0 and "loop" not in corner.caption()
    ring = [(r, c) for r in range(1, 7) for c in range(2, 6) if r in (1, 6) or c in (2, 5)]
    assert describe_digit(_digit_image(ring)).loops == 1
    figure_eight = ring + [(3, 3), (3, 4)]
    assert describe_digit(_digit_image(figure_eight)).loops == 2
    assert "and a double loop" in describe_digit(_digit_image(figure_eight)).caption()
    assert describe_digit(_digit_image([])).caption() in {"a photo of a thin digit", "a photo of a digit"}


def test_caption_thresholds_are_the_statistics_of_the_pretraining_images():
    images, _ = pretraining_images(TinyWorldConfig())
    scans = [
        np.asarray(Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).convert("L")
                   .resize((8, 8), Image.BOX), np.float32) / 255.0
        for im in images
    ]  # fmt: skip
    measured = caption_thresholds(scans)
    np.testing.assert_allclose(measured["grid"], np.asarray(GRID_THRESHOLDS), atol=2e-3)
    np.testing.assert_allclose(measured["slant"], SLANT_TERCILES, atol=2e-3)
    np.testing.assert_allclose(measured["ink"], INK_TERCILES, atol=2e-2)


def test_captions_of_the_pretraining_pool_never_name_a_digit_and_describe_their_own_view():
    images, _ = pretraining_images(TinyWorldConfig())
    pool = CaptionedPool.build(images[:40], copies=3, rotation=6.0, generator=torch.Generator().manual_seed(0))
    assert pool.images.shape == (3, 40, 3, 32, 32)
    torch.testing.assert_close(pool.images[0], images[:40], rtol=0, atol=0)  # view 0 is the image itself
    flat_images, flat_descriptions = pool.flat()
    leak = check_no_label_leak(flat_descriptions)
    assert leak == {"digit_names_in_caption_words": [], "captions_naming_a_digit": 0}
    assert [describe_digit(to_pil(image)) for image in flat_images[40:80]] == flat_descriptions[40:80]
    generator = torch.Generator().manual_seed(0)
    description = flat_descriptions[0]
    assert sample_caption(description, generator, attribute_dropout=0.0) == description.caption()
    assert sample_caption(description, generator, attribute_dropout=0.999999) == "a photo of a digit"


def test_check_no_label_leak_catches_a_caption_that_names_a_digit():
    leaking = DigitDescription(thickness="seven", slant=None, ink=((), (), (), ()), loops=0)
    assert check_no_label_leak([leaking])["captions_naming_a_digit"] == 1
