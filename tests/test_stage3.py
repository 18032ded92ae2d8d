"""Stage 3: CLIP + LoRA classifier, the lambda-mixed loss, the real/synthetic sampler, GA/DDP and the script."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPProcessor

from datadream_hf.classify.augment import DataDreamAugmentation, EvalTransform, build_transforms, mix_batch
from datadream_hf.classify.config import DataDreamTrainingArguments
from datadream_hf.classify.data import (
    ImageClassificationDataset,
    RealSyntheticBatchSampler,
    SampleKey,
    collate_image_batch,
    load_synthetic_training_set,
)
from datadream_hf.classify.metrics import accuracy_metric_path
from datadream_hf.classify.modeling import CLASSIFIER_CONFIG_NAME, CLIPLoRAClassifier
from datadream_hf.classify.trainer import MixedRealSyntheticTrainer, accuracy_compute_metrics, real_synthetic_loss
from datadream_hf.data import DatasetInputError
from datadream_hf.lora import classifier_lora_config, lora_parameters
from datadream_hf.testing import accelerate_launch_command
from datadream_hf.tiny_world.digits import DIGIT_NAMES

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_classifier.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _model(tiny_clip_path, rank=4, dropout=0.0, random_b=True, seed=0):
    """A tiny classifier; `random_b` gives LoRA B non-zero values so the adapter changes the logits from step 0."""
    config = classifier_lora_config(rank=rank, alpha=2 * rank, dropout=dropout)
    if random_b:
        config.init_lora_weights = False  # peft: A and B both random
    torch.manual_seed(seed)
    return CLIPLoRAClassifier.from_clip_pretrained(tiny_clip_path, DIGIT_NAMES, lora_config=config)


def _args(tmp_path, **overrides):
    defaults = {
        "output_dir": str(tmp_path / "run"),
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "eval_strategy": "no",
        "use_cpu": True,
        "augmentation": "none",
        "warmup_steps": 0,
        "seed": 0,
        # The mechanics under test, not the reference recipe (whose defaults test_reference_recipe_defaults pins).
        "per_device_train_batch_size": 8,
        "mix_augmentation": "none",
        "lr_scheduler_type": "constant",
        "warmup_epochs": 0,
    }
    return DataDreamTrainingArguments(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def processor(tiny_clip_path):
    return CLIPProcessor.from_pretrained(tiny_clip_path)


@pytest.fixture(scope="module")
def fake_synthetic(digits, tmp_path_factory):
    """Stand-in for a stage-2 dataset: other digits rows, same ClassLabel, plus provenance columns."""
    rows = digits["train"].select(range(1, len(digits["train"]), 4))
    rows = rows.add_column("prompt", [f"a photo of a {DIGIT_NAMES[y]}" for y in rows["label"]])
    rows = rows.add_column("seed", list(range(len(rows))))
    path = tmp_path_factory.mktemp("synthetic") / "synthetic"
    rows.save_to_disk(str(path))
    return str(path)


# ---- loss ----


def test_loss_is_lambda_weighted_ce_on_a_fixed_batch(tiny_clip_path, digits, processor, tmp_path):
    model = _model(tiny_clip_path).train()
    eval_transform = EvalTransform(processor.image_processor)
    rows = digits["train"].select(range(8))
    batch = collate_image_batch(
        [
            {"pixel_values": eval_transform(r["image"]), "labels": r["label"], "is_real": i % 3 == 0}
            for i, r in enumerate(rows)
        ]
    )
    trainer = MixedRealSyntheticTrainer(model=model, args=_args(tmp_path, real_loss_weight=0.7))
    loss = trainer.compute_loss(model, dict(batch))

    logits = model(pixel_values=batch["pixel_values"]).logits
    nll = -torch.log_softmax(logits, dim=-1)[torch.arange(8), batch["labels"]]  # per-sample CE, by hand
    real, synthetic = nll[batch["is_real"]].mean(), nll[~batch["is_real"]].mean()
    expected = 0.7 * real + 0.3 * synthetic
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, nll.mean())  # the weighting is not a plain mean
    torch.testing.assert_close(trainer._partial_losses["real_loss"][0], real.detach())
    torch.testing.assert_close(trainer._partial_losses["synthetic_loss"][0], synthetic.detach())


def test_mixup_in_compute_loss_uses_soft_targets_within_each_side(tiny_clip_path, tmp_path):
    model = _model(tiny_clip_path).train()
    batch = {
        "pixel_values": torch.randn(6, 3, 32, 32),
        "labels": torch.tensor([0, 1, 2, 3, 4, 5]),
        "is_real": torch.tensor([1, 1, 1, 0, 0, 0]).bool(),
    }
    args = _args(tmp_path, mix_augmentation="mixup", mix_probability=1.0, real_loss_weight=0.6)
    trainer = MixedRealSyntheticTrainer(model=model, args=args)
    loss = trainer.compute_loss(model, dict(batch))
    # Replay the trainer's generator: same coin flip, same partners and weight.
    rng = np.random.default_rng([0, 0, 1])
    assert rng.random() < 1.0
    mixed, partner, weight = mix_batch(batch["pixel_values"], batch["labels"], batch["is_real"], "mixup", rng)
    expected, _ = real_synthetic_loss(model(mixed).logits, batch["labels"], batch["is_real"], 0.6, partner, weight)
    torch.testing.assert_close(loss, expected)
    plain, _ = real_synthetic_loss(model(batch["pixel_values"]).logits, batch["labels"], batch["is_real"], 0.6)
    assert not torch.allclose(loss, plain)


def test_loss_one_sided_batches_and_soft_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss, parts = real_synthetic_loss(logits, labels, torch.ones(3, dtype=torch.bool), 0.8)
    torch.testing.assert_close(loss, ce.mean())  # real-only batch: lambda has nothing to weigh
    assert set(parts) == {"real_loss"}
    partner = torch.tensor([2, 0, 0])
    weight = torch.full((3,), 0.25)
    is_real = torch.tensor([True, False, False])
    loss, _ = real_synthetic_loss(logits, labels, is_real, 0.8, partner, weight)
    soft = 0.25 * ce + 0.75 * F.cross_entropy(logits, partner, reduction="none")
    torch.testing.assert_close(loss, 0.8 * soft[0] + 0.2 * soft[1:].mean())


# ---- model ----


def test_gradients_flow_only_into_lora_params(tiny_clip_path, digits, processor):
    model = _model(tiny_clip_path, dropout=0.1).train()
    transform = EvalTransform(processor.image_processor)
    pixel_values = torch.stack([transform(digits["train"][i]["image"]) for i in range(4)])
    labels = torch.tensor([digits["train"][i]["label"] for i in range(4)])
    loss, _ = real_synthetic_loss(model(pixel_values).logits, labels, torch.tensor([1, 1, 0, 0]).bool(), 0.8)
    loss.backward()
    lora = lora_parameters(model)
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(lora)
    assert model.clip_model.logit_scale.grad is None and not model.clip_model.logit_scale.requires_grad
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(lora)
    for tower in ("text_model", "vision_model"):  # both towers learn
        assert any(lora[name].grad.abs().sum() > 0 for name in with_grad if tower in name), tower


def test_eval_caches_the_head_and_train_drops_it(tiny_clip_path):
    model = _model(tiny_clip_path).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    before = model(pixel_values).logits
    assert model._cached_head is not None
    with torch.no_grad():
        next(p for n, p in lora_parameters(model).items() if "text_model" in n).add_(torch.randn(4, 32))
    torch.testing.assert_close(model(pixel_values).logits, before)  # cached: text tower not re-run in eval
    model.train().eval()
    assert not torch.allclose(model(pixel_values).logits, before)


def test_saved_adapter_reloads_with_identical_logits(tiny_clip_path, tmp_path):
    model = _model(tiny_clip_path).eval()
    pixel_values = torch.randn(3, 3, 32, 32)
    logits = model(pixel_values).logits
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", CLASSIFIER_CONFIG_NAME]
    config = json.loads((tmp_path / "adapter" / CLASSIFIER_CONFIG_NAME).read_text())
    assert config["class_names"] == DIGIT_NAMES and config["prompts"][0] == "a photo of a zero"

    reloaded = CLIPLoRAClassifier.from_pretrained(tmp_path / "adapter")
    assert torch.equal(reloaded(pixel_values).logits, logits)
    fresh = _model(tiny_clip_path, seed=1).eval()  # other LoRA weights: other logits, so the check can fail
    assert not torch.allclose(fresh(pixel_values).logits, logits)


# ---- sampler and data ----


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_holds_the_real_synthetic_counts_in_every_batch(world_size):
    num_real, num_synthetic, r, s = 40, 203, 3, 5
    per_rank = []
    for rank in range(world_size):
        sampler = RealSyntheticBatchSampler(num_real, num_synthetic, r, s, num_replicas=world_size, rank=rank, seed=7)
        keys = list(sampler)
        batches = [[key.index for key in batch] for batch in keys]
        assert len(batches) == len(sampler) == math.ceil(math.ceil(num_synthetic / s) / world_size)
        assert len({key.seed for batch in keys for key in batch}) == len(keys) * (r + s)  # a seed per draw
        for batch in batches:
            assert sum(i < num_real for i in batch) == r and sum(i >= num_real for i in batch) == s
            assert all(0 <= i < num_real + num_synthetic for i in batch)
        per_rank.append(batches)
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert set(range(num_real, num_real + num_synthetic)) <= set(everything)  # an epoch sees every synthetic image
    assert set(range(num_real)) <= set(everything)  # real images are cycled, not dropped
    if world_size == 2:
        assert all(a != b for a, b in zip(*per_rank))  # each rank its own batches
    sampler = RealSyntheticBatchSampler(num_real, num_synthetic, r, s, seed=7)
    first = list(sampler)
    assert list(sampler) == first  # deterministic under the seed
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_augmentation_follows_the_samplers_seeds_whatever_the_workers(digits, processor):
    """The sampler's per-draw seeds fix each image's augmentation: 0 or 2 dataloader workers give the same batches,
    another epoch other ones, and a key's seed reproduces its item alone (what a resumed run relies on)."""
    dataset = ImageClassificationDataset(
        digits["train"].select(range(6)), digits["train"].select(range(6, 16)),
        DataDreamAugmentation(processor.image_processor, seed=0),
    )  # fmt: skip
    sampler = RealSyntheticBatchSampler(6, 10, 2, 3, seed=5)

    def batches(num_workers, epoch=0):
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_image_batch, num_workers=num_workers
        )
        return list(loader)

    alone, parallel = batches(0), batches(2)
    assert len(alone) == len(sampler) == 4
    for a, b in zip(alone, parallel):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["augmentation_seeds"], b["augmentation_seeds"])
    assert not torch.equal(batches(0, epoch=1)[0]["pixel_values"], alone[0]["pixel_values"])
    sampler.set_epoch(0)
    key = list(sampler)[2][4]
    assert torch.equal(dataset[key]["pixel_values"], alone[2]["pixel_values"][4])
    assert not torch.equal(dataset[SampleKey(key.index, key.seed + 1)]["pixel_values"], alone[2]["pixel_values"][4])
    # Plain indices (evaluation, a user's own sampler) still work and carry no seed.
    assert "augmentation_seed" not in dataset[0] and dataset[0]["pixel_values"].shape == (3, 32, 32)


def test_trainer_batches_and_train_modes(tiny_clip_path, digits, fake_synthetic, processor, tmp_path):
    synthetic = load_synthetic_training_set(fake_synthetic, DIGIT_NAMES)
    assert synthetic.column_names == ["image", "label"]  # provenance columns dropped
    dataset = ImageClassificationDataset(
        digits["train"].select(range(20)), synthetic, EvalTransform(processor.image_processor)
    )
    for mode, per_batch, expected_real in (("real+synthetic", 6, 2), ("real", 4, 4), ("synthetic", 4, 0)):
        args = _args(tmp_path, train_mode=mode, per_device_train_batch_size=per_batch, real_samples_per_batch=2)
        trainer = MixedRealSyntheticTrainer(model=_model(tiny_clip_path), args=args, train_dataset=dataset)
        for step, batch in zip(range(5), trainer.get_train_dataloader()):
            assert batch["pixel_values"].shape == (per_batch, 3, 32, 32)
            assert int(batch["is_real"].sum()) == expected_real, (mode, step)


def test_synthetic_dataset_with_other_classes_is_refused(digits, tmp_path):
    other = digits["train"].select(range(30)).rename_column("label", "digit")
    from datasets import ClassLabel

    other = other.cast_column("digit", ClassLabel(names=[f"class_{i}" for i in range(10)])).rename_column(
        "digit", "label"
    )
    other.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DatasetInputError, match="class_0"):
        load_synthetic_training_set(str(tmp_path / "other"), DIGIT_NAMES)


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"real_loss_weight": 1.5}, "real_loss_weight"),
        ({"real_loss_weight": -0.1}, "real_loss_weight"),
        ({"train_mode": "both"}, "train_mode"),
        ({"per_device_train_batch_size": 4, "real_samples_per_batch": 4}, "real_samples_per_batch"),
        ({"per_device_train_batch_size": 1}, "real_samples_per_batch"),
        ({"augmentation": "autoaugment"}, "augmentation"),
        ({"mix_augmentation": "mixup", "mix_probability": 2.0}, "mix_probability"),
    ],
)
def test_bad_training_arguments_name_the_field(tmp_path, overrides, culprit):
    with pytest.raises(ValueError, match=culprit):
        _args(tmp_path, **overrides)


# ---- gradient accumulation ----


def _one_step_update(tiny_clip_path, digits, processor, tmp_path, trainer_class, batch_size, accumulation):
    synthetic = digits["train"].select(range(600, 700))
    dataset = ImageClassificationDataset(
        digits["train"].select(range(40)), synthetic, EvalTransform(processor.image_processor)
    )
    model = _model(tiny_clip_path, dropout=0.0)
    before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",  # Adam's first step is scale-free and would hide a GA scaling error
        learning_rate=0.5,
        weight_decay=0.0,
        max_grad_norm=0.0,
        real_loss_weight=0.7,
    )
    trainer_class(model=model, args=args, train_dataset=dataset).train()
    return {n: p.detach() - before[n] for n, p in lora_parameters(model).items()}


def test_gradient_accumulation_2x4_equals_one_batch_of_8(tiny_clip_path, digits, processor, tmp_path):
    full = _one_step_update(tiny_clip_path, digits, processor, tmp_path, MixedRealSyntheticTrainer, 8, 1)
    accumulated = _one_step_update(tiny_clip_path, digits, processor, tmp_path, MixedRealSyntheticTrainer, 4, 2)
    assert max(d.abs().max() for d in full.values()) > 1e-4  # the step did move the adapter
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-6, rtol=1e-4)

    class UnscaledTrainer(MixedRealSyntheticTrainer):  # the bug the class attribute prevents
        loss_is_scaled_for_ga = True

    wrong = _one_step_update(tiny_clip_path, digits, processor, tmp_path, UnscaledTrainer, 4, 2)
    assert not all(torch.allclose(wrong[n], full[n], atol=1e-6, rtol=1e-4) for n in full)


# ---- augmentation and metric ----


def test_augmentation_is_seeded_and_normalized(digits, processor):
    images = [digits["train"][i]["image"] for i in range(12)]
    augment = DataDreamAugmentation(processor.image_processor, seed=3)
    first = [augment(im) for im in images]
    again = DataDreamAugmentation(processor.image_processor, seed=3)
    assert all(torch.equal(again(im), x) for im, x in zip(images, first))
    other = DataDreamAugmentation(processor.image_processor, seed=4)
    assert not all(torch.equal(other(im), x) for im, x in zip(images, first))
    assert first[0].shape == (3, 32, 32)
    train, evaluation = build_transforms(processor.image_processor, "none")
    expected = processor.image_processor(images=images[0], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(evaluation(images[0]), expected) and train is evaluation


def test_deterministic_transform_outputs_are_computed_once_and_kept(digits, processor):
    class CountingTransform(EvalTransform):
        calls = 0

        def __call__(self, image):
            CountingTransform.calls += 1
            return super().__call__(image)

    real, synthetic = digits["train"].select(range(6)), digits["test"].select(range(4))
    cached = ImageClassificationDataset(real, synthetic, CountingTransform(processor.image_processor))
    first = [cached[i] for i in range(len(cached))]
    second = [cached[SampleKey(i, seed=7)] for i in reversed(range(len(cached)))][::-1]
    assert CountingTransform.calls == len(cached)  # one transform per image, however often it is drawn
    uncached = ImageClassificationDataset(real, synthetic, EvalTransform(processor.image_processor), cache_bytes=0)
    for a, b, c in zip(first, second, (uncached[i] for i in range(len(uncached)))):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_values"], c["pixel_values"])
        assert a["labels"] == b["labels"] == c["labels"] and a["is_real"] == b["is_real"] == c["is_real"]
    # Too large for the budget: nothing kept, every draw transforms again.
    CountingTransform.calls = 0
    small = ImageClassificationDataset(real, None, CountingTransform(processor.image_processor), cache_bytes=1)
    for _ in range(2):
        for i in range(6):
            small[i]
    assert CountingTransform.calls == 12
    # An augmentation (not marked deterministic) is never cached.
    augmented = ImageClassificationDataset(real, None, DataDreamAugmentation(processor.image_processor, seed=0))
    assert not torch.equal(augmented[SampleKey(0, 1)]["pixel_values"], augmented[SampleKey(0, 2)]["pixel_values"])


def test_mix_batch_keeps_real_and_synthetic_apart():
    pixel_values = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 4, 4).clone()
    labels = torch.arange(8)
    is_real = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]).bool()
    for mode in ("mixup", "cutmix"):
        mixed, partner, weight = mix_batch(pixel_values, labels, is_real, mode, np.random.default_rng(0))
        assert torch.equal(is_real[partner], is_real)  # partners come from the same side
        assert mixed.shape == pixel_values.shape and 0.0 <= float(weight[0]) <= 1.0
        expected = (
            weight[:, None, None, None] * pixel_values + (1 - weight[:, None, None, None]) * pixel_values[partner]
        )
        if mode == "mixup":
            torch.testing.assert_close(mixed, expected)
        else:  # the kept area fraction is the weight
            kept = (mixed == pixel_values).float().mean(dim=(1, 2, 3))
            changed = partner != labels
            torch.testing.assert_close(kept[changed], weight[changed])


def test_local_accuracy_metric_loads_offline():
    metric = evaluate.load(accuracy_metric_path())
    result = metric.compute(predictions=[0, 1, 1, 2, 2], references=[0, 1, 0, 2, 1], num_classes=4)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["per_class_accuracy"] == [0.5, 0.5, 1.0, None]
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)


# ---- training ----


def test_training_on_digits_beats_chance(tiny_clip_path, digits, processor, tmp_path):
    """Real only, full digits train split (1257 images), tiny random CLIP: ~0.7 test accuracy in ~7 s here."""
    transform = EvalTransform(processor.image_processor)
    train = ImageClassificationDataset(digits["train"], transform=transform)
    test = ImageClassificationDataset(digits["test"], transform=transform)
    args = _args(
        tmp_path,
        train_mode="real",
        per_device_train_batch_size=32,
        max_steps=300,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=100,
    )
    model = _model(tiny_clip_path, rank=16, dropout=0.0, random_b=False)
    trainer = MixedRealSyntheticTrainer(
        model=model, args=args, train_dataset=train, compute_metrics=accuracy_compute_metrics(10)
    )
    trainer.train()
    metrics = trainer.evaluate(test)
    assert metrics["eval_accuracy"] >= 0.4, metrics  # chance: 0.1
    assert any("real_loss" in entry for entry in trainer.state.log_history)


# ---- script ----


def _script_args(tiny_clip_path, digits_path, manifest, synthetic, output_dir, *extra):
    return [
        "--model_name_or_path", tiny_clip_path, "--real_dataset", digits_path, "--few_shot_manifest", manifest,
        "--synthetic_dataset", synthetic, "--output_dir", str(output_dir), "--per_device_train_batch_size", "8",
        "--max_steps", "6", "--logging_steps", "2", "--validation_per_class", "4", "--learning_rate", "1e-3",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.mark.usefixtures("reachable_hub")  # the upload is checked before the run
def test_script_report_card_and_mocked_push(
    tiny_clip_path, digits_path, digits_manifest_path, fake_synthetic, tmp_path, monkeypatch
):
    import datadream_hf.hub

    script = _load_script()
    pushed = {}
    monkeypatch.setattr(
        datadream_hf.hub,
        "push_folder_to_hub",
        lambda folder, repo_id, **kw: pushed.update(folder=folder, repo_id=repo_id, **kw),
    )
    out = tmp_path / "out"
    args = script.parse_args(
        _script_args(tiny_clip_path, digits_path, digits_manifest_path, fake_synthetic, out)
        + ["--push_to_hub", "--hub_model_id", "user/digits-clip", "--hub_token", "hf_SENTINEL_TOKEN"]
    )
    report = script.main(args)
    assert pushed["repo_id"] == "user/digits-clip" and pushed["token"] == "hf_SENTINEL_TOKEN"
    assert Path(pushed["folder"]) == out
    assert set(report["evaluations"]) == {"validation", "test"}
    assert "outside the K-shot subset" in report["evaluations"]["validation"]["source"]
    assert "held out" in report["evaluations"]["test"]["source"]
    assert report["evaluations"]["validation"]["num_examples"] == 40  # 4 per class, carved outside the K shots
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "- datadream" in card and "- accuracy" in card
    assert "lambda = 0.8" in card
    config = json.loads((out / "datadream_config.json").read_text())
    assert config["num_real"] == 40 and config["manifest"]["k"] == 4 and config["real_per_batch"] == 4
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SENTINEL_TOKEN" not in path.read_bytes(), path


def test_script_refuses_bad_input_before_training(tiny_clip_path, digits_path, digits_manifest_path, tmp_path):
    script = _load_script()
    with pytest.raises(ValueError, match="--synthetic_dataset"):
        script.parse_args(
            ["--real_dataset", digits_path, "--few_shot_manifest", digits_manifest_path, "--output_dir", str(tmp_path)]
        )
    with pytest.raises(ValueError, match="--few_shot_manifest"):
        script.parse_args(["--real_dataset", digits_path, "--train_mode", "real", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="validation_split"):
        script.parse_args(
            ["--real_dataset", digits_path, "--validation_split", "test", "--train_mode", "real",
             "--few_shot_manifest", digits_manifest_path, "--output_dir", str(tmp_path)]
        )  # fmt: skip


def test_script_two_processes(tiny_clip_path, digits, digits_path, digits_manifest_path, fake_synthetic, tmp_path):
    out = tmp_path / "ddp"
    # 30 validation images: 15 per process, evaluated in batches of 8 (the last one padded by accelerate).
    command = accelerate_launch_command(SCRIPT, 2) + _script_args(
        tiny_clip_path, digits_path, digits_manifest_path, fake_synthetic, out, "--validation_per_class", "3"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["split"] == "validation" and set(report["evaluations"]) == {"validation", "test"}
    # Every evaluated sample counted once across the processes: no padding duplicate, none dropped.
    validation, test = report["evaluations"]["validation"], report["evaluations"]["test"]
    assert validation["num_examples"] == 30 and set(validation["per_class_count"].values()) == {3}
    test_counts = np.bincount(digits["test"]["label"], minlength=len(DIGIT_NAMES)).tolist()
    assert test["num_examples"] == len(digits["test"]) and list(test["per_class_count"].values()) == test_counts
    config = json.loads((out / "datadream_config.json").read_text())
    assert config["world_size"] == 2
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert logged and all("real_loss" in entry and "synthetic_loss" in entry for entry in logged)
    CLIPLoRAClassifier.from_pretrained(out)  # the output reloads
