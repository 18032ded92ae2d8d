"""`make demo` in miniature (every stage on the shipped tiny world, through the real scripts, then the report), and
the pieces it stands on: disjoint data sets, nested K-shot manifests, the recipe's commands, the targets."""

import importlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from datadream_hf.data import DatasetInputError, labels_of
from datadream_hf.few_shot import FewShotManifest, draw_few_shot
from datadream_hf.tiny_world.demo_data import HELD_OUT_SEED, HELD_OUT_SHOTS, prepare_demo_data
from datadream_hf.tiny_world.recipe import TinyWorldRecipe
from datadream_hf.tiny_world.report import best_generator, evaluate_claims, evaluate_targets
from datadream_hf.tiny_world.statistics import paired_difference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training_scripts" / "run_demo.py"
GENERATORS = ("datadream_cls", "datadream_dset", "loft", "frozen")
# stage 1 (cls, dset, image) and stage 2 (4 generators), then stage 3 for each of the quick run's 2 seeds (real; 2
# modes x (4 generators + oracle))
STAGES_1_2 = 3 + 4
CLASSIFIER_RUNS = 2 * (1 + 2 * 5)


def test_quick_demo_writes_the_full_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = {row["run"] for row in summary["accuracy"]}
    assert runs == {"real"} | {f"{g}/{m}" for g in (*GENERATORS, "oracle") for m in ("synthetic", "real+synthetic")}
    assert set(summary["alignment"]) == set(GENERATORS)
    report = (out / "report.md").read_text()
    assert "oracle (held-out real)" in report and "Frechet" in report and "The paper's claims as targets" in report
    assert "## Test accuracy, K = 16" in result.stdout  # the summary is printed
    assert len(json.loads((out / "timings.json").read_text())) == STAGES_1_2 + 1  # stage 3's wall clock
    assert len(json.loads((out / "stage3" / "run_times.json").read_text())) == CLASSIFIER_RUNS
    assert {claim["a"] for claim in summary["claims"]} >= {"loft/real+synthetic", "datadream_cls/real+synthetic"}
    assert all(len(claim["differences"]) == 2 and len(claim["interval"]) == 2 for claim in summary["claims"])
    assert set(summary["class_fidelity"]) == set(summary["nearest_shot_distance"]) == {*GENERATORS, "real test images"}
    assert "distance to nearest shot" in report
    for figure in ("grid.png", "alignment.png"):
        assert (out / figure).stat().st_size > 1000

    # A second run resumes: every stage is found finished and skipped, and what the first run cost stays recorded.
    timings = (out / "timings.json").read_text()
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == STAGES_1_2 + 1
    assert f"{CLASSIFIER_RUNS} classifier runs ({CLASSIFIER_RUNS} already done)" in again.stderr
    assert (out / "timings.json").read_text() == timings


def test_demo_data_sets_are_disjoint_and_the_shots_were_held_out_of_pretraining(tmp_path, digits):
    paths = prepare_demo_data(tmp_path, k=4, validation_per_class=16, oracle_per_class=90)
    train = digits["train"]
    held_out = draw_few_shot(train, k=HELD_OUT_SHOTS, seed=HELD_OUT_SEED)  # what pre-training left out
    manifest = FewShotManifest.load(paths.manifest)
    assert manifest.k == 4 and manifest.source["subset_of"] == {"k": 16, "seed": 0}
    for shots, pool in zip(manifest.indices, held_out.indices):
        assert set(shots) <= set(pool)

    saved = load_from_disk(str(paths.dataset))
    assert set(saved) == {"train", "validation", "test"} and len(saved["train"]) == len(train)
    oracle = load_from_disk(str(paths.oracle))
    for split, per_class in ((saved["validation"], 16), (oracle, 90)):
        assert np.bincount(labels_of(split)).tolist() == [per_class] * 10

    # Rows are told apart by their pixels: no validation or oracle image is a held-out shot or the other's image.
    def pixels(dataset):
        return {np.asarray(row["image"]).tobytes() for row in dataset}

    shots = pixels(train.select(held_out.flat_indices))
    validation, oracle_pixels = pixels(saved["validation"]), pixels(oracle)
    assert not shots & validation and not shots & oracle_pixels and not validation & oracle_pixels
    assert not (validation | oracle_pixels | shots) & pixels(saved["test"])

    # K=16 reuses the held-out shots themselves; a re-run reuses the folder.
    k16 = prepare_demo_data(tmp_path / "k16", k=16)
    assert FewShotManifest.load(k16.manifest).indices == held_out.indices
    with pytest.raises(ValueError, match="K must be in 1..16"):
        prepare_demo_data(tmp_path / "bad", k=17)


def test_manifest_subset_is_nested_seeded_and_checked(digits):
    manifest = draw_few_shot(digits["train"], k=16, seed=0)
    small = manifest.subset(4, seed=1)
    assert small.k == 4 and small.class_names == manifest.class_names
    assert all(len(rows) == 4 and set(rows) <= set(pool) for rows, pool in zip(small.indices, manifest.indices))
    assert small.indices == manifest.subset(4, seed=1).indices
    assert small.indices != manifest.subset(4, seed=2).indices
    small.check_matches(digits["train"])  # still a manifest of the same dataset
    with pytest.raises(DatasetInputError, match="1 <= k <= 16"):
        manifest.subset(17)


def _script(name: str):
    sys.path.insert(0, str(ROOT / "training_scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_recipe_commands_are_what_the_scripts_accept(tmp_path):
    recipe = TinyWorldRecipe()
    commands = [shlex.split(c) for c in recipe.commands("gen", "clip", "my_digits", class_names="zero,one")]
    assert commands[0][:2] == ["datadream-hf", "few-shot"] and "--class_names" in commands[0]
    scripts = {"train_datadream_lora.py": "train_datadream_lora", "generate_synthetic.py": "generate_synthetic",
               "train_classifier.py": "train_classifier"}  # fmt: skip
    parsed = {}
    for command in commands[1:]:
        script = next(word for word in command if word.endswith(".py"))
        argv = command[command.index(script) + 1 :]
        parsed[scripts[Path(script).name]] = _script(scripts[Path(script).name]).parse_args(argv)
    stage1 = parsed["train_datadream_lora"][0]
    assert stage1.learning_rate == recipe.lora_learning_rate and stage1.num_train_epochs == recipe.lora_epochs
    assert stage1.mode == "cls" and stage1.lr_warmup_steps == 100 and stage1.resolution == 32
    generation = parsed["generate_synthetic"][1]
    assert generation.guidance_scale == recipe.guidance_scale
    assert generation.num_inference_steps == recipe.num_inference_steps
    classifier, training = parsed["train_classifier"]
    assert training.train_mode == "real+synthetic" and classifier.real_dataset == "my_digits"
    assert training.max_steps == recipe.classifier_steps
    assert training.metric_for_best_model == "loss" and not training.greater_is_better


def test_tiny_world_command_prints_the_shipped_folders_and_the_recipe():
    result = subprocess.run(
        [sys.executable, "-m", "datadream_hf.cli", "tiny-world", "--recipe", "--dataset", "my data", "--k", "4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    folders = json.loads(lines[0])
    assert Path(folders["generator"], "model_index.json").is_file()
    assert Path(folders["clip"], "config.json").is_file()
    assert "--k 4" in lines[2] and "'my data'" in lines[2] and sum(".py" in line for line in lines) == 3
    bad = subprocess.run([sys.executable, "-m", "datadream_hf.cli", "tiny-world", "--k", "0"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode != 0 and "--k" in bad.stderr


def _summary(real, cls_mix, cls_synth=80.0, fidelity=0.9, frozen_fidelity=0.1, validation_mix=None):
    def rows(run, values, validation=None):
        validation = validation or values
        return [{"run": run, "seed": s, "test": v / 100, "validation": w / 100}
                for s, (v, w) in enumerate(zip(values, validation))]  # fmt: skip

    seeds = len(real)
    accuracy = rows("real", real) + rows("datadream_cls/real+synthetic", cls_mix, validation_mix)
    accuracy += rows("datadream_cls/synthetic", [cls_synth] * seeds) + rows("datadream_dset/synthetic", [50] * seeds)
    accuracy += rows("frozen/synthetic", [20] * seeds) + rows("frozen/real+synthetic", [85] * seeds)
    fidelity = {"datadream_cls": {"accuracy": fidelity}, "datadream_dset": {"accuracy": 0.5},
                "frozen": {"accuracy": frozen_fidelity}}  # fmt: skip
    return {"accuracy": accuracy, "class_fidelity": fidelity, "class_names": [str(i) for i in range(10)]}


BEST_BEATS_REAL = "real + synthetic (DataDream cls, best on validation) beats real only"


def test_targets_hold_only_when_the_measurements_clear_them():
    met = {row["target"]: row["met"] for row in evaluate_targets(_summary([90, 90.5, 89.5], [92, 92.5, 91.5]))}
    assert all(met.values()), met
    # +1 point on average, but one seed of three loses: the paired interval reaches below zero.
    noisy = {row["target"]: row["met"] for row in evaluate_targets(_summary([88, 90, 92], [90, 92, 91]))}
    assert not noisy[BEST_BEATS_REAL] and "real + synthetic (DataDream cls) beats real only" not in noisy  # said once
    # The same spread in both runs moves with the seed: the paired difference is +1 on every seed and is met, where
    # the unpaired stds (2 points each) would have drowned it.
    paired = {row["target"]: row["met"] for row in evaluate_targets(_summary([88, 90, 92], [89, 91, 93]))}
    assert paired[BEST_BEATS_REAL]
    weak = {r["target"]: r["met"] for r in evaluate_targets(_summary([90] * 3, [90] * 3, 70, 0.6, 0.2))}
    assert not weak["cls class fidelity >= 70%"] and not weak["synthetic only, cls >= 75% (mean)"]
    assert not weak["frozen class fidelity within 5 points of chance"]


def test_loft_diversity_target_says_how_near_the_shots_its_images_lie_when_it_fails():
    def alignment(recall):
        return [{"class": 0, "recall": recall}, {"class": 1, "recall": recall}, {"class": "all", "recall": 0.0}]

    summary = _summary([90] * 3, [92] * 3)
    summary["class_fidelity"]["loft"] = {"accuracy": 0.9}
    summary["alignment"] = {"loft": alignment(0.6), "datadream_cls": alignment(0.8)}
    summary["nearest_shot_distance"] = {"loft": 0.1, "datadream_cls": 0.2, "real test images": 0.3}
    row = next(r for r in evaluate_targets(summary) if r["target"].startswith("LoFT k-NN recall"))
    assert not row["met"] and row["measured"] == (
        "0.60 vs 0.80; distance to the nearest K shot 0.100 vs 0.200 (real test images 0.300)"
    )
    summary["alignment"]["loft"] = alignment(0.9)
    row = next(r for r in evaluate_targets(summary) if r["target"].startswith("LoFT k-NN recall"))
    assert row["met"] and row["measured"] == "0.90 vs 0.80"


def test_the_best_generator_is_chosen_on_validation_never_on_test():
    # cls is better on test but worse on validation than the frozen generator's 85: the frozen generator is "best".
    summary = _summary([80] * 3, [95, 96, 97], validation_mix=[84, 84, 84])
    assert best_generator(summary["accuracy"]) == "frozen"
    claims = {claim["claim"]: claim for claim in evaluate_claims(summary["accuracy"])}
    best = claims["real + synthetic (frozen generator, best on validation) beats real only"]
    assert best["a"] == "frozen/real+synthetic" and best["differences"] == pytest.approx([5, 5, 5])
    margin = claims["synthetic only: DataDream dset beats the frozen generator by > 10 points"]
    assert margin["mean"] == pytest.approx(30) and margin["met"]


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    difference = paired_difference({0: 91.0, 1: 92.0, 2: 93.0, 5: 50.0}, {0: 90.0, 1: 90.0, 2: 90.0}, "a", "b")
    assert difference.seeds == [0, 1, 2] and difference.differences == [1.0, 2.0, 3.0]  # seed 5 has no pair
    assert difference.mean == pytest.approx(2.0) and difference.std == pytest.approx(1.0)
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, df=2) * std / sqrt(n)
    assert difference.interval == pytest.approx((2.0 - half, 2.0 + half))
    assert not difference.above(0) and not difference.excludes_zero()  # [-0.48, +4.48]: three seeds are too few
    assert difference.above(-0.5)
    assert difference.describe() == f"+2.0 [{2 - half:+.1f}, {2 + half:+.1f}] (n=3)"
    single = paired_difference({0: 1.0}, {0: 0.0})
    assert single.interval is None and not single.above(-100) and "no interval" in single.describe()
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0}, "real", "mix")
