"""Dataset presets and class names: the curated names of the paper's ten datasets reach the prompts of all three
stages, the manifest alone carries the class order and names, a renaming file, and the `presets` listing."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import load_few_shot_data
from datadream_hf.adapt.outputs import run_record
from datadream_hf.class_names import curated_class_names, display_class_names, match_curated
from datadream_hf.classify.data import load_classifier_data
from datadream_hf.cli import main as cli_main
from datadream_hf.data import DatasetInputError
from datadream_hf.few_shot import FewShotManifest
from datadream_hf.generate.adapters import AdapterSet
from datadream_hf.generate.config import GenerationArguments
from datadream_hf.generate.run import resolve_prompt_template
from datadream_hf.presets import PRESETS

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
CLASS_COUNTS = {
    "imagenet": 1000, "caltech101": 100, "dtd": 47, "eurosat": 10, "fgvc_aircraft": 100, "food101": 101,
    "flowers102": 102, "pets": 37, "cars": 196, "sun397": 397,
}  # fmt: skip


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def png(counter: int) -> bytes:
    """A 4x4 PNG whose pixels encode `counter`: every image of a fixture is distinct."""
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[0, 0] = [counter % 256, counter // 256 % 256, counter // 65536]
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def hub_style_names(preset: str) -> list[str]:
    """Label names as Hub copies spell them: WordNet-style ids (matched by position), or the curated names in
    snake_case (matched by name, in any order)."""
    curated = curated_class_names(preset)
    if preset in ("imagenet", "sun397", "caltech101"):
        return [f"n{i:08d}" for i in range(len(curated))]
    return sorted(name.lower().replace(" ", "_") for name in curated)  # alphabetical: not the curated order


def preset_fixture(preset_name: str, root: Path, per_class=(2, 1)) -> tuple[str, list[str]]:
    """A save_to_disk DatasetDict with the preset's column and split names and Hub-style label names; returns its
    path and the curated name of each of its labels."""
    preset = PRESETS[preset_name]
    names = hub_style_names(preset_name)
    features = Features(
        {preset.image_column: Image(), preset.label_column: ClassLabel(names=names), "extra": Value("int64")}
    )
    counter, splits = 0, {}
    for split, count in zip((preset.train_split, preset.test_split), per_class):
        images, labels = [], []
        for label in range(len(names)):
            for _ in range(count):
                images.append({"bytes": png(counter), "path": None})
                labels.append(label)
                counter += 1
        columns = {preset.image_column: images, preset.label_column: labels, "extra": labels}
        splits[split] = Dataset.from_dict(columns, features=features)
    path = root / preset_name
    DatasetDict(splits).save_to_disk(str(path))
    return str(path), display_class_names(names, preset_name)


def test_curated_names_ship_for_the_ten_datasets():
    assert set(PRESETS) == set(CLASS_COUNTS)
    for name, count in CLASS_COUNTS.items():
        names = curated_class_names(name)
        assert len(names) == count == len(set(names)), name
        assert all(isinstance(n, str) and n.strip() == n and n for n in names), name
    assert curated_class_names("imagenet")[:3] == ["tench", "goldfish", "great white shark"]
    assert curated_class_names("fgvc_aircraft")[-1] == "Yak-42"
    assert PRESETS["fgvc_aircraft"].classifier_epochs == 50 and PRESETS["fgvc_aircraft"].domain == "aircraft "
    assert curated_class_names("digits") is None  # a domain-only preset


def test_curated_names_match_by_name_in_any_order_else_by_position():
    curated = curated_class_names("pets")
    assert match_curated(["yorkshire_terrier", "Abyssinian"], curated, "pets") == ["Yorkshire Terrier", "Abyssinian"]
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert match_curated(wnids, curated_class_names("imagenet"), "imagenet")[21] == "kite (bird of prey)"
    with pytest.raises(DatasetInputError, match="lists 1000 class names but the dataset has 3 classes"):
        match_curated(wnids[:3], curated_class_names("imagenet"), "imagenet")


@pytest.mark.parametrize("preset", sorted(CLASS_COUNTS))
def test_preset_names_reach_the_prompts_of_all_three_stages(preset, tiny_sd_path, tiny_clip_path, tmp_path):
    """A local dataset with the preset's Hub layout: `few-shot --dataset_preset` draws the manifest with the curated
    names; stages 1, 2 and 3, given only the dataset, the manifest and the preset, prompt with them."""
    path, curated = preset_fixture(preset, tmp_path)
    domain = PRESETS[preset].domain
    expected = [f"a {domain}photo of a {name}" for name in curated]
    cli_main(["few-shot", "--dataset", path, "--dataset_preset", preset, "--k", "1", "--output", str(tmp_path / "m")])
    manifest = FewShotManifest.load(tmp_path / "m")
    assert manifest.class_names == curated and manifest.dataset_class_names == hub_style_names(preset)

    # Stage 1: the script's flags with the preset's column and split names, the K-shot data, the recorded prompts.
    config, _ = _script("train_datadream_lora").parse_args([
        "--pretrained_model_name_or_path", tiny_sd_path, "--dataset", path, "--few_shot_manifest", str(tmp_path / "m"),
        "--dataset_preset", preset, "--output_dir", str(tmp_path / "s1")])  # fmt: skip
    assert (config.label_column, config.split) == (PRESETS[preset].label_column, PRESETS[preset].train_split)
    data = load_few_shot_data(config)
    assert run_record(config, data)["prompts"] == expected

    # Stage 2 (frozen generator from the manifest; with adapters it reads stage 1's names, tested end to end below).
    generation = GenerationArguments(
        pretrained_model_name_or_path=tiny_sd_path, no_adapter=True, few_shot_manifest=str(tmp_path / "m"),
        dataset_preset=preset)  # fmt: skip
    names = generation.requested_class_names()
    template = resolve_prompt_template(generation.requested_prompt_template(), AdapterSet.none(names))
    assert [template(name) for name in names] == expected

    # Stage 3: the script's flags (columns, splits, epochs), the real splits under the manifest's names, the head.
    args, training_args = _script("train_classifier").parse_args([
        "--model_name_or_path", tiny_clip_path, "--real_dataset", path, "--few_shot_manifest", str(tmp_path / "m"),
        "--dataset_preset", preset, "--train_mode", "real", "--output_dir", str(tmp_path / "s3")])  # fmt: skip
    assert (args.image_column, args.label_column) == (PRESETS[preset].image_column, PRESETS[preset].label_column)
    assert (args.real_split, args.test_split) == (PRESETS[preset].train_split, PRESETS[preset].test_split)
    assert training_args.num_train_epochs == (PRESETS[preset].classifier_epochs or 100)
    classifier_data = load_classifier_data(args, training_args)
    assert classifier_data["class_names"] == curated
    assert classifier_data["test"].features["label"].names == curated and len(classifier_data["test"]) == len(curated)
    template = args.class_prompt_template()
    assert [template(name) for name in classifier_data["class_names"]] == expected


def test_explicit_flags_win_over_the_preset(tiny_clip_path, tmp_path):
    parse = _script("train_classifier").parse_args
    base = ["--model_name_or_path", tiny_clip_path, "--real_dataset", "x", "--few_shot_manifest", "m.json",
            "--dataset_preset", "fgvc_aircraft", "--train_mode", "real",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    args, training_args = parse(base)
    assert (args.label_column, training_args.num_train_epochs) == ("variant", 50)
    args, training_args = parse([*base, "--label_column", "family", "--num_train_epochs", "7"])
    assert (args.label_column, training_args.num_train_epochs) == ("family", 7)
    config_file = tmp_path / "stage3.yaml"  # a config file: the preset's defaults, the file's values over them
    config_file.write_text(
        f"model_name_or_path: {tiny_clip_path}\nreal_dataset: x\nfew_shot_manifest: m.json\n"
        f"dataset_preset: fgvc_aircraft\ntrain_mode: real\noutput_dir: {tmp_path / 'run'}\nnum_train_epochs: 9\n"
    )
    args, training_args = parse([str(config_file)])
    assert (args.label_column, training_args.num_train_epochs) == ("variant", 9)


def _folder_dataset(root: Path, classes: dict[str, int], start: int = 0) -> str:
    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(png(start + 100 * index + i))
    return str(root)


def test_manifest_alone_carries_a_custom_class_order_and_renaming(tiny_sd_path, tiny_clip_path, tmp_path):
    """Drawn with `--class_names` in a custom order and a renaming file, the manifest is all stages 1 and 3 need."""
    folder = _folder_dataset(tmp_path / "images", {"cat": 3, "dog": 3, "owl": 3})
    (tmp_path / "names.json").write_text(json.dumps({"owl": "barn owl", "cat": "house cat"}))
    cli_main(["few-shot", "--dataset", folder, "--class_names", "owl,cat", "--class_names_file",
              str(tmp_path / "names.json"), "--k", "1", "--output", str(tmp_path / "m.json")])  # fmt: skip
    manifest = FewShotManifest.load(tmp_path / "m.json")
    assert (manifest.class_names, manifest.source_class_names) == (["barn owl", "house cat"], ["owl", "cat"])

    config = GeneratorTrainingConfig(pretrained_model_name_or_path=tiny_sd_path, dataset=folder,
                                     few_shot_manifest=str(tmp_path / "m.json"))  # fmt: skip
    data = load_few_shot_data(config)
    assert data.class_names == ["barn owl", "house cat"] and len(data.images) == 2
    for repeated in (["owl", "cat"], ["barn owl", "house cat"]):  # repeating the manifest's classes is fine
        assert load_few_shot_data(GeneratorTrainingConfig(**{**config.to_dict(), "class_names": repeated})).labels
    with pytest.raises(DatasetInputError, match="manifest's classes .* differ"):
        load_few_shot_data(GeneratorTrainingConfig(**{**config.to_dict(), "class_names": ["cat", "owl"]}))

    args, training_args = _script("train_classifier").parse_args([
        "--model_name_or_path", tiny_clip_path, "--real_dataset", folder, "--few_shot_manifest",
        str(tmp_path / "m.json"), "--train_mode", "real", "--test_per_class", "1", "--validation_per_class", "1",
        "--output_dir", str(tmp_path / "s3")])  # fmt: skip
    classifier_data = load_classifier_data(args, training_args)
    assert classifier_data["class_names"] == ["barn owl", "house cat"]
    assert classifier_data["test"].features["label"].names == ["barn owl", "house cat"]


@pytest.mark.parametrize(
    "content, match",
    [
        (["a", "b"], r"lists 2 class names but the dataset has 3 classes"),
        ({"bat": "x"}, r"renames \['bat'\], which are not classes"),
        (["x", "x", "y"], r"'x' appears twice"),
        ({"a": 1}, r"must hold a JSON list of names"),
    ],
)
def test_bad_renaming_file(content, match, tmp_path):
    folder = _folder_dataset(tmp_path / "images", {"cat": 2, "dog": 2, "owl": 2})
    (tmp_path / "names.json").write_text(json.dumps(content))
    with pytest.raises(DatasetInputError, match=match):
        cli_main(["few-shot", "--dataset", folder, "--class_names_file", str(tmp_path / "names.json"), "--k", "1",
                  "--output", str(tmp_path / "m.json")])  # fmt: skip
    assert not (tmp_path / "m.json").exists()


def test_presets_listing(capsys):
    cli_main(["presets"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["preset", "domain", "classes"]
    aircraft = next(line for line in lines if line.startswith("fgvc_aircraft"))
    assert "'aircraft '" in aircraft and " 100 " in aircraft and " 50 " in aircraft and "variant" in aircraft
    assert len(lines) == 1 + len(PRESETS)
