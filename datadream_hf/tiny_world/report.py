"""The demo's report: the accuracy table (with every seed's value), the paper's claims checked as targets, class
fidelity, alignment of synthetic with real features, and real-vs-generated image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import decode_images, labels_of, load_labelled_dataset
from ..few_shot import FewShotManifest
from ..files import save_png_atomic, write_text_atomic
from ..grids import image_grid
from ..synthetic import load_synthetic_dataset
from .demo_data import DemoData
from .statistics import paired_difference

GRID_IMAGES = 6
ORACLE = "oracle"
COLUMNS = {"datadream_cls": "DataDream cls", "datadream_dset": "DataDream dset", "loft": "LoFT",
           "frozen": "frozen generator", ORACLE: "oracle (held-out real)"}  # fmt: skip
ROWS = {"synthetic": "synthetic only", "real+synthetic": "real (K) + synthetic, lambda 0.8"}


def accuracy_statistics(accuracy: list[dict], split: str = "test") -> dict[str, dict]:
    """Per run, in first-seen order: mean, sample standard deviation (ddof=1; None for a single seed) and every seed's
    value of `split` accuracy (in %)."""
    runs = list(dict.fromkeys(row["run"] for row in accuracy))
    table = {}
    for run in runs:
        rows = [row for row in accuracy if row["run"] == run]
        values = np.array([100 * row[split] for row in rows])
        std = float(values.std(ddof=1)) if len(values) > 1 else None
        table[run] = {"mean": float(values.mean()), "std": std, "values": values.tolist(),
                      "seeds": [row["seed"] for row in rows]}  # fmt: skip
    return table


def _cell(stats: dict | None) -> str:
    if stats is None:
        return ""
    std = f" ± {stats['std']:.1f}" if stats["std"] is not None else ""
    return f"{stats['mean']:.1f}{std}"


def accuracy_markdown(accuracy: list[dict], split: str = "test") -> list[str]:
    """The table of the issue: rows synthetic only / real + synthetic / real only, columns the generators and the
    oracle; then every seed's value."""
    stats = accuracy_statistics(accuracy, split)
    columns = [c for c in COLUMNS if any(run.startswith(f"{c}/") for run in stats)]
    lines = ["| classifier trained on | " + " | ".join(COLUMNS[c] for c in columns) + " |",
             "| --- |" + " --- |" * len(columns)]  # fmt: skip
    for mode, label in ROWS.items():
        lines.append(f"| {label} | " + " | ".join(_cell(stats.get(f"{c}/{mode}")) for c in columns) + " |")
    lines.append("| real only (K) | " + _cell(stats.get("real")) + " |" + " |" * (len(columns) - 1))
    lines += ["", "Every seed (seed: accuracy):", ""]
    for run, row in stats.items():
        values = ", ".join(f"{seed}: {value:.1f}" for seed, value in zip(row["seeds"], row["values"]))
        lines.append(f"- {run}: {values}")
    return lines


def seed_values(accuracy: list[dict], run: str, split: str = "test") -> dict[int, float]:
    """`run`'s accuracy on `split` per seed, in points."""
    return {row["seed"]: 100 * row[split] for row in accuracy if row["run"] == run}


def best_generator(accuracy: list[dict]) -> str | None:
    """The generator whose real + synthetic classifiers have the highest mean validation accuracy (chosen on
    validation, never on test; the oracle is a control, not a generator)."""
    scores = {
        run.split("/")[0]: np.mean(list(seed_values(accuracy, run, "validation").values()))
        for run in dict.fromkeys(row["run"] for row in accuracy)
        if run.endswith("/real+synthetic") and not run.startswith(f"{ORACLE}/")
    }
    return max(scores, key=scores.get) if scores else None


def evaluate_claims(accuracy: list[dict]) -> list[dict]:
    """Every "A beats B" of the demo as a paired difference over seeds on the test split with its 95% t-interval;
    a claim is met only when the whole interval lies above its margin (0 unless stated)."""
    best = best_generator(accuracy)
    claims = [
        (f"real + synthetic ({COLUMNS.get(best, best)}, best on validation) beats real only",
         f"{best}/real+synthetic", "real", 0.0),
        ("real + synthetic (DataDream cls) beats real only", "datadream_cls/real+synthetic", "real", 0.0),
        ("real + synthetic (LoFT) beats real only", "loft/real+synthetic", "real", 0.0),
        ("synthetic only: DataDream dset beats the frozen generator by > 10 points", "datadream_dset/synthetic",
         "frozen/synthetic", 10.0),
        ("synthetic only: LoFT beats DataDream cls", "loft/synthetic", "datadream_cls/synthetic", 0.0),
        ("real + synthetic: LoFT beats DataDream cls", "loft/real+synthetic", "datadream_cls/real+synthetic", 0.0),
    ]  # fmt: skip
    runs = {row["run"] for row in accuracy}
    rows, seen = [], set()
    for claim, a, b, margin in claims:
        if a not in runs or b not in runs or (a, b) in seen:  # the best generator's claim is not repeated
            continue
        seen.add((a, b))
        difference = paired_difference(seed_values(accuracy, a), seed_values(accuracy, b), a, b)
        rows.append({"claim": claim, "margin": margin, "met": difference.above(margin),
                     "measured": difference.describe(), **difference.to_dict()})  # fmt: skip
    return rows


def evaluate_targets(summary: dict) -> list[dict]:
    """The demo's targets, each with what was measured and whether it holds: the generators' class fidelity and
    diversity, and every paired claim of `evaluate_claims` (met only when its interval clears the margin)."""
    stats = accuracy_statistics(summary["accuracy"])
    fidelity = {name: 100 * row["accuracy"] for name, row in summary["class_fidelity"].items()}
    chance = 100 / len(summary["class_names"])
    recall = {name: float(np.mean([r["recall"] for r in rows if r["class"] != "all"]))
              for name, rows in summary.get("alignment", {}).items()}  # fmt: skip
    targets = [
        ("cls class fidelity >= 70%", f"{fidelity['datadream_cls']:.1f}%", fidelity["datadream_cls"] >= 70),
        ("frozen class fidelity within 5 points of chance", f"{fidelity['frozen']:.1f}% (chance {chance:.0f}%)",
         abs(fidelity["frozen"] - chance) <= 5),
        ("dset class fidelity clearly above frozen (> +5 points)",
         f"{fidelity['datadream_dset']:.1f}% vs {fidelity['frozen']:.1f}%",
         fidelity["datadream_dset"] > fidelity["frozen"] + 5),
    ]  # fmt: skip
    if "loft" in fidelity:
        targets.append(("LoFT class fidelity >= 70%", f"{fidelity['loft']:.1f}%", fidelity["loft"] >= 70))
    if "loft" in recall and "datadream_cls" in recall:
        measured = f"{recall['loft']:.2f} vs {recall['datadream_cls']:.2f}"
        distance = summary.get("nearest_shot_distance", {})
        if recall["loft"] < recall["datadream_cls"] and "loft" in distance and "datadream_cls" in distance:
            measured += (f"; distance to the nearest K shot {distance['loft']:.3f} vs {distance['datadream_cls']:.3f} "
                         f"(real test images {distance['real test images']:.3f})")  # fmt: skip
        targets.append(("LoFT k-NN recall (diversity) >= DataDream cls recall", measured,
                        recall["loft"] >= recall["datadream_cls"]))  # fmt: skip
    if "datadream_cls/synthetic" in stats:
        cls_synthetic = stats["datadream_cls/synthetic"]["mean"]
        targets.append(("synthetic only, cls >= 75% (mean)", f"{cls_synthetic:.1f}", cls_synthetic >= 75))
    for claim in evaluate_claims(summary["accuracy"]):
        margin = f" (margin {claim['margin']:+.0f})" if claim["margin"] else ""
        targets.append((claim["claim"], claim["measured"] + margin, claim["met"]))
    return [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in targets]


def write_image_grid(out: Path, data: DemoData, synthetic: dict[str, Path]) -> Path:
    """One row per class: K-shot real images, then each generator's and the oracle's first images (`grid.png`)."""
    train = load_labelled_dataset(str(data.dataset), split="train")
    manifest = FewShotManifest.load(data.manifest)
    columns = {"real (K-shot)": manifest.select(train)}
    columns |= {name: load_synthetic_dataset(folder) for name, folder in synthetic.items()}
    columns["oracle"] = load_labelled_dataset(str(data.oracle))
    blocks = []
    for dataset in columns.values():
        images, labels = decode_images(dataset.select_columns(["image", "label"])), labels_of(dataset)
        rows = [[im for im, y in zip(images, labels) if y == c][:GRID_IMAGES] for c in range(len(manifest.indices))]
        blocks.append(image_grid(rows, scale=2))
    # One block per source, side by side; in each block a row per class.
    return save_png_atomic(image_grid([blocks], gap=16), out / "grid.png")


def write_alignment_figure(out: Path, alignment: dict[str, list[dict]], class_names: list[str]) -> Path:
    """Per-class Frechet distance and precision/recall of each generator's images against the real test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(alignment)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    x = np.arange(len(class_names))
    width = 0.8 / len(names)
    for ax, metric in zip(axes, ("frechet", "precision", "recall")):
        for i, name in enumerate(names):
            values = [row[metric] for row in alignment[name] if row["class"] != "all"]
            ax.bar(x + i * width, values, width, label=name)
        ax.set_xticks(x + width * (len(names) - 1) / 2, class_names, rotation=45)
        ax.set_title(
            {"frechet": "Frechet distance (lower is closer)", "precision": "precision", "recall": "recall"}[metric]
        )
    axes[0].legend()
    fig.tight_layout()
    path = out / "alignment.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_markdown(summary: dict) -> str:
    """The headline: the accuracy table and the targets (what `run_demo.py` prints at the end)."""
    settings = summary["settings"]
    minutes = sum(summary["stage_times_s"].values()) / 60
    lines = [
        f"## Test accuracy, K = {settings['k']} (mean ± sample std over seeds {settings['seeds']}, %)",
        "",
        f"On the {summary['num_test']} held-out real test digits; model selection on the validation split (real "
        f"train images outside the K shots), never on test. {settings['images_per_class']} synthetic (or oracle) "
        f"images per class. Stage wall time {minutes:.1f} min (per stage in `timings.json`; stage 3 runs "
        f"{summary['stage3_workers']} classifiers at a time, each one's time in `stage3/run_times.json`).",
        "",
        *accuracy_markdown(summary["accuracy"]),
        "",
        "## The paper's claims as targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    for row in evaluate_targets(summary):
        lines.append(f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else '**no**'} |")
    lines += [
        "",
        "Claims: the paired difference A - B on test accuracy over the seeds both runs share (same seed = same "
        "initialisation and data order), its mean and 95% t-interval (Student's t, n - 1 degrees of freedom); "
        "met only when the whole interval lies above the margin. The best generator is the one with the highest mean "
        "validation accuracy of its real + synthetic classifiers. Per seed (seed: A - B):",
        "",
    ]
    for claim in evaluate_claims(summary["accuracy"]):
        values = ", ".join(f"{seed}: {d:+.1f}" for seed, d in zip(claim["seeds"], claim["differences"]))
        lines.append(f"- {claim['a']} - {claim['b']}: {values}")
    return "\n".join(lines) + "\n"


def render_report(summary: dict) -> str:
    lines = ["# DataDream on the tiny world (offline)", "", summary_markdown(summary)]
    lines += [
        "## Class fidelity of the generated images",
        "",
        "Share of images that a digit probe (logistic regression on 8x8 greyscale, fit on the real train split) reads "
        "as the prompted class; chance is 1/classes. The probe's confidence is a digit-likeness proxy.",
        "",
        "| images | class fidelity | probe confidence |",
        "| --- | --- | --- |",
    ]
    for name, row in summary["class_fidelity"].items():
        lines.append(f"| {name} | {100 * row['accuracy']:.1f}% | {row['mean_confidence']:.2f} |")
    lines += [
        "",
        "## Alignment of synthetic with real test images (tiny CLIP image features)",
        "",
        "Frechet distance (lower = closer) and k-NN precision/recall (k=3), averaged over classes, and on all images; "
        "the mean distance of an image to the nearest K-shot image of its class (lower = closer to copying the shots; "
        "the real test images' for reference).",
        "",
        "| generator | Frechet (class mean) | precision (class mean) | recall (class mean) | Frechet (all) | "
        "distance to nearest shot |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    distance = summary["nearest_shot_distance"]
    for name, rows in summary["alignment"].items():
        per_class = [r for r in rows if r["class"] != "all"]
        overall = next(r for r in rows if r["class"] == "all")
        mean = {m: np.mean([r[m] for r in per_class]) for m in ("frechet", "precision", "recall")}
        lines.append(
            f"| {name} | {mean['frechet']:.3f} | {mean['precision']:.2f} | {mean['recall']:.2f} | "
            f"{overall['frechet']:.3f} | {distance[name]:.3f} |"
        )
    lines += [
        f"| real test images | | | | | {distance['real test images']:.3f} |",
        "",
        "![alignment per class](alignment.png)",
        "",
        "## Real vs generated images per class",
        "",
        "Rows: classes. Column blocks: the K-shot real images, then each generator's images "
        f"({', '.join(COLUMNS.get(name, name) for name in summary['alignment'])}), then the oracle's held-out real "
        "images.",
        "",
        "![grid](grid.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, summary: dict, data: DemoData, synthetic: dict[str, Path]) -> Path:
    write_image_grid(out, data, synthetic)
    write_alignment_figure(out, summary["alignment"], summary["class_names"])
    path = out / "report.md"
    write_text_atomic(path, render_report(summary))
    return path
