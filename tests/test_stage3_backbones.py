"""Stage-3 backbones beyond CLIP: SigLIP, SigLIP 2 (fixed resolution), image-classification models (ViT), each
through `MixedRealSyntheticTrainer` with the lambda loss, saved and reloaded, and through `train_classifier.py`."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import LoraConfig

from datadream_hf.classify.augment import EvalTransform
from datadream_hf.classify.backbones import backbone_kind, load_classifier, load_trained_classifier
from datadream_hf.classify.config import DataDreamTrainingArguments
from datadream_hf.classify.data import ImageClassificationDataset, collate_image_batch
from datadream_hf.classify.trainer import MixedRealSyntheticTrainer
from datadream_hf.errors import run_script
from datadream_hf.testing import (
    build_tiny_siglip,
    build_tiny_vit_classifier,
    save_model_and_processor,
)
from datadream_hf.tiny_world.digits import DIGIT_NAMES

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_classifier.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def backbone_paths(tiny_clip_path, tmp_path_factory):
    """name -> (model folder, classifier_type): the tiny models as Hub checkpoints hold them."""
    root = tmp_path_factory.mktemp("backbones")
    return {
        "siglip": (save_model_and_processor(root / "siglip", *build_tiny_siglip()), "auto"),
        "siglip2": (save_model_and_processor(root / "siglip2", *build_tiny_siglip(gemma_tokenizer=True)), "auto"),
        "vit": (save_model_and_processor(root / "vit", *build_tiny_vit_classifier()), "auto"),
        "clip-image-classifier": (tiny_clip_path, "image_classifier"),  # CLIP's image tower, head from its text
    }


# name -> (backbone, full fine-tuning)
VARIANTS = {
    "siglip": ("siglip", False),
    "siglip2": ("siglip2", False),
    "vit-lora": ("vit", False),
    "vit-full": ("vit", True),
    "clip-image-classifier": ("clip-image-classifier", False),
}


def _classifier(backbone_paths, variant, seed=0, targets=None):
    """A tiny classifier; LoRA B random (`init_lora_weights=False`) so the adapter changes the logits from step 0."""
    name, full = VARIANTS[variant]
    path, classifier_type = backbone_paths[name]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    return load_classifier(path, DIGIT_NAMES, None, lora, classifier_type=classifier_type, full_fine_tuning=full)


def _transform(backbone_paths, variant):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(backbone_paths[VARIANTS[variant][0]][0])
    return EvalTransform(getattr(processor, "image_processor", processor))


def _args(tmp_path, **overrides):
    defaults = {
        "output_dir": str(tmp_path / "run"), "report_to": "none", "disable_tqdm": True, "save_strategy": "no",
        "eval_strategy": "no", "use_cpu": True, "augmentation": "none", "warmup_steps": 0, "seed": 0,
        "per_device_train_batch_size": 6, "real_samples_per_batch": 2, "mix_augmentation": "none",
        "lr_scheduler_type": "constant", "warmup_epochs": 0, "learning_rate": 1e-2,
    }  # fmt: skip
    return DataDreamTrainingArguments(**{**defaults, **overrides})


# ---- the kind comes from the config ----


def test_backbone_kind_is_read_from_the_config(backbone_paths, tiny_clip_path, tmp_path):
    from transformers import AutoConfig, BertConfig

    kinds = {name: backbone_kind(AutoConfig.from_pretrained(path), path) for name, (path, _) in backbone_paths.items()}
    expected = {"siglip": "dual_encoder", "siglip2": "dual_encoder", "vit": "image_classifier"}
    assert kinds == {**expected, "clip-image-classifier": "dual_encoder"}  # CLIP itself: a dual encoder
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match=r"'.*bert' \(bert\) has neither a text tower nor an image-classification"):
        backbone_kind(AutoConfig.from_pretrained(tmp_path / "bert"), str(tmp_path / "bert"))


def test_a_model_without_text_tower_or_classification_head_is_refused_in_one_line(
    tmp_path, digits_path, digits_manifest_path, capsys
):
    """Through the script, before any data or weights load: one line naming the model."""
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37).save_pretrained(bert)
    script = _load_script()
    argv = ["--model_name_or_path", str(bert), "--real_dataset", digits_path, "--few_shot_manifest",
            digits_manifest_path, "--train_mode", "real", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit):
        run_script(script.main, script.parse_args, argv, script=str(SCRIPT))
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(bert) in error and "neither a text tower nor" in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_variable_resolution_siglip2_is_refused(tmp_path):
    from transformers import Siglip2Config, Siglip2Model

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1}
    config = Siglip2Config(text_config={"vocab_size": 99, **tiny}, vision_config={"num_patches": 16, **tiny})
    Siglip2Model(config).save_pretrained(tmp_path / "naflex")
    with pytest.raises(ValueError, match=r"variable-resolution model: .* spatial_shapes.*fixed-resolution"):
        load_classifier(str(tmp_path / "naflex"), DIGIT_NAMES)


# ---- dual encoders: SigLIP's logits, prompts and LoRA placement ----


@pytest.mark.parametrize("variant", ["siglip", "siglip2"])
def test_siglip_logits_are_scaled_cosine_plus_bias_over_max_length_prompts(backbone_paths, variant):
    model = _classifier(backbone_paths, variant).eval()
    encoder = model.dual_encoder
    assert model.prompt_input_ids.shape == (10, 16)  # padded to max_length, SigLIP's rule (16 in the tiny model)
    if variant == "siglip":  # SigLIP's tokenizer gives the model input_ids only, as it was trained
        assert model.prompt_keys == ["input_ids"]
    pixel_values = torch.randn(3, 3, 32, 32)
    image = F.normalize(encoder.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    tokens = {key: getattr(model, f"prompt_{key}") for key in model.prompt_keys}
    text = F.normalize(encoder.get_text_features(**tokens).pooler_output, dim=-1)
    expected = encoder.logit_scale.exp() * image @ text.t() + encoder.logit_bias
    assert encoder.logit_bias.abs().item() > 0  # the bias is there to add
    torch.testing.assert_close(model(pixel_values).logits, expected)


def test_no_lora_on_siglips_pooling_head(backbone_paths):
    default = _classifier(backbone_paths, "siglip")
    lora_layers = {name.split(".lora_A")[0] for name, _ in default.named_parameters() if ".lora_A." in name}
    assert len(lora_layers) == 2 * 2 * 2  # q and v, 2 blocks, both towers
    assert all(name.endswith(("q_proj", "v_proj")) for name in lora_layers)
    # A user's `out_proj` also names the head's nn.MultiheadAttention.out_proj, which its forward bypasses.
    with_out = _classifier(backbone_paths, "siglip", targets=["q_proj", "v_proj", "out_proj"])
    names = [name for name, _ in with_out.named_parameters() if "lora_" in name]
    assert any("self_attn.out_proj.lora_A" in name for name in names)
    assert not any(".head." in name for name in names), [n for n in names if ".head." in n]
    excluded = with_out.encoder.peft_config["default"].exclude_modules
    assert excluded == {"vision_model.head.attention.out_proj"} or excluded == ["vision_model.head.attention.out_proj"]


# ---- the lambda loss, training in every mode, reload ----


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_is_lambda_weighted_ce_on_a_fixed_batch(backbone_paths, digits, variant, tmp_path):
    model = _classifier(backbone_paths, variant).train()
    transform = _transform(backbone_paths, variant)
    rows = digits["train"].select(range(6))
    batch = collate_image_batch(
        [{"pixel_values": transform(r["image"]), "labels": r["label"], "is_real": i < 2} for i, r in enumerate(rows)]
    )
    trainer = MixedRealSyntheticTrainer(model=model, args=_args(tmp_path, real_loss_weight=0.7))
    loss = trainer.compute_loss(model, dict(batch))

    logits = model(pixel_values=batch["pixel_values"]).logits
    nll = -torch.log_softmax(logits.float(), dim=-1)[torch.arange(6), batch["labels"]]  # per-sample CE, by hand
    expected = 0.7 * nll[:2].mean() + 0.3 * nll[2:].mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, nll.mean())


@pytest.fixture(scope="module")
def train_data(digits):
    return digits["train"].select(range(12)), digits["train"].select(range(100, 124))


@pytest.mark.parametrize("mode", ["real+synthetic", "real", "synthetic"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trains_in_every_mode_and_reloads_to_identical_logits(backbone_paths, train_data, variant, mode, tmp_path):
    model = _classifier(backbone_paths, variant)
    real, synthetic = train_data
    dataset = ImageClassificationDataset(real, synthetic, _transform(backbone_paths, variant))
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    args = _args(tmp_path, train_mode=mode, max_steps=2, logging_steps=1, optim="sgd")
    trainer = MixedRealSyntheticTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[name], value) for name, value in trainable.items())  # it learned
    assert all(torch.equal(after[name], value) for name, value in frozen.items())  # the base stayed put
    if VARIANTS[variant][1]:
        assert not frozen  # full fine-tuning: every weight trains
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    sides = {"real+synthetic": {"real_loss", "synthetic_loss"}, "real": {"real_loss"}, "synthetic": {"synthetic_loss"}}
    assert logged and {key for key in logged[0] if key.endswith("_loss")} == sides[mode]
    if mode != "real+synthetic":
        return  # the reload is the same in every mode: checked once per backbone

    model.eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    logits = model(pixel_values).logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_trained_classifier(tmp_path / "saved")
    assert type(reloaded) is type(model)
    assert torch.equal(reloaded(pixel_values).logits, logits)
    untrained = _classifier(backbone_paths, variant, seed=1).eval()  # other weights, other logits: the check can fail
    assert not torch.allclose(untrained(pixel_values).logits, logits)


# ---- image classifiers: the head ----


def test_image_classifier_head_starts_from_the_text_tower_where_there_is_one(backbone_paths, tiny_clip_path):
    from transformers import AutoTokenizer, CLIPModel

    from datadream_hf.prompts import PromptTemplate

    model = _classifier(backbone_paths, "clip-image-classifier")
    assert model.head_init == "text" and model.summary()["fine_tuning"] == "lora"
    clip, tokenizer = CLIPModel.from_pretrained(tiny_clip_path), AutoTokenizer.from_pretrained(tiny_clip_path)
    tokens = tokenizer([PromptTemplate()(name) for name in DIGIT_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
    head = model.model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight, text @ clip.visual_projection.weight)
    assert torch.equal(head.bias, torch.zeros(10))
    vit = _classifier(backbone_paths, "vit-lora")
    assert vit.head_init == "fresh" and vit.summary()["lora_target_modules"] == ["q_proj", "v_proj"]


def test_full_fine_tuning_freezes_what_no_logit_depends_on(backbone_paths):
    """CLIP's classification model mean-pools its patch tokens and bypasses the vision post-layernorm: left trainable,
    it would never get a gradient (and stop a DDP run). Everything else trains (ViT: every weight, see above)."""
    path, _ = backbone_paths["clip-image-classifier"]
    model = load_classifier(path, DIGIT_NAMES, classifier_type="image_classifier", full_fine_tuning=True)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.vision_model.post_layernorm.weight", "model.vision_model.post_layernorm.bias"}
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- the script ----


@pytest.mark.parametrize("variant, extra", [("siglip", []), ("vit-full", ["--use_peft", "false"])])
def test_script_trains_and_saves_each_backbone(
    backbone_paths, digits_path, digits_manifest_path, tmp_path, variant, extra
):
    path = backbone_paths[VARIANTS[variant][0]][0]
    out = tmp_path / "out"
    script = _load_script()
    report = script.main(script.parse_args([
        "--model_name_or_path", path, "--real_dataset", digits_path, "--few_shot_manifest", digits_manifest_path,
        "--train_mode", "real", "--max_steps", "2", "--per_device_train_batch_size", "4", "--validation_per_class",
        "1", "--test_split", "none", "--augmentation", "none", "--use_cpu", "--output_dir", str(out),
        "--disable_tqdm", "true", *extra,
    ]))  # fmt: skip
    assert report["evaluations"]["validation"]["num_examples"] == 10
    record = json.loads((out / "datadream_config.json").read_text())["classifier"]
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == ("peft" if record["fine_tuning"] == "lora" else "transformers")
    assert record["model_type"] in metadata["tags"]
    if variant == "siglip":
        assert record["backbone"] == "dual_encoder" and record["model_class"] == "SiglipModel"
        assert (out / "adapter_model.safetensors").is_file() and "- siglip" in card and "+ logit_bias" in card
    else:
        assert record["backbone"] == "image_classifier" and record["fine_tuning"] == "full"
        assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
        assert "library_name: transformers" in card and "every weight trained" in card
        assert any((c / "model.safetensors").is_file() for c in out.glob("checkpoint-*"))
    reloaded = load_trained_classifier(out)
    assert reloaded(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 10)


@pytest.mark.slow
def test_vit_b16_shaped_siglip_runs_stage3_at_224px(digits_path, digits_manifest_path, tmp_path):
    """A random-weight SigLIP shaped as google/siglip-base-patch16-224 (ViT-B/16, 224 px, 64-token prompts), two
    steps of stage 3 on this CPU."""
    path = save_model_and_processor(tmp_path / "siglip-b16", *build_tiny_siglip(full_size=True))
    out = tmp_path / "out"
    script = _load_script()
    report = script.main(script.parse_args([
        "--model_name_or_path", path, "--real_dataset", digits_path, "--few_shot_manifest", digits_manifest_path,
        "--train_mode", "real", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "10", "--validation_per_class", "1", "--test_split", "none",
        "--use_cpu", "--output_dir", str(out), "--disable_tqdm", "true",
    ]))  # fmt: skip
    assert report["evaluations"]["validation"]["num_examples"] == 10
    model = load_trained_classifier(out)
    assert model.dual_encoder.config.vision_config.image_size == 224 and model.prompt_input_ids.shape[-1] == 64
