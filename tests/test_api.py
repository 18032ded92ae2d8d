"""The public API: `from datadream_hf import ...` gives what the README's "Use it from Python" uses, lazily (importing
the package loads no model library), and that section's code runs as written on the tiny models."""

import json
import re
import subprocess
import sys
from pathlib import Path

import datadream_hf

REPO = Path(__file__).resolve().parents[1]
PUBLIC_API = {
    "load_labelled_dataset", "FewShotManifest", "draw_few_shot", "PromptTemplate",
    "GeneratorTrainingConfig", "load_few_shot_data", "train_generator",
    "GenerationArguments", "GenerationConfig", "generate_synthetic_dataset", "load_synthetic_dataset",
    "ClassifierArguments", "DataDreamTrainingArguments", "CLIPLoRAClassifier", "MixedRealSyntheticTrainer",
    "train_classifier", "load_trained_classifier",
}  # fmt: skip


def readme_python_section(title: str = "Use it from Python") -> str:
    """The code block of a README section (default: "Use it from Python")."""
    section = (REPO / "README.md").read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_public_api_is_the_list_and_each_name_is_defined_where_the_table_says():
    assert set(datadream_hf.__all__) == PUBLIC_API and len(datadream_hf.__all__) == len(PUBLIC_API)
    for name in PUBLIC_API:
        value = getattr(datadream_hf, name)
        assert value.__module__ == f"datadream_hf.{datadream_hf._PUBLIC_API[name]}", name
    assert set(dir(datadream_hf)) >= PUBLIC_API


def test_importing_the_package_loads_no_model_library():
    heavy = ("torch", "diffusers", "transformers", "datasets")
    code = f"import sys, datadream_hf; print([m for m in {heavy} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_readme_python_section_runs(tmp_path, monkeypatch):
    import datasets

    from datadream_hf.cli import main as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cli(["tiny-models", "--output_dir", "models"])  # the README's setup line
    cli(["digits", "--output_dir", "digits"])
    exec(compile(readme_python_section(), "README.md", "exec"), {"__name__": "readme"})
    assert json.loads(Path("adapters/adapter_index.json").read_text())["class_names"] == ["zero", "one"]
    assert json.loads(Path("synthetic/generation_manifest.json").read_text())["num_images"] == 16
    report = json.loads(Path("classifier/report.json").read_text())
    assert set(report["evaluations"]) == {"validation", "test"} and report["real_loss_weight"] == 0.8

    # "Use the Trainer in your own script", on that section's folders: plain datasets, a transform, `is_real`.
    namespace = {"__name__": "readme"}
    exec(compile(readme_python_section("Use the Trainer in your own script"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 4 and trainer.args.samples_per_batch() == (4, 4)
    assert (trainer.train_dataset.num_real, trainer.train_dataset.num_synthetic) == (16, 16)
    assert "eval_loss" in trainer.state.log_history[-1]
