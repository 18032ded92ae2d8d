"""The shared input checks (`datadream_hf.validation` and the checks built on it), table by table: every numeric
setting of every stage and of `datadream-hf` has a declared range that refuses NaN, infinities, wrong types and values
outside it; JSON never holds NaN; the K-shot manifest is verified against its data; image folders skip nothing
silently; classes that would become one are refused; every atomic write cleans up after a failure; and a run whose
loss or weights stop being finite stops without writing them (the fp16 loss-scaler skip excepted).

The stage-level cases (a refusal before any model loads, nothing written) are in `test_reliability.py`'s input table.
"""

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import types
import typing
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file, save_file

import datadream_hf.faults as faults
from datadream_hf.adapt.checkpoints import list_checkpoints, save_checkpoint
from datadream_hf.adapt.config import AdapterHubArguments, GeneratorTrainingConfig
from datadream_hf.adapt.data import FewShotData
from datadream_hf.adapt.modeling import build_unit_optimizer, load_generator_models, save_adapter_atomic
from datadream_hf.adapt.train import train_generator
from datadream_hf.adapter_index import ADAPTER_INDEX_NAME, read_adapter_index
from datadream_hf.classify.config import ClassifierArguments, DataDreamTrainingArguments
from datadream_hf.classify.modeling import ADAPTER_WEIGHTS_NAME, CLIPLoRAClassifier
from datadream_hf.cli import NUMERIC_RANGES as CLI_RANGES
from datadream_hf.cli import build_parser
from datadream_hf.cli import main as cli_main
from datadream_hf.data import DatasetInputError, load_image_folder, load_labelled_dataset
from datadream_hf.few_shot import FewShotManifest, draw_few_shot
from datadream_hf.files import atomic_write, save_png_atomic, write_json_atomic, write_text_atomic
from datadream_hf.generate.config import GenerationArguments, GenerationConfig, GenerationInputError
from datadream_hf.lora import LORA_WEIGHT_NAME
from datadream_hf.prompts import PromptTemplate
from datadream_hf.run_folder import class_folder_name
from datadream_hf.synthetic import Shard, write_shard
from datadream_hf.testing import write_fake_stage1_output
from datadream_hf.validation import SEED_MAX, NonFiniteError, Range, integer, number

CLASSES = ["zero", "one"]

# --- 1. every numeric setting has a declared range ----------------------------------------------------------------

# Each config dataclass, and what it needs besides the value under test.
CONFIGS = {
    GeneratorTrainingConfig: {"pretrained_model_name_or_path": "some/model"},
    AdapterHubArguments: {},
    GenerationConfig: {},
    GenerationArguments: {"pretrained_model_name_or_path": "some/model", "no_adapter": True, "class_names": ["a"]},
    ClassifierArguments: {"real_dataset": "some/dataset"},
    DataDreamTrainingArguments: {"output_dir": "unused"},
}


def numeric_fields(cls) -> list[str]:
    """The fields of a dataclass (inherited ones included) whose type is, or may be, an int or a float."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = typing.get_args(hint) if union else (hint,)
        if any(member in (int, float) for member in members):
            found.append(f.name)
    return found


@pytest.mark.parametrize("cls", list(CONFIGS), ids=lambda cls: cls.__name__)
def test_every_numeric_field_of_every_config_has_a_declared_range(cls):
    """A field added later without a range fails here, so no number reaches a run unchecked."""
    declared = getattr(cls, "NUMERIC_RANGES", {})
    fields = numeric_fields(cls)
    assert sorted(set(fields) - set(declared)) == [], f"{cls.__name__}: numeric fields without a declared range"
    assert sorted(set(declared) - {f.name for f in dataclasses.fields(cls)}) == [], "ranges of unknown fields"
    cls(**CONFIGS[cls])  # the defaults are inside their ranges


def test_every_numeric_option_of_the_cli_has_a_declared_range():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        numeric = {a.dest for a in command._actions if a.type in (int, float)}
        assert numeric <= set(CLI_RANGES.get(name, {})), f"`datadream-hf {name}`: numeric options without a range"
    assert CLI_RANGES["few-shot"].keys() == {"k", "seed"}


def bad_values(allowed: Range) -> list:
    """Values `allowed` must refuse: non-finite, wrong types, just outside each end, off the multiple."""
    values = [math.nan, math.inf, -math.inf, "1", True]
    if allowed.integer:
        values.append(max(allowed.low, 0) + 0.5)  # a float where an integer is due
    if not allowed.optional:
        values.append(None)
    step = 1 if allowed.integer else 1e-9
    if math.isfinite(allowed.low):
        values.append(allowed.low if allowed.low_open else allowed.low - step)
    if math.isfinite(allowed.high):
        values.append(allowed.high if allowed.high_open else allowed.high + max(step, allowed.high * 1e-6))
        values[-1] = int(values[-1]) if allowed.integer else values[-1]
    if allowed.multiple_of:
        values.append(int(allowed.low) + 1)
    return values


FIELD_CASES = [
    pytest.param(cls, name, id=f"{cls.__name__}.{name}")
    for cls in CONFIGS
    for name in getattr(cls, "NUMERIC_RANGES", {})
]


@pytest.mark.parametrize("cls, name", FIELD_CASES)
def test_each_numeric_setting_refuses_values_outside_its_range(cls, name):
    """NaN, infinities, text, booleans, None (unless optional), floats for integers, just past each end: each refused
    with an error that names the flag, the value and the allowed range."""
    allowed = cls.NUMERIC_RANGES[name]
    for value in bad_values(allowed):
        with pytest.raises(ValueError) as raised:
            cls(**{**CONFIGS[cls], name: value})
        message = str(raised.value)
        assert f"`--{name}` = {value!r} is invalid" in message and allowed.describe() in message, message


def test_edges_of_the_ranges_are_accepted():
    GeneratorTrainingConfig(pretrained_model_name_or_path="m", resolution=8, learning_rate=1.0, adam_beta1=0.0,
                            adam_weight_decay=0.0, lr_warmup_steps=0, seed=SEED_MAX, max_train_steps=None)  # fmt: skip
    GenerationConfig(guidance_scale=0.0, seed=0, resolution=None, images_per_class=1)
    ClassifierArguments(real_dataset="d", lora_dropout=0.0, synthetic_images_per_class=None)
    DataDreamTrainingArguments(output_dir="unused", real_loss_weight=0.0, mix_probability=1.0, max_grad_norm=0.0,
                               max_steps=-1, warmup_steps=0.1)  # fmt: skip


@pytest.mark.parametrize(
    "allowed, text",
    [
        (integer(1), "an integer >= 1"),
        (integer(8, 4096, multiple_of=8).or_none(), "an integer in [8, 4096], a multiple of 8, or None"),
        (number(0, 1, high_open=True), "a finite number in [0, 1)"),
        (number(0, low_open=True), "a finite number > 0"),
        (number(0, 1, low_open=True).with_hint("paper: 1e-4"), "a finite number in (0, 1]"),
    ],
)
def test_ranges_describe_themselves(allowed, text):
    assert allowed.describe() == text


def test_huge_integers_are_compared_not_converted():
    assert integer(1).allows(10**400) and not integer(1, 10).allows(10**400)  # no OverflowError
    assert not number(0).allows(math.inf) and not number(0).allows(math.nan)


STAGE1 = ["--pretrained_model_name_or_path", "m", "--dataset", "d", "--few_shot_manifest", "f.json"]


@pytest.mark.parametrize(
    "script, flags, culprit",
    [
        ("train_datadream_lora", [*STAGE1, "--learning_rate", "nan"], "learning_rate"),
        ("train_datadream_lora", [*STAGE1, "--max_grad_norm", "inf"], "max_grad_norm"),
        ("generate_synthetic", ["--pretrained_model_name_or_path", "m", "--no_adapter", "--class_names", "a",
                                "--guidance_scale", "nan"], "guidance_scale"),
        ("train_classifier", ["--real_dataset", "d", "--train_mode", "synthetic", "--synthetic_dataset", "s",
                              "--output_dir", "unused", "--weight_decay=-inf"], "weight_decay"),
        ("train_classifier", ["--real_dataset", "d", "--train_mode", "synthetic", "--synthetic_dataset", "s",
                              "--output_dir", "unused", "--real_loss_weight", "nan"], "real_loss_weight"),
    ],
)  # fmt: skip
def test_script_flags_are_checked_when_parsed(script, flags, culprit, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "training_scripts"))
    module = __import__(script)
    with pytest.raises(ValueError, match=rf"`--{culprit}` = .* is invalid: use a finite number"):
        module.parse_args(flags)


def test_a_yaml_number_read_as_text_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "training_scripts"))
    import train_datadream_lora

    config = tmp_path / "stage1.yaml"
    config.write_text("pretrained_model_name_or_path: m\nlearning_rate: 1e-4\n")  # PyYAML reads 1e-4 as a string
    with pytest.raises(ValueError, match=r"`--learning_rate` = '1e-4' is invalid.*YAML reads e\.g\. 1e-4 as text"):
        train_datadream_lora.parse_args([str(config)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--k", "0"], r"`--k` = 0 is invalid: use an integer >= 1, or None \(K, the real images per class"),
        (["--k", "-3"], r"`--k` = -3 is invalid"),
        (["--seed", "-1"], r"`--seed` = -1 is invalid: use an integer in \[0, 4294967295\]"),
        (["--seed", str(2**40)], r"`--seed` = 1099511627776 is invalid"),
    ],
)
def test_cli_refuses_bad_numbers_before_reading_the_dataset(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cli_main(["few-shot", "--dataset", str(tmp_path / "missing"), "--output", str(tmp_path / "m.json"), *flags])
    assert not (tmp_path / "m.json").exists()


def test_the_cli_command_reports_a_bad_number_in_one_line(tmp_path, capsys, monkeypatch):
    from datadream_hf.cli import console_main

    monkeypatch.setattr("sys.argv", ["datadream-hf", "few-shot", "--dataset", str(tmp_path), "--output", "m.json",
                                     "--k", "0"])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        console_main()
    assert exited.value.code == 1
    assert re.fullmatch(r"datadream-hf: error: `--k` = 0 is invalid: .*\n", capsys.readouterr().err)
    with pytest.raises(SystemExit) as exited:  # not even a number: argparse's own usage error
        cli_main(["few-shot", "--dataset", str(tmp_path), "--output", "m.json", "--k", "nan"])
    assert exited.value.code == 2


# --- 2. JSON never holds NaN --------------------------------------------------------------------------------------


def test_json_writer_refuses_nan_naming_the_key_and_writes_nothing(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ValueError, match=r"config\.json'.*log_history\.1\.loss is nan, which JSON cannot hold"):
        write_json_atomic(path, {"log_history": [{"loss": 1.0}, {"loss": math.nan}], "lr": math.inf})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(path, {"loss": 1.0})
    assert json.loads(path.read_text()) == {"loss": 1.0}


# --- 3. the K-shot manifest is verified against the data it names -------------------------------------------------


@pytest.fixture(scope="module")
def two_classes():
    """6 rows: labels 0, 1, 0, 1, 0, 1 (cat, dog)."""
    images = [Image.new("RGB", (4, 4), (40 * i, 0, 0)) for i in range(6)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "dog"])})
    return Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features)


def _manifest_with(dataset, **edits) -> dict:
    payload = json.loads(json.dumps(dataclasses.asdict(draw_few_shot(dataset, k=2, seed=0))))
    del payload["path"]
    for key, value in edits.items():
        *parents, last = key.split(".")
        target = payload
        for parent in parents:
            target = target[int(parent)] if isinstance(target, list) else target[parent]
        target[int(last) if isinstance(target, list) else last] = value
    return payload


MANIFEST_CASES = {
    # edits of a valid manifest (cat: rows 0, 2 or 4; dog: rows 1, 3 or 5) -> the error
    "negative row": ({"indices.0.0": -1}, r"class 'cat': row -1 is not a row number"),
    "row past the end": ({"indices.1.0": 7}, r"class 'dog': row 7 is past the end of the dataset \(6 rows\)"),
    "huge row": ({"indices.1.0": 10**30}, r"class 'dog': row 10{30} is past the end"),
    "row as text": ({"indices.0.1": "2"}, r"class 'cat': row '2' is not a row number"),
    "row as a float": ({"indices.0.1": 2.0}, r"class 'cat': row 2\.0 is not a row number"),
    "row as a boolean": ({"indices.0.1": True}, r"class 'cat': row True is not a row number"),
    "row of another class": ({"indices": [[1, 2], [3, 5]]}, r"class 'cat': row 1 is labelled 'dog', not 'cat'"),
    "row listed twice in a class": ({"indices.1": [3, 3]}, r"row 3 is listed twice \(class 'dog' and class 'dog'\)"),
    "row under two classes": ({"indices": [[0, 2], [0, 3]]}, r"row 0 is listed twice \(class 'cat' and class 'dog'\)"),
    "fewer rows than K": ({"indices.1": [1]}, r"class 'dog' lists 1 rows, expected a list of K=2"),
    "K of zero": ({"k": 0}, r"field 'k' = 0 is invalid: use an integer >= 1"),
    "negative seed": ({"seed": -4}, r"field 'seed' = -4 is invalid"),
    "indices not lists": ({"indices": {"0": [0]}}, r"'class_names' and 'indices' must be lists"),
    "one index list missing": ({"indices": [[0, 2]]}, r"lists 2 classes but 1 index lists"),
    "another dataset's fingerprint": ({"source.fingerprint": "0" * 16}, r"fingerprint .* differs from the manifest's"),
    "renamed class": ({"class_names": ["cat", "wolf"]}, r"classes \['cat', 'wolf'\]\.\.\. differ from the dataset's"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_hand_edited_manifest_is_refused_naming_file_class_and_row(case, two_classes, tmp_path):
    edits, message = MANIFEST_CASES[case]
    path = tmp_path / "edited_manifest.json"
    path.write_text(json.dumps(_manifest_with(two_classes, **edits)))
    with pytest.raises(DatasetInputError, match=message) as raised:
        FewShotManifest.load(path).select(two_classes)
    assert "edited_manifest.json" in str(raised.value)


def test_a_valid_manifest_round_trips_and_selects_its_rows(two_classes, tmp_path):
    manifest = draw_few_shot(two_classes, k=2, seed=0)
    manifest.save(tmp_path / "m.json")
    assert "path" not in json.loads((tmp_path / "m.json").read_text())
    loaded = FewShotManifest.load(tmp_path / "m.json")
    assert loaded == manifest and loaded.path == str(tmp_path / "m.json")
    assert list(loaded.select(two_classes)["label"]) == [0, 0, 1, 1]


# --- 4. image folders: nothing skipped silently -------------------------------------------------------------------


def _folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "dog" / "2.png").symlink_to(root / "gone.png"), r"dog/2\.png' is a link to a missing"),
        (lambda root: (root / "bird").symlink_to(root / "gone"), r"images/bird' is a link to a missing file"),
    ],
    ids=["broken link to an image", "broken link to a class folder"],
)
def test_a_broken_link_is_refused_naming_it(damage, message, tmp_path):
    root = _folder(tmp_path)
    damage(root)
    with pytest.raises(DatasetInputError, match=message):
        load_image_folder(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_image_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path)
    (root / "dog" / "1.png").chmod(0)
    with pytest.raises(DatasetInputError, match=r"dog/1\.png' cannot be read"):
        load_image_folder(root)


def test_other_entries_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    root = _folder(tmp_path)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "more").mkdir()
    (root / "dog" / ".DS_Store").write_bytes(b"")  # hidden: ignored without a word
    (root / "README.md").write_text("the root may hold other files")
    dataset = load_image_folder(root)
    assert len(dataset) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "['more', 'notes.txt']" in warnings[0] and "dog" in warnings[0]


# --- 5. classes that would become one -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, template, clash",
    [
        (["Boeing 747", "boeing 747"], PromptTemplate(), ("Boeing 747", "boeing 747")),
        (["café", "cafe"], PromptTemplate(), ("café", "cafe")),
        (["snow  leopard", "snow leopard"], PromptTemplate(), ("snow  leopard", "snow leopard")),
        (["a", "Ｂ", "b"], PromptTemplate(), ("Ｂ", "b")),  # full-width letter
        (["snow_leopard", "snow leopard"], PromptTemplate(clean_class_names=True), ("snow_leopard", "snow leopard")),
        (["snow_leopard", "snow leopard"], PromptTemplate(), None),  # raw names: "_" stays, the prompts differ
        (["cat", "dog", "Cat's toy"], PromptTemplate(), None),
    ],
)
def test_classes_whose_prompts_differ_only_in_case_accents_or_spacing_are_refused(names, template, clash):
    if clash is None:
        template.check_distinct(names)
        return
    with pytest.raises(ValueError, match=rf"Classes {clash[0]!r} and {clash[1]!r} get prompts that differ only"):
        template.check_distinct(names)


def test_a_cls_index_pointing_two_classes_at_one_adapter_is_refused(tiny_sd_path, tmp_path):
    folder = write_fake_stage1_output(tmp_path / "cls", tiny_sd_path, CLASSES)
    index = json.loads((Path(folder) / ADAPTER_INDEX_NAME).read_text())
    index["adapters"]["1"] = "./" + index["adapters"]["0"]  # another spelling of the same folder
    (Path(folder) / ADAPTER_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"classes 'zero' and 'one' point at the same adapter folder"):
        read_adapter_index(folder)
    dset = write_fake_stage1_output(tmp_path / "dset", tiny_sd_path, CLASSES, mode="dset")
    assert read_adapter_index(dset)["adapters"] == {"all": "."}  # dset: one adapter for every class, by design


# --- 6. every atomic write cleans up after a failure ---------------------------------------------------------------


@pytest.fixture(scope="module")
def writers(tiny_sd_path, tiny_clip_path):
    """What the writers write: tiny stage-1 models with their LoRA, and a tiny classifier."""
    return types.SimpleNamespace(
        models=load_generator_models(GeneratorTrainingConfig(pretrained_model_name_or_path=tiny_sd_path, rank=4)),
        classifier=CLIPLoRAClassifier.from_clip_pretrained(tiny_clip_path, CLASSES),
    )


def _checkpoint_args(models):
    config = GeneratorTrainingConfig(pretrained_model_name_or_path="m")
    state = build_unit_optimizer(models.trainable_parameters(), config, num_steps=2, device_type="cpu")
    return state.parameters, state.optimizer, state.lr_scheduler, state.grad_scaler, {"unit": "all"}


# name -> (write(folder, writers), whether the destination is a folder, its fault point)
WRITERS = {
    "JSON": (lambda d, m: write_json_atomic(d / "a.json", {"a": 1}) or d / "a.json", False, None),
    "text": (lambda d, m: write_text_atomic(d / "README.md", "# card") or d / "README.md", False, None),
    "PNG": (lambda d, m: save_png_atomic(Image.new("RGB", (2, 2)), d / "grid.png"), False, None),
    "stage-2 shard": (
        lambda d, m: write_shard(d, Shard(0, 0, 1), ["a"], {"label": [0], "image_index": [0], "seed": [0],
                                                          "prompt": ["p"], "image": [b"png"]}, "fp"),
        False, "shard-write"),
    "stage-1 checkpoint": (lambda d, w: save_checkpoint(d, 1, *_checkpoint_args(w.models)), True,
                           "checkpoint-write"),
    "stage-1 adapter": (lambda d, w: save_adapter_atomic(w.models, d), False, "adapter-write"),
    "classifier adapter": (lambda d, w: w.classifier.save_pretrained(d), False, None),
}  # fmt: skip
DESTINATIONS = {
    "JSON": "a.json",
    "text": "README.md",
    "PNG": "grid.png",
    "stage-2 shard": Shard(0, 0, 1).relative_path(["a"]),
    "stage-1 checkpoint": "checkpoint-1",
    "stage-1 adapter": LORA_WEIGHT_NAME,
    "classifier adapter": ADAPTER_WEIGHTS_NAME,
}


def leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


WRITE_FAULTS = [
    (writer, fault)
    for writer, (_, _, point) in WRITERS.items()
    for fault in ("destination blocked", "rename fails (disk full)", "fault point (disk full)")
    if point is not None or not fault.startswith("fault point")
]


@pytest.mark.parametrize("writer, fault", WRITE_FAULTS, ids=[f"{w}: {f}" for w, f in WRITE_FAULTS])
def test_a_failed_atomic_write_leaves_no_temp_file_and_no_half_output(writer, fault, writers, tmp_path, monkeypatch):
    write, is_folder, point = WRITERS[writer]
    destination = tmp_path / DESTINATIONS[writer]
    destination.parent.mkdir(parents=True, exist_ok=True)
    if fault == "destination blocked":  # a folder where a file goes (a file where a folder goes)
        destination.write_text("in the way") if is_folder else (destination / "x").mkdir(parents=True)
    elif fault == "rename fails (disk full)":
        real_replace = os.replace

        def full(src, dst, **kwargs):
            if Path(dst).name == destination.name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", full)
    else:
        monkeypatch.setenv(faults.FAIL_AT_ENV, f"{point}:1")
        monkeypatch.setattr(faults, "_hits", faults.Counter())
    with pytest.raises(OSError):
        write(tmp_path, writers)
    assert leftovers(tmp_path) == []
    if fault == "destination blocked":
        assert destination.is_file() if is_folder else (destination / "x").is_dir()
        return
    assert not destination.exists()
    monkeypatch.undo()
    write(tmp_path, writers)  # the next attempt writes it
    assert destination.exists() and leftovers(tmp_path) == []


def test_atomic_write_removes_its_temp_file_when_the_block_fails(tmp_path):
    with pytest.raises(OSError, match="No space"):
        with atomic_write(tmp_path / "x.bin", "wb") as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --- 7. the second line of defence: non-finite losses, weights and images ------------------------------------------


@pytest.mark.parametrize("writer", ["stage-1 checkpoint", "stage-1 adapter", "classifier adapter"])
def test_weights_holding_nan_are_never_written(writer, writers, tmp_path):
    module = writers.classifier if writer == "classifier adapter" else writers.models.unet
    parameter = next(p for n, p in module.named_parameters() if "lora_B" in n)
    saved = parameter.detach().clone()
    parameter.data[0, 0] = math.nan
    try:
        with pytest.raises(NonFiniteError, match=r"Refusing to write .* 1 weight tensor\(s\) hold NaN or inf"):
            WRITERS[writer][0](tmp_path, writers)
    finally:
        parameter.data.copy_(saved)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def _poisoned_copy(source: str, target: Path, weights_file: str, key_part: str) -> str:
    """A copy of a model folder with one weight of `weights_file` set to inf (damaged or diverged base weights)."""
    shutil.copytree(source, target)
    weights = load_file(str(target / weights_file))
    key = next(k for k in sorted(weights) if key_part in k)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = math.inf
    save_file(weights, str(target / weights_file))
    return str(target)


@pytest.fixture(scope="module")
def few_shot_data(digits):
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    return FewShotData.from_dataset(dataset, draw_few_shot(dataset, k=2, seed=0))


def stage1_config(model, output_dir, **overrides):
    return GeneratorTrainingConfig(**{
        "pretrained_model_name_or_path": model, "output_dir": str(output_dir), "resolution": 32, "rank": 4,
        "train_batch_size": 2, "max_train_steps": 3, "lr_warmup_steps": 0, "learning_rate": 1e-3,
        "checkpointing_steps": 1, "report_to": None, **overrides,
    })  # fmt: skip


@pytest.mark.parametrize("strategy", ["dset", "cls sequential", "cls grouped"])
def test_stage1_stops_on_a_nan_loss_and_writes_no_adapter(strategy, tiny_sd_path, few_shot_data, tmp_path):
    model = _poisoned_copy(tiny_sd_path, tmp_path / "poisoned", "unet/diffusion_pytorch_model.safetensors",
                           "conv_in.weight")  # fmt: skip
    mode, _, cls_strategy = strategy.partition(" ")
    out = tmp_path / "out"
    config = stage1_config(model, out, mode=mode, cls_strategy=cls_strategy or "sequential")
    with pytest.raises(NonFiniteError, match=r"Training of adapter '(all|zero)' diverged: the loss is nan at step 1"):
        train_generator(config, few_shot_data, Accelerator(cpu=True))
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [".datadream.lock", "datadream_config.json"]  # the run record; no checkpoint, no adapter


def _huge_first_loss_scale(scaler):
    """The first step's scaled gradients overflow in fp16 (scale 2**120), then the scale backs off to 2**20."""
    if hasattr(scaler, "scales"):  # the grouped scaler: only class 0 overflows
        scaler.scales[0], scaler.backoff_factor = 2.0**120, 2.0**-100
    else:
        scaler.load_state_dict({"scale": 2.0**120, "growth_factor": 2.0, "backoff_factor": 2.0**-100,
                                "growth_interval": 2000, "_growth_tracker": 0})  # fmt: skip


@pytest.mark.parametrize("cls_strategy", ["sequential", "grouped"])
def test_an_fp16_loss_scaler_skip_still_trains(cls_strategy, tiny_sd_path, few_shot_data, tmp_path, monkeypatch):
    """The legitimate non-finite case: scaled fp16 gradients overflow, the scaler skips the step, training goes on."""
    import datadream_hf.adapt.grouped.loop
    import datadream_hf.adapt.sequential

    module = datadream_hf.adapt.grouped.loop if cls_strategy == "grouped" else datadream_hf.adapt.sequential

    def build(*args, **kwargs):
        state = build_unit_optimizer(*args, **kwargs)
        _huge_first_loss_scale(state.grad_scaler)
        return state

    monkeypatch.setattr(module, "build_unit_optimizer", build)
    out = tmp_path / "out"
    config = stage1_config(tiny_sd_path, out, mode="cls", cls_strategy=cls_strategy, mixed_precision="fp16")
    train_generator(config, few_shot_data, Accelerator(cpu=True))
    zero = out / class_folder_name(0, "zero")
    state = json.loads((list_checkpoints(zero)[0] / "training_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0**20  # step 1 overflowed and was skipped
    for i, name in enumerate(CLASSES):
        weights = load_file(str(out / class_folder_name(i, name) / LORA_WEIGHT_NAME))
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_stage3_stops_on_a_nan_loss_and_writes_no_adapter(tiny_clip_path, digits_path, digits_manifest_path, tmp_path):
    from datadream_hf.classify.train import train_classifier

    model = _poisoned_copy(tiny_clip_path, tmp_path / "poisoned", "model.safetensors", "patch_embedding")
    out = tmp_path / "out"
    args = ClassifierArguments(model_name_or_path=model, real_dataset=digits_path,
                               few_shot_manifest=digits_manifest_path, validation_per_class=2)  # fmt: skip
    training_args = DataDreamTrainingArguments(output_dir=str(out), train_mode="real", max_steps=3, save_steps=1,
                                               save_strategy="steps", augmentation="none", report_to="none",
                                               disable_tqdm=True)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"Training of the classifier diverged: the loss is nan at step 1"):
        train_classifier(args, training_args)
    assert not list(out.glob("checkpoint-*")) and not (out / ADAPTER_WEIGHTS_NAME).exists()


def test_stage2_refuses_an_adapter_holding_nan_before_any_image(tiny_sd_path, tmp_path):
    from datadream_hf.generate.run import generate_synthetic_dataset

    folder = Path(write_fake_stage1_output(tmp_path / "adapters", tiny_sd_path, CLASSES))
    path = folder / class_folder_name(1, "one") / LORA_WEIGHT_NAME
    weights = load_file(str(path))
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], math.nan)
    save_file(weights, str(path))
    args = GenerationArguments(pretrained_model_name_or_path=tiny_sd_path, adapter_path=str(folder),
                               output_dir=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(GenerationInputError, match=rf"0001_one.*holds NaN or inf in LoRA weight '{key}'"):
        generate_synthetic_dataset(args, GenerationConfig(images_per_class=1, num_inference_steps=1))
    assert not (tmp_path / "out" / "shards").exists()
