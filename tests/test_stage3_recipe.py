"""Stage 3 as the paper ran it: every default of the reference's recipe, its learning-rate schedule, and test data that
holds no image the model trained or was selected on."""

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from datadream_hf.classify.config import ClassifierArguments, DataDreamTrainingArguments, default_fp16
from datadream_hf.classify.data import image_digests, load_classifier_data
from datadream_hf.classify.schedule import reference_lr
from datadream_hf.data import DatasetInputError, decode_images, load_image_folder
from datadream_hf.few_shot import draw_few_shot

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_classifier.py"

# The reference's stage-3 recipe (ExplainableML/DataDream classify/: README command, bash_run.sh, config.py, main.py).
REFERENCE_RECIPE = {
    "per_device_train_batch_size": 64,  # --batch_size 64 (per GPU)
    "per_device_eval_batch_size": 8,  # --batch_size_eval 8
    "learning_rate": 1e-4,  # LR=1e-4
    "weight_decay": 1e-4,  # WD=1e-4
    "adam_beta1": 0.9,  # torch.optim.AdamW defaults
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "warmup_epochs": 3.0,  # WARMUP_EPOCH=3
    "warmup_steps": 0,
    "lr_scheduler_kwargs": {"min_lr": 1e-8},  # MIN_LR=1e-8: warm-up start and cosine floor
    "max_grad_norm": 0.0,  # no clipping
    "fp16": False,  # --use_fp16 True, on a GPU; this machine has none
    "mix_augmentation": "mixup_or_cutmix",  # --is_mix_aug=True: RandomChoice([CutMix, MixUp])
    "mix_probability": 0.2,  # on 20% of the batches
    "num_train_epochs": 100,  # --epochs default; a preset sets the paper's (fgvc_aircraft: 50)
    "real_loss_weight": 0.8,  # --lambda_1=0.8
    "augmentation": "datadream",
}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _recipe(training_args) -> dict:
    values = {name: getattr(training_args, name) for name in REFERENCE_RECIPE}
    assert training_args.optim.value.startswith("adamw_torch")  # AdamW (fused or not: the same update)
    assert training_args.lr_scheduler_type.value == "cosine_with_min_lr"  # run as the reference's schedule
    return values


def test_reference_recipe_defaults(tmp_path):
    """Every stage-3 default equals the reference's value, in Python and through the script (no flag given)."""
    assert _recipe(DataDreamTrainingArguments(output_dir=str(tmp_path / "a"))) == REFERENCE_RECIPE
    flags = ["--real_dataset", "x", "--few_shot_manifest", "m.json", "--train_mode", "real", "--output_dir"]
    _, training_args = _load_script().parse_args([*flags, str(tmp_path / "b")])
    assert _recipe(training_args) == REFERENCE_RECIPE
    # An explicit flag wins.
    explicit = ["--per_device_train_batch_size", "16", "--max_grad_norm", "1.0", "--fp16", "false"]
    _, training_args = _load_script().parse_args(
        [*flags, str(tmp_path / "c"), *explicit, "--mix_augmentation", "none"]
    )
    assert (training_args.per_device_train_batch_size, training_args.max_grad_norm) == (16, 1.0)
    assert (training_args.fp16, training_args.mix_augmentation) == (False, "none")


# LoFT's stage-3 recipe (ExplainableML/LoFT; its classifier is DISEF's): synthetic images only, batch 256, 60 epochs,
# 6 warm-up epochs; everything else as DataDream's.
LOFT_RECIPE = {**REFERENCE_RECIPE, "per_device_train_batch_size": 256, "num_train_epochs": 60, "warmup_epochs": 6.0}


def test_loft_recipe(tmp_path):
    """`--recipe loft` sets LoFT's values as defaults (over a dataset preset's epochs); real+synthetic and every other
    flag given explicitly still win."""
    flags = ["--real_dataset", "x", "--synthetic_dataset", "s", "--recipe", "loft", "--output_dir"]
    _, training_args = _load_script().parse_args([*flags, str(tmp_path / "a")])
    assert _recipe(training_args) == LOFT_RECIPE
    assert (training_args.recipe, training_args.train_mode) == ("loft", "synthetic")
    _, training_args = _load_script().parse_args([*flags, str(tmp_path / "b"), "--dataset_preset", "fgvc_aircraft"])
    assert training_args.num_train_epochs == 60  # LoFT's, not the preset's 50 (DataDream's for Aircraft)
    explicit = ["--train_mode", "real+synthetic", "--few_shot_manifest", "m.json", "--num_train_epochs", "5",
                "--per_device_train_batch_size", "32"]  # fmt: skip
    _, training_args = _load_script().parse_args([*flags, str(tmp_path / "c"), *explicit])
    assert (training_args.train_mode, training_args.num_train_epochs) == ("real+synthetic", 5)
    assert (training_args.per_device_train_batch_size, training_args.warmup_epochs) == (32, 6.0)
    config = tmp_path / "loft.yaml"  # a config file takes the recipe too
    config.write_text(f"real_dataset: x\nsynthetic_dataset: s\nrecipe: loft\noutput_dir: {tmp_path / 'd'}\n")
    _, training_args = _load_script().parse_args([str(config)])
    assert _recipe(training_args) == LOFT_RECIPE and training_args.train_mode == "synthetic"
    with pytest.raises(ValueError, match="recipe"):
        DataDreamTrainingArguments(output_dir=str(tmp_path / "e"), recipe="disef")


def test_fp16_defaults_on_with_a_gpu_only(monkeypatch, tmp_path):
    assert DataDreamTrainingArguments(output_dir=str(tmp_path)).fp16 is False  # this machine: CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (the arguments themselves would set up the GPU)
    assert default_fp16(use_cpu=False) is True and default_fp16(use_cpu=True) is False


def _reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs, start_warmup_value):
    """The reference's per-iteration schedule, re-derived from its description: np.linspace warm-up, then cosine."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def test_schedule_equals_the_reference():
    expected = _reference_cosine_scheduler(
        1e-4, 1e-8, epochs=10, niter_per_ep=7, warmup_epochs=3, start_warmup_value=1e-8
    )
    ours = [reference_lr(step, 1e-4, 1e-8, num_training_steps=70, num_warmup_steps=21) for step in range(70)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
    assert ours[0] == 1e-8 and ours[20] == pytest.approx(1e-4) and ours[21] == pytest.approx(1e-4)


def test_trainer_warms_up_three_epochs_of_its_sampler(tiny_clip_path, digits, tmp_path):
    """The Trainer's scheduler: warm-up over 3 epochs of the real/synthetic sampler, then the cosine to 1e-8."""
    from transformers import CLIPProcessor

    from datadream_hf.classify.augment import EvalTransform
    from datadream_hf.classify.data import ImageClassificationDataset
    from datadream_hf.classify.modeling import CLIPLoRAClassifier
    from datadream_hf.classify.trainer import MixedRealSyntheticTrainer

    processor = CLIPProcessor.from_pretrained(tiny_clip_path)
    train = digits["train"].select(range(40))
    dataset = ImageClassificationDataset(train, None, EvalTransform(processor.image_processor))
    args = DataDreamTrainingArguments(
        output_dir=str(tmp_path), train_mode="real", per_device_train_batch_size=8, num_train_epochs=10,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
    )  # fmt: skip
    model = CLIPLoRAClassifier.from_clip_pretrained(tiny_clip_path, list(digits["train"].features["label"].names))
    trainer = MixedRealSyntheticTrainer(model=model, args=args, train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=50)  # 40 images / 8 = 5 steps per epoch
    lrs = []
    for _ in range(50):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = _reference_cosine_scheduler(
        1e-4, 1e-8, epochs=10, niter_per_ep=5, warmup_epochs=3, start_warmup_value=1e-8
    )
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)


# ---- honest test splits ------------------------------------------------------------------------------------------


def _png(value: int) -> bytes:
    pixels = np.full((6, 6, 3), value % 256, dtype=np.uint8)
    pixels[0, 0] = [value // 256, 7, 7]
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root: Path, start: int, per_class: int = 6) -> str:
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png(start + 50 * c + i))
    return str(root)


@pytest.fixture
def image_folder_run(tmp_path):
    """An image folder (no splits) as the real data, and a K=2 manifest over it."""
    folder = _folder(tmp_path / "images", start=0)
    draw_few_shot(load_image_folder(folder), k=2, seed=0).save(tmp_path / "m.json")
    return tmp_path, folder


def _load(tmp_path, folder, **overrides):
    args = ClassifierArguments(real_dataset=folder, few_shot_manifest=str(tmp_path / "m.json"), **overrides)
    training_args = DataDreamTrainingArguments(output_dir=str(tmp_path / "run"), train_mode="real", use_cpu=True)
    return load_classifier_data(args, training_args)


def test_image_folder_without_a_test_source_is_refused(image_folder_run):
    """The default `--test_split test` of an image folder is the folder itself, K-shot images included."""
    tmp_path, folder = image_folder_run
    with pytest.raises(DatasetInputError, match=r"the source has no splits.*not held out.*--test_per_class"):
        _load(tmp_path, folder)
    with pytest.raises(DatasetInputError, match=r"not held out"):  # the same folder by another spelling
        _load(tmp_path, folder, test_dataset=str(Path(folder) / ".." / "images"))
    copy = shutil.copytree(folder, tmp_path / "copy")  # the same images in another folder
    with pytest.raises(DatasetInputError, match=r"holds \d+ image\(s\) identical to K-shot training or validation"):
        _load(tmp_path, folder, test_dataset=str(copy))


def test_validation_split_of_the_k_shot_table_is_refused(digits_path, digits_manifest_path, tmp_path):
    args = ClassifierArguments(real_dataset=digits_path, few_shot_manifest=digits_manifest_path,
                               validation_split="train")  # fmt: skip
    training_args = DataDreamTrainingArguments(output_dir=str(tmp_path), train_mode="real", use_cpu=True)
    with pytest.raises(DatasetInputError, match=r"The validation data .* not held out"):
        load_classifier_data(args, training_args)


def test_test_sources_hold_no_training_or_validation_image(image_folder_run):
    tmp_path, folder = image_folder_run
    carved = _load(tmp_path, folder, validation_per_class=2, test_per_class=2)
    train, validation, test = (image_digests(carved[k]) for k in ("real_train", "validation", "test"))
    assert len(train) == len(validation) == len(test) == 4
    assert not set(test) & (set(train) | set(validation)) and not set(train) & set(validation)
    assert "outside the K-shot subset and the validation images, up to 2 per class" in carved["test_source"]
    assert carved["test_source"].endswith("(held out: no image of it is a training or validation image)")

    other = _folder(tmp_path / "held_out", start=1000, per_class=3)
    separate = _load(tmp_path, folder, test_dataset=other)
    assert len(separate["test"]) == 6 and f"real data {other}" in separate["test_source"]
    assert separate["test"].features["label"].names == ["cat", "dog"]


def test_report_says_where_the_test_images_come_from(image_folder_run, tiny_clip_path):
    """A whole stage-3 run on an image folder with a carved test set: the report names the carve."""
    tmp_path, folder = image_folder_run
    script = _load_script()
    report = script.main(script.parse_args([
        "--model_name_or_path", tiny_clip_path, "--real_dataset", folder, "--few_shot_manifest",
        str(tmp_path / "m.json"), "--train_mode", "real", "--test_per_class", "2", "--validation_per_class", "1",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--augmentation", "none", "--use_cpu",
        "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true",
    ]))  # fmt: skip
    source = report["evaluations"]["test"]["source"]
    assert "outside the K-shot subset and the validation images" in source and "held out" in source
    assert report["evaluations"]["test"]["num_examples"] == 4
    assert json.loads((tmp_path / "run" / "report.json").read_text())["evaluations"]["test"]["source"] == source


# ---- EXIF orientation ---------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_when_images_are_decoded(tmp_path):
    """A JPEG stored sideways with EXIF Orientation 6 (rotate 90 degrees clockwise to view) decodes upright."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    pixels[:, :20] = 255  # left half white
    image = PILImage.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    (tmp_path / "cls").mkdir()
    image.save(tmp_path / "cls" / "sideways.jpg", exif=exif.tobytes(), quality=95)
    (decoded,) = decode_images(load_image_folder(tmp_path))
    assert decoded.size == (20, 40)  # upright: 20 wide, 40 high
    top, bottom = np.asarray(decoded)[:20].mean(), np.asarray(decoded)[20:].mean()
    assert top > 200 and bottom < 50  # the white left half is now on top
