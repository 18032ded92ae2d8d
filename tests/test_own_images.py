"""A user's own image folder, in either layout `datasets`' imagefolder reads: `root/<class>/<image>` (one split) and
`root/<split>/<class>/<image>` (splits); and `datadream-hf tiny-world --recipe` commands run as printed on it."""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from datadream_hf.cli import main as cli_main
from datadream_hf.data import (
    DatasetInputError,
    image_folder_splits,
    is_single_table,
    load_labelled_dataset,
    local_split_names,
)
from datadream_hf.tiny_world.world import tiny_world_paths

REPO = Path(__file__).resolve().parents[1]


def write_digit_folder(root: Path, digits, layout: dict[str, int], classes=(0, 1)) -> Path:
    """`root/<split>/<class>/<row>.png` with `layout[split]` digit images per class (split "" : no split folder)."""
    for split, count in layout.items():
        dataset = digits["test" if split == "test" else "train"]
        names, labels = dataset.features["label"].names, dataset["label"]
        for label in classes:
            folder = root / split / names[label] if split else root / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            for row in [i for i, value in enumerate(labels) if value == label][:count]:
                dataset[row]["image"].save(folder / f"{row}.png")
    return root


def test_split_folders_load_as_splits_and_class_folders_as_one(digits, tmp_path):
    split_root = write_digit_folder(tmp_path / "splits", digits, {"train": 5, "test": 3, "val": 2})
    assert {name: path.name for name, path in image_folder_splits(split_root).items()} == {
        "test": "test", "train": "train", "validation": "val"}  # fmt: skip
    train, test = (load_labelled_dataset(str(split_root), split=s) for s in ("train", "test"))
    assert len(train) == 10 and len(test) == 6
    assert train.features["label"].names == test.features["label"].names == ["one", "zero"]  # imagefolder's order
    for name in ("validation", "val"):
        assert len(load_labelled_dataset(str(split_root), split=name)) == 4
    assert not is_single_table(str(split_root)) and local_split_names(str(split_root)) == [
        "test",
        "train",
        "validation",
    ]
    with pytest.raises(DatasetInputError, match=r"Split 'nope' has no folder.*splits: test \(test/\), train"):
        load_labelled_dataset(str(split_root), split="nope")
    # A folder of class folders stays one split, whatever `split` says; classes named like splits stay classes.
    flat = write_digit_folder(tmp_path / "flat", digits, {"": 3})
    assert image_folder_splits(flat) == {} and is_single_table(str(flat)) and local_split_names(str(flat)) == []
    assert len(load_labelled_dataset(str(flat), split="test")) == 6
    (flat / "zero").rename(flat / "test")
    assert load_labelled_dataset(str(flat)).features["label"].names == ["one", "test"]


def test_a_class_missing_from_one_split_keeps_the_labels_of_all_splits(digits, tmp_path):
    root = write_digit_folder(tmp_path / "data", digits, {"train": 3, "test": 2})
    for image in (root / "test" / "one").iterdir():
        image.unlink()
    (root / "test" / "one").rmdir()
    test = load_labelled_dataset(str(root), split="test")
    assert test.features["label"].names == ["one", "zero"] and set(test["label"]) == {1}
    with pytest.raises(DatasetInputError, match=r"\['two'\] have no sub-folder in any split"):
        load_labelled_dataset(str(root), split="test", class_names=["zero", "two"])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r: (r / "cat").mkdir(), r"mixes split folders \(test, train\) with folders that hold no class folder "
                                         r"\(cat\)"),
        (lambda r: [(r / name / "x").mkdir(parents=True) for name in ("valid", "validation")],
         r"two folders of split 'validation': 'valid' and 'validation'"),
        (lambda r: (r / "test" / "one" / "sub").mkdir() or [p.unlink() for p in (r / "test" / "one").glob("*.png")],
         r"test/one' holds no image file"),
    ],
    ids=["split and class folders", "two folders of one split", "empty class folder in a split"],
)  # fmt: skip
def test_ambiguous_split_folders_are_refused_naming_them(digits, tmp_path, make, match):
    root = write_digit_folder(tmp_path / "data", digits, {"train": 3, "test": 2})
    make(root)
    with pytest.raises(DatasetInputError, match=match):
        load_labelled_dataset(str(root), split="test")


def test_split_folders_given_as_classes_say_what_they_look_like(digits, tmp_path):
    root = write_digit_folder(tmp_path / "data", digits, {"Train": 3, "Test": 2})  # not names imagefolder knows
    with pytest.raises(DatasetInputError, match=r"Test' holds no image file.*holds folders \(one, zero\): a split "
                                                r"folder is named .*test.*train"):  # fmt: skip
        load_labelled_dataset(str(root))


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# Appended to the printed commands (a flag given twice: the last wins), so that the test takes seconds.
TINY_STEPS = {
    "train_datadream_lora.py": ["--num_train_epochs", "1", "--lr_warmup_steps", "0", "--report_to", "none"],
    "generate_synthetic.py": ["--images_per_class", "2", "--num_inference_steps", "2"],
    "train_classifier.py": ["--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--warmup_steps", "0",
                            "--per_device_train_batch_size", "4", "--report_to", "none"],
}  # fmt: skip


def run_printed(command: str, overrides: dict) -> None:
    """Runs one printed command in this process: `datadream-hf ...` through the CLI, `accelerate launch X.py` and
    `python X.py` through the script's own parse_args + main (the launcher is not what is tested)."""
    words = shlex.split(command)
    if words[0] == "datadream-hf":
        cli_main(words[1:])
        return
    script = next(word for word in words if word.endswith(".py"))
    module = _load_script(REPO / script)
    module.main(module.parse_args(words[words.index(script) + 1 :] + overrides[Path(script).name]))


@pytest.mark.parametrize("layout", ["train+test", "class folders"])
def test_the_printed_recipe_runs_on_an_own_image_folder(layout, digits, tmp_path, monkeypatch, capsys):
    folders = {"train": 6, "test": 3} if layout == "train+test" else {"": 9}
    root = write_digit_folder(tmp_path / "my data", digits, folders)
    monkeypatch.chdir(tmp_path)
    cli_main(["tiny-world", "--recipe", "--dataset", str(root), "--k", "2"])
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line and not line.startswith(("#", "{"))]
    assert len(commands) == 4 and json.loads(lines[0])["generator"] == str(tiny_world_paths().generator)
    assert not any(c.startswith("accelerate") for c in commands)  # its launcher opens with lines about its defaults
    if layout == "train+test":
        assert "--test_split test" in commands[3] and "--test_per_class" not in commands[3]
    else:
        # 9 images per class: K=2, then the rest split between validation and test.
        assert "--validation_per_class 3 --test_per_class 4" in commands[3] and "--test_split" not in commands[3]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for command in commands:
            run_printed(command, TINY_STEPS)
    finally:
        torch.set_num_threads(threads)
    manifest = json.loads((tmp_path / "few_shot.json").read_text())
    assert manifest["class_names"] == ["one", "zero"] and manifest["k"] == 2
    assert (tmp_path / "adapters" / "adapter_index.json").is_file()
    assert (tmp_path / "synthetic" / "generation_config.json").is_file()
    report = json.loads((tmp_path / "classifier" / "report.json").read_text())
    test_source = report["evaluations"]["test"]["source"]
    if layout == "train+test":
        assert test_source.startswith("real split `test` of") and report["evaluations"]["test"]["num_examples"] == 6
    else:
        assert "up to 4 per class" in test_source and report["evaluations"]["test"]["num_examples"] == 8


def test_the_recipe_refuses_a_class_too_small_for_its_carves(digits, tmp_path, capsys):
    root = write_digit_folder(tmp_path / "small", digits, {"": 3})
    with pytest.raises(DatasetInputError, match=r"Class 'one' of .* has 3 training images: the recipe needs K=2 \+ "
                                                r"one validation and one test image"):  # fmt: skip
        cli_main(["tiny-world", "--recipe", "--dataset", str(root), "--k", "2"])
