"""Generator families beyond SD 2.x on tiny pipelines built in code (SDXL; SD 3.5-style without T5): stage 1 dset and
cls (grouped equals sequential, a killed run resumes to the same adapters, `accelerate launch`), LoFT's image mode and
pair fusion, adapters read by the pipeline's own `load_lora_weights`, stage-2 datasets, and the bad inputs (an
unsupported pipeline kind, adapters of another family). SD 1/2 is covered by test_stage1.py / test_stage2.py, on the
same family layer."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import FewShotData
from datadream_hf.adapt.modeling import load_generator_models
from datadream_hf.adapt.train import train_generator
from datadream_hf.data import load_labelled_dataset
from datadream_hf.families import FAMILIES, UnsupportedPipelineError, read_family
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.generate.config import GenerationArguments, GenerationConfig, GenerationInputError
from datadream_hf.generate.run import generate_synthetic_dataset
from datadream_hf.generate.sampling import load_generation_pipeline
from datadream_hf.lora import LORA_WEIGHT_NAME, load_safetensors
from datadream_hf.testing import accelerate_launch_command, save_tiny_generator, write_fake_stage1_output

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_datadream_lora.py"
CLASSES = ["zero", "one"]
FOLDERS = ["0000_zero", "0001_one"]
# 32 px, batch 2, 2 steps per adapter, a checkpoint after step 1; a large lr so that 2 steps visibly change outputs.
RUN = {"resolution": 32, "train_batch_size": 2, "max_train_steps": 2, "lr_warmup_steps": 0, "learning_rate": 1e-2,
       "checkpointing_steps": 1, "rank": 4, "report_to": None, "mode": "cls",
       "cls_strategy": "sequential"}  # fmt: skip
# Which components each family's adapter file holds LoRA weights for (the pipeline's own names).
COMPONENTS = {
    "sdxl": {"unet", "text_encoder", "text_encoder_2"},
    "sd3": {"transformer", "text_encoder", "text_encoder_2"},
}


class Crash(RuntimeError):
    """Stands for a process killed mid-run."""


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def few_shot(digits, tmp_path_factory):
    """2 digit classes, K=2: the FewShotData and its files (dataset folder, manifest) for the script."""
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    manifest = draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train")
    root = tmp_path_factory.mktemp("families-data")
    digits.save_to_disk(str(root / "digits"))
    manifest.save(root / "manifest.json")
    return FewShotData.from_dataset(dataset, manifest), str(root / "digits"), str(root / "manifest.json")


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    return {family: save_tiny_generator(root / f"tiny-{family}", family) for family in ("sdxl", "sd3")}


@pytest.fixture(scope="module", params=["sdxl", "sd3"])
def family_run(request, tiny_paths, few_shot, accelerator, tmp_path_factory):
    """A sequential cls run of a family's tiny pipeline (its models kept for further runs)."""
    family, path = request.param, tiny_paths[request.param]
    output_dir = tmp_path_factory.mktemp(f"{family}-cls")
    config = GeneratorTrainingConfig(pretrained_model_name_or_path=path, output_dir=str(output_dir), **RUN)
    models = load_generator_models(config)
    train_generator(config, few_shot[0], accelerator, models=models)
    return family, path, config, models, output_dir


def adapters(root: Path) -> list[dict[str, torch.Tensor]]:
    return [load_safetensors(root / folder / LORA_WEIGHT_NAME) for folder in FOLDERS]


def assert_close_adapters(expected: list[dict], actual: list[dict]) -> None:
    """Equal to float rounding: equal keys, every weight within 1e-3 (a tenth of the lr: AdamW moves an element whose
    gradient is rounding noise by up to ~lr per step, and thread counts change the rounding; 1.1e-4 was seen at 2
    threads), and each adapter's B factors within 1e-3 of their norm (a routing mistake moves them by ~lr)."""
    for a, b in zip(expected, actual):
        assert set(a) == set(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
        ups = [k for k in a if k.endswith(("lora_B.weight", "up.weight"))]
        difference = torch.cat([(a[k] - b[k]).flatten() for k in ups]).norm()
        assert difference / torch.cat([a[k].flatten() for k in ups]).norm() < 1e-3


def test_the_family_comes_from_model_index_and_places_lora_as_diffusers_scripts(family_run):
    family, path, _, models, output_dir = family_run
    assert read_family(path).name == family and models.family.name == family
    record = json.loads((output_dir / "datadream_config.json").read_text())
    assert record["generator_family"] == {"name": family, "pipeline_class": models.family.pipeline_class_name}
    keys = set(adapters(output_dir)[0])
    assert {key.split(".")[0] for key in keys} == COMPONENTS[family]
    if family == "sd3":  # the joint attention's text stream too, and SD 3.5's second attention
        for name in ("attn.add_q_proj", "attn.to_add_out", "attn2.to_q"):
            assert any(f".{name}.lora" in key for key in keys), name


def test_adapters_load_with_the_pipelines_own_loader_and_change_its_output(family_run):
    from peft.utils import get_peft_model_state_dict

    family, path, _, models, output_dir = family_run
    family_class = models.family
    pipeline = family_class.pipeline_class().from_pretrained(
        path, use_safetensors=True, **family_class.pipeline_kwargs
    )
    pipeline.set_progress_bar_config(disable=True)

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a photo of a one", num_inference_steps=2, height=32, width=32, generator=generator,
                        output_type="np").images  # fmt: skip

    base = sample()
    pipeline.load_lora_weights(str(output_dir / FOLDERS[1]), adapter_name="one")
    saved = adapters(output_dir)[1]
    for component in COMPONENTS[family]:
        # Every factor of the file reached a LoRA layer (a loader may skip keys it does not read without an error).
        loaded = get_peft_model_state_dict(getattr(pipeline, component), adapter_name="one")
        in_file = [key for key in saved if key.startswith(f"{component}.")]
        assert len(loaded) == len(in_file) > 0, component
    assert np.abs(sample() - base).max() > 1e-3


def test_grouped_cls_equals_sequential_and_a_killed_run_resumes_to_the_same_adapters(
    family_run, few_shot, accelerator, tmp_path
):
    _, _, config, models, sequential = family_run
    grouped = GeneratorTrainingConfig(
        **{**config.to_dict(), "cls_strategy": "grouped", "output_dir": str(tmp_path / "a")}
    )
    train_generator(grouped, few_shot[0], accelerator, models=models)
    assert_close_adapters(adapters(sequential), adapters(tmp_path / "a"))

    def crash(unit, done):
        if done == 1:
            raise Crash("killed after step 1")

    killed = GeneratorTrainingConfig(**{**grouped.to_dict(), "output_dir": str(tmp_path / "b")})
    with pytest.raises(Crash):
        train_generator(killed, few_shot[0], accelerator, models=models, step_callback=crash)
    assert not (tmp_path / "b" / FOLDERS[0] / LORA_WEIGHT_NAME).exists()
    resumed = GeneratorTrainingConfig(**{**killed.to_dict(), "resume_from_checkpoint": "latest"})
    train_generator(resumed, few_shot[0], accelerator, models=models)
    for expected, actual in zip(adapters(tmp_path / "a"), adapters(tmp_path / "b")):
        assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_dset_trains_one_adapter_for_all_classes(family_run, few_shot, accelerator, tmp_path):
    family, _, config, models, _ = family_run
    dset = GeneratorTrainingConfig(**{**config.to_dict(), "mode": "dset", "output_dir": str(tmp_path)})
    train_generator(dset, few_shot[0], accelerator, models=models)
    weights = load_safetensors(tmp_path / LORA_WEIGHT_NAME)
    assert {key.split(".")[0] for key in weights} == COMPONENTS[family]
    trained = {}  # component -> whether each of its B factors moved from zero
    for key, value in weights.items():
        if key.endswith(("lora_B.weight", "up.weight")):
            trained.setdefault(key.split(".")[0], []).append(bool(value.abs().sum() > 0))
    # Every component trains, but no layer whose output nothing reads: the text encoders' last layer where only the
    # penultimate states condition (SDXL's first encoder), SD3's last-block text query (its text stream ends there).
    assert trained.keys() == COMPONENTS[family] and all(any(moved) for moved in trained.values())
    assert sum(trained[models.family.denoiser_name]) >= len(trained[models.family.denoiser_name]) - 1
    assert json.loads((tmp_path / "adapter_index.json").read_text())["mode"] == "dset"


def test_stage2_generates_a_dataset_with_the_familys_pipeline(family_run, tmp_path):
    from datasets import load_dataset

    family, path, _, _, output_dir = family_run
    args = GenerationArguments(pretrained_model_name_or_path=path, adapter_path=str(output_dir),
                               output_dir=str(tmp_path / "synthetic"))  # fmt: skip
    config = GenerationConfig(images_per_class=2, num_inference_steps=2, batch_size=2, shard_size=2)
    info = generate_synthetic_dataset(args, config)
    assert info["generation"]["resolution"] == 32  # the model's own (sample size x the VAE factor)
    dataset = load_dataset(str(tmp_path / "synthetic"), split="train")
    assert dataset.features["label"].names == CLASSES and len(dataset) == 4
    images = [np.asarray(image) for image in dataset["image"]]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[-1])


def test_loft_image_adapters_and_pair_fusion_run_on_the_family(family_run, few_shot, accelerator, tmp_path):
    # LoFT on the family: one denoiser-only LoRA per K-shot image, then each image made with a pair of its class's.
    from datadream_hf.synthetic import load_synthetic_dataset

    _, path, _, _, _ = family_run
    stage1 = tmp_path / "image"
    config = GeneratorTrainingConfig(pretrained_model_name_or_path=path, output_dir=str(stage1), mode="image",
                                     resolution=32, max_train_steps=2, lr_warmup_steps=0, learning_rate=1e-2,
                                     report_to=None)  # fmt: skip
    train_generator(config, few_shot[0], accelerator)
    index = json.loads((stage1 / "adapter_index.json").read_text())
    assert index["mode"] == "image" and len(index["adapters"]) == 4  # 2 classes x K=2
    denoiser = read_family(path).denoiser_name
    for folder in index["adapters"].values():
        weights = load_safetensors(stage1 / folder / LORA_WEIGHT_NAME)
        assert {key.split(".")[0] for key in weights} == {denoiser}  # LoFT: no text-encoder LoRA
        assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith(("lora_B.weight", "up.weight")))

    args = GenerationArguments(pretrained_model_name_or_path=path, adapter_path=str(stage1),
                               output_dir=str(tmp_path / "synthetic"))  # fmt: skip
    generate_synthetic_dataset(args, GenerationConfig(images_per_class=2, num_inference_steps=2, batch_size=2,
                                                      shard_size=2, fusion="pairs"))  # fmt: skip
    dataset = load_synthetic_dataset(tmp_path / "synthetic")
    assert len(dataset) == 4 and dataset.features["label"].names == CLASSES
    for row in dataset:
        pair = row["fusion_adapters"]
        assert len(set(pair)) == 2 and all(index["images"][key]["class"] == row["label"] for key in pair)
        assert row["fusion_weights"] == [0.5, 0.5]


def test_adapters_of_another_family_are_refused_before_generating(
    family_run, tiny_paths, tiny_sd_path, tmp_path, monkeypatch
):
    import datadream_hf.generate.run

    family, _, _, models, output_dir = family_run
    other = tiny_paths["sd3" if family == "sdxl" else "sdxl"]
    config = GenerationConfig(images_per_class=1, num_inference_steps=1)

    def arguments(adapter_path, base):
        return GenerationArguments(pretrained_model_name_or_path=base, adapter_path=str(adapter_path),
                                   output_dir=str(tmp_path / "out"), allow_base_model_mismatch=True)  # fmt: skip

    # 1. The family stage 1 recorded is checked before the pipeline loads (even with --allow_base_model_mismatch).
    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(datadream_hf.generate.run, "load_generation_pipeline", no_load)
        pattern = (f"trained on a {models.family.pipeline_class_name}, but the base model is a "
                   f"{read_family(other).pipeline_class_name}")  # fmt: skip
        with pytest.raises(GenerationInputError, match=pattern):
            generate_synthetic_dataset(arguments(output_dir, other), config)
    # 2. Adapters without a recorded family (a folder written before families were recorded): by their LoRA keys,
    #    once the pipeline is loaded, before the first image.
    sd_adapters = write_fake_stage1_output(tmp_path / "sd-adapters", tiny_sd_path, CLASSES)
    pattern = r"Adapter .*sd-adapters.* (does not fit the base model|another (base model|model family))"
    with pytest.raises(GenerationInputError, match=pattern):
        generate_synthetic_dataset(arguments(sd_adapters, tiny_paths[family]), config)
    assert not (tmp_path / "out" / "generation_config.json").exists()


def test_an_unsupported_pipeline_kind_is_refused_in_one_line(tiny_sd_path, few_shot, accelerator, tmp_path):
    model = tmp_path / "flux-like"
    shutil.copytree(tiny_sd_path, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    supported = ", ".join(repr(name) for name in sorted(FAMILIES))
    expected = rf"is a FluxPipeline, which is not supported: use a base model of one of \[{supported}\]\.$"
    config = GeneratorTrainingConfig(pretrained_model_name_or_path=str(model), output_dir=str(tmp_path / "out"), **RUN)
    for attempt in (
        lambda: load_generator_models(config),
        lambda: train_generator(config, few_shot[0], accelerator),
        lambda: load_generation_pipeline(str(model)),
    ):
        with pytest.raises(UnsupportedPipelineError, match=expected) as error:
            attempt()
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_two_processes_train_a_familys_cls_adapters_through_accelerate_launch(family, tiny_paths, few_shot, tmp_path):
    """The launcher per family (SD 1/2: test_stage1.py): 2 processes, one class each, grouped 'auto' sizing, a
    validation sample through the family's pipeline; the adapters equal a sequential one-process run to rounding."""
    import os

    _, data_path, manifest_path = few_shot
    flags = {**RUN, "cls_strategy": "auto", "report_to": "none", "num_validation_images": 1,
             "validation_num_inference_steps": 1}  # fmt: skip
    args = ["--pretrained_model_name_or_path", tiny_paths[family], "--dataset", data_path, "--few_shot_manifest",
            manifest_path, "--output_dir", str(tmp_path / "launched")]  # fmt: skip
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(accelerate_launch_command(SCRIPT, 2) + args, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 1 of 2 trains adapter(s) ['one']" in result.stderr
    assert all((tmp_path / "launched" / folder / "samples.png").is_file() for folder in FOLDERS)
    reference = GeneratorTrainingConfig(pretrained_model_name_or_path=tiny_paths[family],
                                        output_dir=str(tmp_path / "reference"), **RUN)  # fmt: skip
    train_generator(reference, few_shot[0], Accelerator(cpu=True))
    assert_close_adapters(adapters(tmp_path / "reference"), adapters(tmp_path / "launched"))
