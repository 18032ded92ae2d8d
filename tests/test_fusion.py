"""LoFT's fusion in stage 2 on the tiny pipeline: the grouped mixture layer, the pair schedule, batched fused pairs
equal to diffusers' `set_adapters`, provenance, batch-size independence, resume, 2 processes, bad input."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datadream_hf.generate.adapters import AdapterSet, resolve_adapters
from datadream_hf.generate.config import GenerationArguments, GenerationConfig, GenerationInputError
from datadream_hf.generate.dataset import render_dataset_card, save_synthetic_dataset
from datadream_hf.generate.fusion import class_pairs
from datadream_hf.generate.run import generate_synthetic_dataset
from datadream_hf.generate.sampling import SyntheticImageSampler, image_seed, load_generation_pipeline
from datadream_hf.grouped_lora import GroupedLoraLinear
from datadream_hf.prompts import PromptTemplate
from datadream_hf.synthetic import load_synthetic_dataset
from datadream_hf.testing import accelerate_launch_command, write_fake_stage1_output

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "generate_synthetic.py"
CLASSES = ["zero", "one"]
WEIGHTS = [0.7, 0.3]  # unequal: a swapped pair or weight would show
FUSION = {"fusion": "pairs", "fusion_weights": WEIGHTS}
# 2 classes x 2 shards of 3; 3 image adapters per class = 3 pairs, cycled over 6 images.
SMALL = {"images_per_class": 6, "num_inference_steps": 2, "batch_size": 4, "shard_size": 3}
SMALL_FLAGS = "--images_per_class 6 --num_inference_steps 2 --batch_size 4 --shard_size 3".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage1(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    return {
        "image": write_fake_stage1_output(root / "image", tiny_sd_path, CLASSES, mode="image", images_per_class=3),
        # With text-encoder LoRA too, 4 adapters in one class: any rank and both components are read.
        "image_text": write_fake_stage1_output(
            root / "image_text", tiny_sd_path, CLASSES, mode="image", images_per_class=[2, 4], image_text_encoder=True
        ),
        "cls": write_fake_stage1_output(root / "cls", tiny_sd_path, CLASSES, mode="cls"),
        "single": write_fake_stage1_output(
            root / "single", tiny_sd_path, CLASSES, mode="image", images_per_class=[3, 1]
        ),
    }


def run(output_dir, tiny_sd_path, adapter_path, on_shard_written=None, **kwargs):
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in GenerationConfig.__dataclass_fields__}
    config = GenerationConfig(**{**SMALL, **FUSION, **options})
    args = GenerationArguments(
        pretrained_model_name_or_path=tiny_sd_path, adapter_path=adapter_path, output_dir=str(output_dir), **kwargs
    )
    return generate_synthetic_dataset(args, config, on_shard_written=on_shard_written)


@pytest.fixture(scope="module")
def reference(stage1, tiny_sd_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("fusion")
    run(output_dir, tiny_sd_path, stage1["image"])
    return output_dir


def shard_files(output_dir):
    root = Path(output_dir) / "shards"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shard_rows(output_dir):
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted((Path(output_dir) / "shards").rglob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            row["image"] = np.asarray(Image.open(io.BytesIO(row["image"])), dtype=np.int16)
            rows[row["label"], row["image_index"]] = row
    return rows


# --- the layer and the schedule -----------------------------------------------------------------------------------


def test_mixture_route_is_the_weighted_sum_of_each_samples_adapters():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = GroupedLoraLinear(base, num_groups=3, rank=2, scaling=0.0)
    with torch.no_grad():
        layer.lora_A.normal_(), layer.lora_B.normal_()
        layer.lora_A[2, 1] = 0  # adapter 2 has rank 1, padded with a zero row
        layer.lora_B[2, :, 1] = 0
    layer.group_scaling.copy_(torch.tensor([0.5, 2.0, 1.0]))
    groups, weights = torch.tensor([[0, 1], [2, 0], [1, 2]]), torch.tensor([[0.7, 0.3], [0.5, 0.5], [1.0, 0.0]])
    x = torch.randn(3, 4, 6)  # (B, T, in)

    def expected(x):
        out = []
        for i in range(3):
            delta = sum(
                weights[i, m] * layer.group_scaling[g] * x[i] @ layer.lora_A[g].T @ layer.lora_B[g].T
                for m, g in enumerate(groups[i].tolist())
            )
            out.append(base(x[i]) + delta)
        return torch.stack(out)

    layer.set_mixture(groups, weights)
    torch.testing.assert_close(layer(x), expected(x), rtol=1e-5, atol=1e-6)
    # Classifier-free guidance: the batch twice, each copy of sample i with sample i's pair.
    layer.set_mixture(groups.repeat(2, 1), weights.repeat(2, 1))
    torch.testing.assert_close(layer(torch.cat([x, x])), torch.cat([expected(x)] * 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="mixture route for 6 samples"):
        layer(x)
    layer.set_mixture(None)
    with pytest.raises(RuntimeError, match="group index"):
        layer(x)


def test_pairs_are_every_combination_in_a_seeded_shuffle_per_class():
    pairs = class_pairs(5, seed=0, class_index=1)
    assert sorted(pairs) == [(a, b) for a in range(5) for b in range(a + 1, 5)]
    assert pairs == class_pairs(5, seed=0, class_index=1)
    assert pairs != class_pairs(5, seed=0, class_index=2) and pairs != class_pairs(5, seed=1, class_index=1)
    assert class_pairs(2, seed=3, class_index=0) == [(0, 1)]


# --- exactness against diffusers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, class_index", [("image", 1), ("image_text", 1)])
def test_batched_fused_pairs_equal_diffusers_set_adapters(stage1, tiny_sd_path, folder, class_index):
    """One batched call of 4 images, each its own pair, against diffusers' own LoRA loading and `set_adapters`, one
    image per call as LoFT does it."""
    adapters = resolve_adapters(stage1[folder])
    config = GenerationConfig(**{**SMALL, **FUSION})
    sampler = SyntheticImageSampler(load_generation_pipeline(tiny_sd_path), adapters, PromptTemplate(), config)
    indices = [0, 1, 2, 3]
    ours = [np.asarray(image, dtype=np.int16) for image in sampler.sample(class_index, indices)]
    pairs = [sampler.image_pair(class_index, k) for k in indices]
    assert len(set(pairs[:3])) == 3  # the batch really mixes different pairs

    pipeline = load_generation_pipeline(tiny_sd_path)
    files = adapters.image_weight_files(class_index)
    for g, file in enumerate(files):
        pipeline.load_lora_weights(str(file.parent), adapter_name=f"image{g}", use_safetensors=True)
    reference = []
    for k, (a, b) in zip(indices, pairs):
        pipeline.set_adapters([f"image{a}", f"image{b}"], adapter_weights=WEIGHTS)
        generator = torch.Generator("cpu").manual_seed(image_seed(config.seed, class_index, k))
        latents = torch.randn((1, 4, 16, 16), generator=generator)
        image = pipeline(
            prompt="a photo of a one", height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
            latents=latents, generator=[generator], output_type="pil",
        ).images[0]  # fmt: skip
        reference.append(np.asarray(image, dtype=np.int16))
    for k in indices:
        assert np.abs(ours[k] - reference[k]).max() <= 1, k
    # Not vacuous: the pair's weights matter (0.3 / 0.7 instead of 0.7 / 0.3 makes other images).
    pipeline.set_adapters([f"image{pairs[0][1]}", f"image{pairs[0][0]}"], adapter_weights=WEIGHTS)
    generator = torch.Generator("cpu").manual_seed(image_seed(config.seed, class_index, 0))
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    swapped = pipeline(prompt="a photo of a one", height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                       latents=latents, generator=[generator]).images[0]  # fmt: skip
    assert np.abs(np.asarray(swapped, dtype=np.int16) - ours[0]).mean() > 1
    sampler.reset()
    assert not any(isinstance(m, GroupedLoraLinear) for m in sampler.pipeline.unet.modules())


def test_without_guidance_each_sample_is_routed_once(stage1, tiny_sd_path):
    """guidance_scale <= 1: the pipeline does not double the batch, and the route follows (no shape error), the
    adapters still applied."""
    pipeline = load_generation_pipeline(tiny_sd_path)

    def images(adapters, **options):
        config = GenerationConfig(**{**SMALL, "guidance_scale": 1.0, **options})
        sampler = SyntheticImageSampler(pipeline, adapters, PromptTemplate(), config)
        return [np.asarray(image, dtype=np.int16) for image in sampler.sample(0, [0, 1])]

    fused = images(resolve_adapters(stage1["image"]), **FUSION)
    frozen = images(AdapterSet.none(CLASSES))  # also removes the fusion layers the first sampler left
    assert all(np.abs(a - b).mean() > 1 for a, b in zip(fused, frozen))
    assert not any(isinstance(m, GroupedLoraLinear) for m in pipeline.unet.modules())


# --- the run: provenance, batch size, resume, processes ------------------------------------------------------------


def test_fusion_run_records_each_images_pair_and_loads_as_a_dataset(reference, stage1, tiny_sd_path, tmp_path):
    rows = shard_rows(reference)
    index = json.loads((Path(stage1["image"]) / "adapter_index.json").read_text())
    keys_of_class = {c: [k for k, image in index["images"].items() if image["class"] == c] for c in (0, 1)}
    for c in (0, 1):
        pairs = class_pairs(3, seed=0, class_index=c)
        for k in range(6):
            row = rows[c, k]
            a, b = pairs[k % 3]
            assert row["fusion_adapters"] == [keys_of_class[c][a], keys_of_class[c][b]]
            assert row["fusion_rows"] == [index["images"][key]["row"] for key in row["fusion_adapters"]]
            assert row["fusion_weights"] == WEIGHTS
        assert rows[c, 0]["fusion_adapters"] == rows[c, 3]["fusion_adapters"]  # cycled
        assert len({tuple(rows[c, k]["fusion_adapters"]) for k in range(3)}) == 3
        assert not np.array_equal(rows[c, 0]["image"], rows[c, 3]["image"])  # same pair, own seed

    # datasets.load_dataset(folder), through the card's YAML.
    loaded = datasets.load_dataset(str(reference), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 12 and loaded.features["label"].names == CLASSES
    first = loaded[0]
    assert first["fusion_weights"] == WEIGHTS and len(first["fusion_adapters"]) == 2
    # The package's builder, with the per-row adapter string, and stage 3's reader.
    built = load_synthetic_dataset(reference, cache_dir=str(tmp_path / "cache2"))
    row = next(r for r in built if r["label"] == 1 and r["image_index"] == 4)
    key_a, key_b = rows[1, 4]["fusion_adapters"]
    folder = lambda key: index["adapters"][key]  # noqa: E731
    assert row["adapter"] == f"0.7 * {stage1['image']}/{folder(key_a)} + 0.3 * {stage1['image']}/{folder(key_b)}"
    assert json.loads(row["generation_params"])["fusion_weights"] == WEIGHTS
    from datadream_hf.classify.data import load_synthetic_training_set

    stage3 = load_synthetic_training_set(str(reference), CLASSES)
    assert stage3.num_rows == 12
    card = (reference / "README.md").read_text()
    assert "LoFT" in card and "0.7 and 0.3" in card and "3 image adapters, 3 pairs" in card
    features = yaml.safe_load(card.split("---")[1])["dataset_info"]["features"]
    assert {"fusion_adapters", "fusion_rows", "fusion_weights"} <= {f["name"] for f in features}
    config = json.loads((reference / "generation_config.json").read_text())
    assert config["generation"]["fusion"] == "pairs" and len(config["adapters"]["per_class"][0]["images"]) == 3
    # The Hub copy's card (Parquet of the built dataset) declares the same columns, and a save_to_disk copy keeps them.
    hub_card = render_dataset_card(reference, repo_id="user/loft", hub_layout=True)
    hub_features = {f["name"] for f in yaml.safe_load(hub_card.split("---")[1])["dataset_info"]["features"]}
    assert {"adapter", "fusion_adapters", "fusion_rows", "fusion_weights"} <= hub_features
    saved = save_synthetic_dataset(reference, tmp_path / "saved", cache_dir=str(tmp_path / "cache3"))
    assert datasets.load_from_disk(str(tmp_path / "saved")).data.to_pydict() == saved.data.to_pydict()


def test_fused_images_do_not_depend_on_batch_size(reference, stage1, tiny_sd_path, tmp_path):
    run(tmp_path / "batch1", tiny_sd_path, stage1["image"], batch_size=1)
    alone, batched = shard_rows(tmp_path / "batch1"), shard_rows(reference)
    for key in batched:
        assert np.abs(alone[key]["image"] - batched[key]["image"]).max() <= 1, key
        assert alone[key]["fusion_adapters"] == batched[key]["fusion_adapters"]


def test_fusion_resumes_after_interruption(reference, stage1, tiny_sd_path, tmp_path):
    output_dir, written = tmp_path / "resumed", []

    def stop_after_two(shard, path):
        written.append(shard)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(output_dir, tiny_sd_path, stage1["image"], on_shard_written=stop_after_two)
    rewritten = []
    run(output_dir, tiny_sd_path, stage1["image"], on_shard_written=lambda shard, path: rewritten.append(shard))
    assert len(rewritten) == 2
    assert shard_files(output_dir) == shard_files(reference)
    # Other weights are other settings: no resuming into this folder.
    with pytest.raises(GenerationInputError, match="fusion_weights"):
        run(output_dir, tiny_sd_path, stage1["image"], fusion_weights=[0.5, 0.5])


def test_fusion_killed_with_sigkill_then_rerun_equals_uninterrupted_run(reference, stage1, tiny_sd_path, tmp_path):
    output_dir = tmp_path / "killed"
    child = f"""
import os, signal, torch
from datadream_hf.generate.config import GenerationArguments, GenerationConfig
from datadream_hf.generate.run import generate_synthetic_dataset
torch.set_num_threads(1)
args = GenerationArguments(pretrained_model_name_or_path={tiny_sd_path!r}, adapter_path={stage1["image"]!r},
                           output_dir={str(output_dir)!r})
generate_synthetic_dataset(args, GenerationConfig(**{ {**SMALL, **FUSION}!r}),
                           on_shard_written=lambda shard, path: os.kill(os.getpid(), signal.SIGKILL))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run([sys.executable, "-c", child], env=env, timeout=300).returncode == -9
    assert len(list(output_dir.rglob("*.parquet"))) == 1  # killed after its first shard
    run(output_dir, tiny_sd_path, stage1["image"])
    assert shard_files(output_dir) == shard_files(reference)


def test_two_processes_give_the_same_fused_images_as_one(reference, stage1, tiny_sd_path, tmp_path):
    output_dir = tmp_path / "two_processes"
    paths = ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1["image"]]
    fusion = ["--fusion", "pairs", "--fusion_weights", "0.7", "0.3"]
    command = accelerate_launch_command(SCRIPT, 2) + paths + ["--output_dir", str(output_dir)] + SMALL_FLAGS + fusion
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 2/2: 2 shard(s), 6 images to generate." in result.stderr
    assert shard_files(output_dir) == shard_files(reference)


def test_stage1_image_mode_output_generates_with_fusion(digits, tiny_sd_path, tmp_path):
    """The real hand-over: stage 1's `--mode image` folder (2 classes x K=3, 2 steps) -> fusion -> each image's pair
    names the manifest rows those adapters were trained on."""
    from accelerate import Accelerator

    from datadream_hf.adapt.config import GeneratorTrainingConfig
    from datadream_hf.adapt.data import FewShotData
    from datadream_hf.adapt.train import train_generator
    from datadream_hf.data import load_labelled_dataset
    from datadream_hf.few_shot import draw_few_shot

    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    manifest = draw_few_shot(dataset, k=3, seed=0, source_name="digits", split="train")
    config = GeneratorTrainingConfig(
        pretrained_model_name_or_path=tiny_sd_path, output_dir=str(tmp_path / "stage1"), mode="image",
        resolution=32, max_train_steps=2, lr_warmup_steps=0, report_to=None,
    )  # fmt: skip
    train_generator(config, FewShotData.from_dataset(dataset, manifest), Accelerator(cpu=True))
    run(tmp_path / "loft", tiny_sd_path, str(tmp_path / "stage1"), images_per_class=3, shard_size=3)
    rows = shard_rows(tmp_path / "loft")
    for c in (0, 1):
        assert {row for k in range(3) for row in rows[c, k]["fusion_rows"]} == set(manifest.indices[c])


# --- bad input ----------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "image adapters without --fusion": ("image", {"fusion": None}, r"pass --fusion pairs"),
    "--fusion with cls adapters": ("cls", {}, r"--fusion pairs mixes per-image adapters.*cls-mode"),
    "--fusion without adapters": (None, {"no_adapter": True, "class_names": CLASSES}, r"this run has no adapter"),
    "a class with one image adapter": ("single", {}, r"Class 'one' has 1 image adapter"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_fusion_input_fails_before_any_image(case, stage1, tiny_sd_path, tmp_path):
    folder, kwargs, message = BAD_INPUTS[case]
    with pytest.raises(GenerationInputError, match=message):
        run(tmp_path / "out", tiny_sd_path, stage1[folder] if folder else None, **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_missing_image_adapter_is_named_by_class_and_row(stage1, tiny_sd_path, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(stage1["image"], adapters)
    (adapters / "0001_one" / "image_000101" / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(GenerationInputError, match=r"Missing adapter for class 'one', image row 101 \(adapter 4\)"):
        run(tmp_path / "out", tiny_sd_path, str(adapters))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "weights, message",
    [([0.5], "must be two numbers"), ([0.5, 1.5], r"`--fusion_weights` = 1.5 is invalid"), ([0, 0], "both 0")],
)
def test_bad_fusion_weights_are_refused(weights, message):
    with pytest.raises(GenerationInputError, match=message):
        GenerationConfig(fusion="pairs", fusion_weights=weights)


def test_runs_without_fusion_keep_their_recorded_settings():
    """No fusion keys in a run without fusion: its fingerprint, hence resuming its folder, is as before."""
    assert "fusion" not in GenerationConfig().to_dict() and "fusion_weights" not in GenerationConfig().to_dict()
    assert GenerationConfig(**FUSION).to_dict()["fusion_weights"] == WEIGHTS
