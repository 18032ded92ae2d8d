"""Tiny offline models, prompts, LoRA placement/I-O, the output layout, cards, and the installed wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from datadream_hf.adapter_index import adapter_index, image_adapter_index, image_adapters_by_class, read_adapter_index
from datadream_hf.cards import available_templates, render_card
from datadream_hf.files import write_json_atomic
from datadream_hf.lora import generator_lora_configs, load_safetensors, save_generator_lora
from datadream_hf.prompts import PromptTemplate, domain_for_preset
from datadream_hf.run_folder import class_folder_name
from datadream_hf.testing import build_tiny_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]


def generate(pipe, seed, prompt="a photo of a zero"):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=3, guidance_scale=2.0, generator=generator, output_type="np").images


def test_tiny_pipeline_reloads_offline_and_is_seeded(tiny_sd_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    first, again, other = generate(pipe, 0), generate(pipe, 0), generate(pipe, 1)
    assert first.shape == (1, 32, 32, 3)
    assert (first == again).all()
    assert not (first == other).all()


def test_tiny_clip_reloads_offline(tiny_clip_path):
    model = CLIPModel.from_pretrained(tiny_clip_path)
    processor = CLIPProcessor.from_pretrained(tiny_clip_path)
    inputs = processor(text=["a photo of a zero", "a photo of a one"], return_tensors="pt", padding=True)
    assert model.get_text_features(**inputs).pooler_output.shape == (2, 32)


def test_tiny_tokenizer_keeps_prompt_words_whole():
    tokenizer = build_tiny_clip_tokenizer()
    tokens = tokenizer.tokenize("a photo of a seven")
    assert tokens == ["a</w>", "photo</w>", "of</w>", "a</w>", "seven</w>"]
    assert tokenizer("x" * 500).input_ids[:1] == [tokenizer.bos_token_id]  # unknown text still tokenizes
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize(
    "preset, name, expected",
    [
        ("fgvc_aircraft", "DHC-3-800", "a aircraft photo of a DHC-3-800"),
        ("imagenet", "tench", "a photo of a tench"),
        ("eurosat", "AnnualCrop", "a satellite photo of a AnnualCrop"),
        ("dtd", "banded", "a texture photo of a banded"),
    ],
)
def test_preset_prompts_match_the_reference(preset, name, expected):
    assert PromptTemplate.from_preset(preset)(name) == expected


def test_prompt_cleaning_is_opt_in():
    assert PromptTemplate()("sea_lion") == "a photo of a sea_lion"
    assert PromptTemplate(clean_class_names=True)("sea_lion") == "a photo of a sea lion"


@pytest.mark.parametrize(
    "kwargs, match", [({"domain": "car"}, "must end with a space"), ({"template": "x"}, "classname")]
)
def test_bad_prompt_template(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptTemplate(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown dataset preset 'birds'"):
        domain_for_preset("birds")


def test_generator_lora_placement_matches_the_paper():
    unet_config, text_config = generator_lora_configs()
    assert (unet_config.r, unet_config.lora_alpha, unet_config.init_lora_weights) == (16, 16, "gaussian")
    assert set(unet_config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert set(text_config.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_saved_generator_lora_reloads_bit_exactly(tiny_sd_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base = generate(pipe, 0)
    unet_config, text_config = generator_lora_configs(init=False)  # non-zero B: the adapter changes outputs
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    adapted = generate(pipe, 0)
    path = save_generator_lora(tmp_path, pipe.unet, pipe.text_encoder)
    assert path.name == "pytorch_lora_weights.safetensors"

    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    fresh.load_lora_weights(str(tmp_path))
    assert (generate(fresh, 0) == adapted).all()
    assert not (adapted == base).all()


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_safetensors(tmp_path / "w.bin")


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "a/b", "..", ".", "with space", "Ünïcödé 猫", "x" * 300, "C:\\windows", "", "-rf"],
)
def test_class_folder_names_cannot_escape(tmp_path, name):
    folder = class_folder_name(7, name)
    assert folder.startswith("0007")
    assert "/" not in folder and "\\" not in folder and ".." not in folder and len(folder) <= 60
    assert (tmp_path / folder).resolve().parent == tmp_path.resolve()


def test_class_folder_names_stay_unique():
    names = ["a/b", "a_b", "a b"]
    assert len({class_folder_name(i, n) for i, n in enumerate(names)}) == 3


def test_adapter_index_roundtrip_and_errors(tmp_path):
    write_json_atomic(tmp_path / "adapter_index.json", adapter_index("cls", ["a", "b"]))
    assert read_adapter_index(tmp_path)["adapters"] == {"0": "0000_a", "1": "0001_b"}
    broken = adapter_index("cls", ["a", "b"])
    del broken["adapters"]["1"]
    write_json_atomic(tmp_path / "adapter_index.json", broken)
    with pytest.raises(ValueError, match=r"no adapter for class\(es\) \['b'\]"):
        read_adapter_index(tmp_path)
    escaping = adapter_index("cls", ["a"]) | {"adapters": {"0": "../elsewhere"}}
    write_json_atomic(tmp_path / "adapter_index.json", escaping)
    with pytest.raises(ValueError, match="points outside"):
        read_adapter_index(tmp_path)
    (tmp_path / "adapter_index.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_index.json"):
        read_adapter_index(tmp_path / "nowhere")


def test_missing_card_template():
    with pytest.raises(FileNotFoundError, match="No card template 'nope.md'"):
        render_card("nope.md")


def test_cards_ship_in_the_wheel(tmp_path):
    """Builds the wheel, unpacks it as an installer would, and renders the cards from there, not the checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("datadream_hf-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert available_templates(), "no templates in model_cards/"
    for template in available_templates():
        assert (site / "datadream_hf" / "model_cards" / template).is_file()
    package = REPO / "datadream_hf"
    shipped = [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = [p for p in shipped if not (site / p.relative_to(REPO)).is_file()]
    assert not missing, f"not in the wheel (setup.cfg `packages` / `package_data`): {missing}"
    code = (
        "import datadream_hf, datadream_hf.cards as c; "
        f"assert datadream_hf.__file__.startswith({str(site)!r}), datadream_hf.__file__; "
        "print(c.available_templates())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == available_templates()


def test_image_adapter_index_roundtrip_and_errors(tmp_path):
    index = image_adapter_index(["a", "b"], [[7, 3], [12]])
    assert index["adapters"] == {"0": "0000_a/image_000007", "1": "0000_a/image_000003", "2": "0001_b/image_000012"}
    write_json_atomic(tmp_path / "adapter_index.json", index)
    read = read_adapter_index(tmp_path)
    assert image_adapters_by_class(read) == [[(7, "0000_a/image_000007"), (3, "0000_a/image_000003")],
                                             [(12, "0001_b/image_000012")]]  # fmt: skip
    no_b = image_adapter_index(["a", "b"], [[7, 3], []])
    write_json_atomic(tmp_path / "adapter_index.json", no_b)
    with pytest.raises(ValueError, match=r"no image adapter for class\(es\) \['b'\]"):
        read_adapter_index(tmp_path)
    bad_class = index | {"images": {**index["images"], "2": {"class": 5, "row": 12}}}
    write_json_atomic(tmp_path / "adapter_index.json", bad_class)
    with pytest.raises(ValueError, match=r"images\['2'\]"):
        read_adapter_index(tmp_path)
    shared = index | {"adapters": {**index["adapters"], "1": "0000_a/image_000007"}}
    write_json_atomic(tmp_path / "adapter_index.json", shared)
    with pytest.raises(ValueError, match="share a folder"):
        read_adapter_index(tmp_path)
