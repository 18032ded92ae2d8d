"""Stage 2 on the tiny pipeline: determinism, class adapters, resume after a kill, 2 processes, builder, Hub push."""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import load_from_disk
from PIL import Image
from safetensors.torch import load_file, save_file

from datadream_hf.generate.adapters import FusedAdapterSwitcher, resolve_adapters
from datadream_hf.generate.config import GenerationArguments, GenerationConfig, GenerationInputError
from datadream_hf.generate.dataset import save_synthetic_dataset
from datadream_hf.generate.run import generate_synthetic_dataset
from datadream_hf.generate.sampling import SyntheticImageSampler, image_seed, load_generation_pipeline
from datadream_hf.prompts import PromptTemplate
from datadream_hf.synthetic import SyntheticDataDreamBuilder, SyntheticDatasetError
from datadream_hf.testing import accelerate_launch_command, write_fake_stage1_output

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "generate_synthetic.py"
CLASSES = ["zero", "one", "two"]
SMALL = {"images_per_class": 4, "num_inference_steps": 2, "batch_size": 4, "shard_size": 2}  # 3 classes x 2 shards
SMALL_FLAGS = "--images_per_class 4 --num_inference_steps 2 --batch_size 4 --shard_size 2".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The 2-process test runs with OMP_NUM_THREADS=1; CPU reductions may round differently with other thread counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage1(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    return {
        mode: write_fake_stage1_output(root / mode, tiny_sd_path, CLASSES, mode=mode, seed=0)
        for mode in ("cls", "dset")
    }


def run(output_dir, tiny_sd_path, adapter_path, on_shard_written=None, **kwargs):
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in GenerationConfig.__dataclass_fields__}
    config = GenerationConfig(**{**SMALL, **options})
    args = GenerationArguments(
        pretrained_model_name_or_path=tiny_sd_path, adapter_path=adapter_path, output_dir=str(output_dir), **kwargs
    )
    return generate_synthetic_dataset(args, config, on_shard_written=on_shard_written)


@pytest.fixture(scope="module")
def reference(stage1, tiny_sd_path, tmp_path_factory):
    """An uninterrupted 1-process cls-mode run: the result every other run is compared with."""
    output_dir = tmp_path_factory.mktemp("reference")
    run(output_dir, tiny_sd_path, stage1["cls"])
    return output_dir


def shard_files(output_dir):
    """{relative path: bytes} of every shard Parquet file and shard manifest."""
    root = Path(output_dir) / "shards"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def images_of(output_dir):
    """{(label, image_index): uint8 array} read from the shards."""
    import pyarrow.parquet as pq

    images = {}
    for path in sorted((Path(output_dir) / "shards").rglob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            images[row["label"], row["image_index"]] = np.asarray(Image.open(io.BytesIO(row["image"])), dtype=np.int16)
    return images


def test_same_seed_gives_identical_bytes_and_each_image_its_own_seed(reference, stage1, tiny_sd_path, tmp_path):
    run(tmp_path / "again", tiny_sd_path, stage1["cls"])
    assert shard_files(tmp_path / "again") == shard_files(reference)
    assert len(shard_files(reference)) == 12  # 6 shards x (parquet + json)

    run(tmp_path / "seed1", tiny_sd_path, stage1["cls"], seed=1)
    other, ref = images_of(tmp_path / "seed1"), images_of(reference)
    assert all(not np.array_equal(other[key], ref[key]) for key in ref)
    seeds = {image_seed(0, c, k) for c in range(3) for k in range(4)}
    assert len(seeds) == 12  # no two images share their starting noise (the reference's bug)
    assert all(not np.array_equal(ref[0, k], ref[1, k]) for k in range(4))


def test_image_does_not_depend_on_batch_size_and_can_be_regenerated_alone(reference, stage1, tiny_sd_path, tmp_path):
    run(tmp_path / "batch1", tiny_sd_path, stage1["cls"], batch_size=1)
    alone, batched = images_of(tmp_path / "batch1"), images_of(reference)
    for key in batched:
        # Bit-identical noise and prompts; only float rounding of batched kernels may differ (<= 1 grey level).
        assert np.abs(alone[key] - batched[key]).max() <= 1, key
    assert len({batched[key].tobytes() for key in batched}) == 12

    pipeline = load_generation_pipeline(tiny_sd_path)
    config = GenerationConfig(**SMALL)
    sampler = SyntheticImageSampler(pipeline, resolve_adapters(stage1["cls"]), PromptTemplate(), config)
    image = np.asarray(sampler.sample(1, [3])[0], dtype=np.int16)
    assert np.abs(image - batched[1, 3]).max() <= 1


def test_stochastic_scheduler_noise_is_per_image_too(stage1, tiny_sd_path):
    name = "EulerAncestralDiscreteScheduler"  # draws fresh noise at every step
    pipeline = load_generation_pipeline(tiny_sd_path, scheduler=name)
    assert type(pipeline.scheduler).__name__ == name
    adapters = resolve_adapters(stage1["cls"])

    def images(batch_size):
        config = GenerationConfig(**{**SMALL, "batch_size": batch_size, "scheduler": name})
        sampler = SyntheticImageSampler(pipeline, adapters, PromptTemplate(), config)
        return [np.asarray(image, dtype=np.int16) for image in sampler.sample(2, [0, 1, 2])]

    batched, alone, again = images(3), images(1), images(3)
    assert all(np.array_equal(a, b) for a, b in zip(batched, again))
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(batched, alone))


def test_two_processes_give_the_same_images_as_one(reference, stage1, tiny_sd_path, tmp_path):
    output_dir = tmp_path / "two_processes"
    paths = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1["cls"]]
    command = accelerate_launch_command(SCRIPT, 2) + paths + ["--output_dir", str(output_dir)] + SMALL_FLAGS
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shard_files(output_dir) == shard_files(reference)
    for process in (1, 2):  # the work was really split: 3 of the 6 shards each
        assert f"Process {process}/2: 3 shard(s), 6 images to generate." in result.stderr
    config = json.loads((output_dir / "generation_config.json").read_text())
    assert config["fingerprint"] == json.loads((reference / "generation_config.json").read_text())["fingerprint"]
    assert (output_dir / "README.md").is_file() and (output_dir / "sample_grid.png").is_file()


def test_each_class_uses_its_own_adapter(reference, stage1, tiny_sd_path, tmp_path):
    run(tmp_path / "dset", tiny_sd_path, stage1["dset"])
    run(tmp_path / "frozen", tiny_sd_path, None, no_adapter=True, class_names=CLASSES)
    cls, dset, frozen = images_of(reference), images_of(tmp_path / "dset"), images_of(tmp_path / "frozen")
    for c in range(3):
        for k in range(4):
            assert np.abs(cls[c, k] - frozen[c, k]).mean() > 1, "the adapter did not change the image"
    # The fake dset adapter equals class 0's cls adapter (same torch seed): same images for class 0 only.
    assert all(np.array_equal(cls[0, k], dset[0, k]) for k in range(4))
    assert all(np.abs(cls[c, k] - dset[c, k]).mean() > 1 for c in (1, 2) for k in range(4))


def test_adapter_switch_restores_the_exact_base_weights(stage1, tiny_sd_path):
    pipeline = load_generation_pipeline(tiny_sd_path)
    before = {
        f"{n}.{k}": v.clone() for n in ("unet", "text_encoder") for k, v in getattr(pipeline, n).state_dict().items()
    }
    adapters = resolve_adapters(stage1["cls"])
    switcher = FusedAdapterSwitcher(pipeline)
    switcher.use(adapters.weight_file(0))
    fused = {f"unet.{k.replace('.base_layer', '')}": v for k, v in pipeline.unet.state_dict().items()}
    assert sum(not torch.equal(fused[k], before[k]) for k in before if k.startswith("unet.")) >= 4  # q, k, v, out
    switcher.use(adapters.weight_file(1))
    switcher.use(None)
    after = {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in getattr(pipeline, n).state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_resume_after_interruption_equals_uninterrupted_run(reference, stage1, tiny_sd_path, tmp_path):
    output_dir = tmp_path / "resumed"
    written = []

    def stop_after_three(shard, path):
        written.append(shard)
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(output_dir, tiny_sd_path, stage1["cls"], on_shard_written=stop_after_three)
    shards = sorted((output_dir / "shards").rglob("*.parquet"))
    assert len(shards) == 3
    # Damage what a kill can leave: a truncated finished shard, a shard without manifest, a temp file.
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    shards[1].with_suffix(".json").unlink()
    (shards[2].parent / f".{shards[2].name}.tmp").write_bytes(b"half a parquet file")

    rewritten = []
    run(output_dir, tiny_sd_path, stage1["cls"], on_shard_written=lambda shard, path: rewritten.append(path))
    assert shards[2] not in rewritten and {shards[0], shards[1]} <= set(rewritten)
    assert len(rewritten) == 5  # 6 shards - the 1 intact one
    assert shard_files(output_dir) == shard_files(reference)
    assert not list(output_dir.rglob("*.tmp"))


def test_sigkill_mid_shard_write_then_rerun_equals_uninterrupted_run(reference, stage1, tiny_sd_path, tmp_path):
    output_dir = tmp_path / "killed"
    # Killed after the third shard's Parquet temp file is written but before its rename.
    child = f"""
import os, signal, torch
import datadream_hf.synthetic as synthetic
from datadream_hf.generate.config import GenerationArguments, GenerationConfig
from datadream_hf.generate.run import generate_synthetic_dataset
torch.set_num_threads(1)
calls = []
def replace(src, dst):
    calls.append(dst)
    if str(dst).endswith('.parquet') and sum(str(d).endswith('.parquet') for d in calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    os.rename(src, dst)
synthetic.os.replace = replace
args = GenerationArguments(pretrained_model_name_or_path={tiny_sd_path!r}, adapter_path={stage1["cls"]!r},
                          output_dir={str(output_dir)!r})
generate_synthetic_dataset(args, GenerationConfig(**{SMALL!r}))
"""
    result = subprocess.run([sys.executable, "-c", child], env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == -9
    assert len(list(output_dir.rglob("*.parquet"))) == 2 and len(list(output_dir.rglob(".*.tmp"))) == 1
    with pytest.raises(SyntheticDatasetError, match="incomplete"):
        SyntheticDataDreamBuilder(generation_dir=output_dir, cache_dir=str(tmp_path / "cache"))

    run(output_dir, tiny_sd_path, stage1["cls"])
    assert shard_files(output_dir) == shard_files(reference)


def test_builder_dataset_round_trips_through_save_to_disk(reference, tmp_path):
    builder = SyntheticDataDreamBuilder(generation_dir=reference, cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    dataset = builder.as_dataset(split="train")
    assert dataset.features["label"].names == CLASSES
    assert dataset.num_rows == 12 and sorted(dataset["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    images = images_of(reference)
    for row in dataset:
        c, k = row["label"], row["image_index"]
        assert np.array_equal(np.asarray(row["image"], dtype=np.int16), images[c, k])
        assert row["seed"] == image_seed(0, c, k)
        assert row["prompt"] == f"a photo of a {CLASSES[c]}"
        assert row["adapter"].endswith(f"{c:04d}_{CLASSES[c]}")
        assert json.loads(row["generation_params"])["num_inference_steps"] == 2
    # Image bytes are embedded in the Arrow data, not paths into the generation folder.
    assert dataset.data.column("image")[0].as_py()["bytes"][:4] == b"\x89PNG"

    saved = save_synthetic_dataset(reference, tmp_path / "saved", cache_dir=str(tmp_path / "cache"))
    reloaded = load_from_disk(str(tmp_path / "saved"))
    assert reloaded.features == saved.features and reloaded.features["label"].names == CLASSES
    assert reloaded.data.to_pydict() == dataset.data.to_pydict()


def test_builder_refuses_an_incomplete_generation(reference, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    victim = sorted((damaged / "shards").rglob("*.parquet"))[3]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(SyntheticDatasetError, match=victim.name):
        SyntheticDataDreamBuilder(generation_dir=damaged, cache_dir=str(tmp_path / "cache"))


def _edit_config(folder, **base_model):
    path = Path(folder) / "datadream_config.json"
    config = json.loads(path.read_text())
    config["base_model"].update(base_model)
    path.write_text(json.dumps(config))


def _reshape_one_weight(folder):
    path = Path(folder) / "0002_two" / "pytorch_lora_weights.safetensors"
    weights = load_file(str(path))
    key = next(k for k in sorted(weights) if k.startswith("unet.") and k.endswith("down.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 8)  # as if cross_attention_dim differed
    save_file(weights, str(path))
    return key


BAD_INPUTS = {
    "missing adapter": (
        lambda d: (d / "0001_one" / "pytorch_lora_weights.safetensors").unlink(),
        {},
        r"Missing adapter for class 'one'",
    ),
    "pickled adapter": (
        lambda d: (d / "0001_one" / "pytorch_lora_weights.safetensors").rename(d / "0001_one" / "adapter.bin"),
        {},
        r"adapter\.bin.*pickled weights",
    ),
    "adapter for another base model (id)": (
        lambda d: _edit_config(d, pretrained_model_name_or_path="other-org/other-model"),
        {},
        "other-org/other-model",
    ),
    "adapter for another base model (shapes)": (_reshape_one_weight, {}, r"0002_two.*does not fit the base model"),
    "unknown scheduler": (None, {"scheduler": "NoSuchScheduler"}, r"`scheduler`: 'NoSuchScheduler'"),
    "zero images per class": (None, {"images_per_class": 0}, r"`--images_per_class` = 0 is invalid"),
    "class names differ": (None, {"class_names": ["a", "b", "c"]}, r"differ from the adapters' classes"),
    "no adapter without classes": (None, {"no_adapter": True, "adapter_path": None}, r"`class_names` are required"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_image(case, stage1, tiny_sd_path, tmp_path):
    damage, kwargs, message = BAD_INPUTS[case]
    adapters = tmp_path / "adapters"
    shutil.copytree(stage1["cls"], adapters)
    if damage is not None:
        damage(adapters)
    kwargs = {"adapter_path": str(adapters), **kwargs}
    output_dir = tmp_path / "out"
    with pytest.raises(GenerationInputError, match=message):
        run(output_dir, tiny_sd_path, **kwargs)
    assert not output_dir.exists()


def test_other_settings_cannot_resume_into_an_existing_run(reference, stage1, tiny_sd_path):
    before = shard_files(reference)
    with pytest.raises(GenerationInputError, match=r"generation\.num_inference_steps: 2 -> 3"):
        run(reference, tiny_sd_path, stage1["cls"], num_inference_steps=3)
    assert shard_files(reference) == before


def test_a_second_run_into_a_busy_output_dir_is_refused(stage1, tiny_sd_path, tmp_path):
    from datadream_hf.run_folder import OutputDirLock, OutputDirLockedError

    with OutputDirLock(tmp_path / "busy"):
        with pytest.raises(OutputDirLockedError, match="in use by another run"):
            run(tmp_path / "busy", tiny_sd_path, stage1["cls"])
    assert not (tmp_path / "busy" / "shards").exists()


@pytest.mark.usefixtures("reachable_hub")  # the upload is checked before the run
def test_script_pushes_parquet_and_card_to_hub(reference, stage1, tiny_sd_path, tmp_path, monkeypatch):
    import datasets

    import datadream_hf.hub

    output_dir = tmp_path / "pushed"
    shutil.copytree(reference, output_dir)
    calls = []

    def fake_push_folder(folder, repo_id, repo_type="model", token=None, private=False, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
        calls.append(("card", repo_id, repo_type, token, files))
        return f"https://huggingface.co/datasets/{repo_id}"

    def fake_push_dataset(self, repo_id, token=None, private=None, **kwargs):
        calls.append(("parquet", repo_id, token, self))

    monkeypatch.setattr(datadream_hf.hub, "push_folder_to_hub", fake_push_folder)
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push_dataset)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("generate_synthetic", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    token = "hf_SENTINEL_do_not_write"
    paths = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1["cls"]]
    hub = "--push_to_hub --hub_dataset_id user/datadream-digits --dataset_license openrail++".split()
    args = script.parse_args(paths + ["--output_dir", str(output_dir)] + SMALL_FLAGS + hub + ["--hub_token", token])
    script.main(args)
    assert shard_files(output_dir) == shard_files(reference)  # resumed a finished run: nothing regenerated

    assert [c[0] for c in calls] == ["card", "parquet"]  # the card first, so push_to_hub merges into it
    _, repo_id, repo_type, card_token, files = calls[0]
    assert (repo_id, repo_type, card_token) == ("user/datadream-digits", "dataset", token)
    assert set(files) == {"README.md", "sample_grid.png"}
    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "openrail++"
    assert metadata["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    label = next(f for f in metadata["dataset_info"]["features"] if f["name"] == "label")
    assert label["dtype"]["class_label"]["names"] == {"0": "zero", "1": "one", "2": "two"}
    assert "![Samples" in card and tiny_sd_path in card
    _, repo_id, parquet_token, dataset = calls[1]
    assert (repo_id, parquet_token) == ("user/datadream-digits", token)
    assert dataset.features["label"].names == CLASSES and dataset.num_rows == 12
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
