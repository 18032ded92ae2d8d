"""The data layer: loading from every source kind, the K-shot manifest, and clear errors on bad input."""

import json

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from datadream_hf.data import DatasetInputError, class_names_of, labels_of, load_image_folder, load_labelled_dataset
from datadream_hf.few_shot import FewShotManifest, draw_few_shot


def write_folder(root, layout, size=(12, 10)):
    """layout: {class name: number of images}; images differ by class and index."""
    for c, (name, count) in enumerate(layout.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            PILImage.new("RGB", size, (10 * c, 20 * i % 255, 3)).save(root / name / f"{i:03d}.png")
    return root


def test_digits_splits_are_real_images_with_class_names(digits):
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert class_names_of(digits["train"])[:3] == ["zero", "one", "two"]
    image = digits["train"][0]["image"]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).std() > 10  # ink on background, not a blank image
    # Stratified: every class in both splits.
    assert set(labels_of(digits["test"]).tolist()) == set(range(10))


def test_load_from_disk_hub_style_and_datasetdict_sources_agree(digits, digits_path):
    from_disk = load_labelled_dataset(digits_path, split="test")
    from_dict = load_labelled_dataset(digits, split="test")
    assert from_disk.features == from_dict.features
    assert labels_of(from_disk).tolist() == labels_of(from_dict).tolist()


def test_class_names_subset_renumbers_in_callers_order(digits):
    subset = load_labelled_dataset(digits, split="test", class_names=["seven", "two"])
    assert class_names_of(subset) == ["seven", "two"]
    original = labels_of(digits["test"])
    assert len(subset) == int((original == 7).sum() + (original == 2).sum())
    assert (labels_of(subset) == 0).sum() == (original == 7).sum()


def test_renamed_columns_and_string_labels():
    images = [PILImage.new("RGB", (4, 4), (i, 0, 0)) for i in range(4)]
    ds = Dataset.from_dict(
        {"img": images, "name": ["b", "a", "b", "a"]}, features=Features({"img": Image(), "name": Value("string")})
    )
    loaded = load_labelled_dataset(ds, image_column="img", label_column="name")
    assert loaded.column_names == ["image", "label"]
    assert class_names_of(loaded) == ["a", "b"]
    assert labels_of(loaded).tolist() == [1, 0, 1, 0]


def test_image_folder_keeps_given_class_order(tmp_path):
    root = write_folder(tmp_path / "folder", {"zebra": 2, "apple": 3})
    assert class_names_of(load_image_folder(root)) == ["apple", "zebra"]
    loaded = load_labelled_dataset(str(root), class_names=["zebra", "apple"])
    assert class_names_of(loaded) == ["zebra", "apple"]
    assert labels_of(loaded).tolist() == [0, 0, 1, 1, 1]


def test_manifest_is_deterministic_per_seed(digits, tmp_path):
    train = digits["train"]
    a, b, c = (draw_few_shot(train, k=16, seed=s) for s in (0, 0, 1))
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.indices != c.indices
    labels = labels_of(train)
    for label, rows in enumerate(a.indices):
        assert len(rows) == len(set(rows)) == 16 and all(labels[r] == label for r in rows)


def test_manifest_roundtrip_select_and_complement(digits, tmp_path):
    train = digits["train"]
    manifest = draw_few_shot(train, k=5, seed=3, source_name="digits", split="train")
    manifest.save(tmp_path / "m.json")
    loaded = FewShotManifest.load(tmp_path / "m.json")
    assert loaded == manifest
    subset = loaded.select(train)
    assert len(subset) == 50 and labels_of(subset).tolist() == sorted(labels_of(subset).tolist())
    rest = loaded.complement(train)
    assert len(rest) == len(train) - 50


def test_manifest_refuses_another_dataset(digits):
    manifest = draw_few_shot(digits["train"], k=2, seed=0)
    with pytest.raises(DatasetInputError, match="fingerprint"):
        manifest.select(digits["test"])
    reordered = load_labelled_dataset(digits, class_names=list(reversed(class_names_of(digits["train"]))))
    with pytest.raises(DatasetInputError, match="classes"):
        manifest.select(reordered)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot be read"),
        (json.dumps({"format_version": 99}), "format_version"),
        (json.dumps({"format_version": 1, "k": 1}), "malformed"),
    ],
)
def test_bad_manifest_file(tmp_path, content, match):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(DatasetInputError, match=match):
        FewShotManifest.load(path)


def make_labelled(labels, names=("a", "b")):
    images = [PILImage.new("RGB", (4, 4)) for _ in labels]
    return Dataset.from_dict(
        {"image": images, "label": labels}, features=Features({"image": Image(), "label": ClassLabel(names=names)})
    )


def test_k_larger_than_a_class(tmp_path):
    with pytest.raises(DatasetInputError, match=r"Class 'b' has 1 images but K=2"):
        draw_few_shot(make_labelled([0, 0, 1]), k=2, seed=0)


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_bad_k(k):
    with pytest.raises(DatasetInputError, match="K"):
        draw_few_shot(make_labelled([0, 1]), k=k, seed=0)


def test_missing_column_names_the_column():
    with pytest.raises(DatasetInputError, match=r"Column 'fine_label' \(label_column\) not found"):
        load_labelled_dataset(make_labelled([0, 1]), label_column="fine_label")


def test_unknown_class_name():
    with pytest.raises(DatasetInputError, match=r"Unknown class name\(s\) \['c'\]"):
        load_labelled_dataset(make_labelled([0, 1]), class_names=["a", "c"])


def test_duplicate_class_names():
    with pytest.raises(DatasetInputError, match="appears twice"):
        load_labelled_dataset(make_labelled([0, 1]), class_names=["a", "a"])


def test_integer_labels_need_class_names():
    ds = Dataset.from_dict(
        {"image": [PILImage.new("RGB", (4, 4))], "label": [0]},
        features=Features({"image": Image(), "label": Value("int64")}),
    )
    with pytest.raises(DatasetInputError, match="pass `class_names`"):
        load_labelled_dataset(ds)
    assert class_names_of(load_labelled_dataset(ds, class_names=["cat"])) == ["cat"]


def test_label_column_of_wrong_type():
    ds = Dataset.from_dict({"image": [PILImage.new("RGB", (4, 4))], "label": [0.5]})
    with pytest.raises(DatasetInputError, match="Label column 'label' has type"):
        load_labelled_dataset(ds)


def test_missing_split(digits):
    with pytest.raises(DatasetInputError, match=r"Split 'validation' not in the dataset; available splits"):
        load_labelled_dataset(digits, split="validation")


def test_empty_folder_and_empty_class(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetInputError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    root = write_folder(tmp_path / "f", {"cat": 1})
    (root / "dog").mkdir()
    with pytest.raises(DatasetInputError, match="dog.*holds no image file"):
        load_image_folder(root)
    with pytest.raises(DatasetInputError, match=r"\['bird'\] have no sub-folder"):
        load_image_folder(root, class_names=["cat", "bird"])


def test_corrupt_image_is_named_when_selected(tmp_path):
    root = write_folder(tmp_path / "f", {"cat": 2, "dog": 2})
    (root / "dog" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = load_image_folder(root)
    manifest = draw_few_shot(dataset, k=2, seed=0)
    with pytest.raises(DatasetInputError, match=r"dog/001\.png.*cannot be decoded"):
        manifest.select(dataset)
