"""The end-to-end report: accuracy table, alignment table and figure, and real-vs-generated image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import decode_images, labels_of, load_labelled_dataset
from ..few_shot import FewShotManifest
from ..files import save_png_atomic, write_text_atomic
from ..grids import image_grid
from ..synthetic import load_synthetic_dataset

GRID_IMAGES = 6


def accuracy_table(accuracy: list[dict]) -> list[dict]:
    """Mean and standard deviation of test accuracy per run over seeds, in first-seen order."""
    runs = list(dict.fromkeys(row["run"] for row in accuracy))
    table = []
    for run in runs:
        values = np.array([row["test"] for row in accuracy if row["run"] == run])
        table.append({"run": run, "mean": float(values.mean()), "std": float(values.std()), "n": len(values)})
    return table


def write_image_grid(out: Path, data_dir: Path, manifest_path: Path, synthetic: dict[str, Path]) -> Path:
    """One row per class: K-shot real images, then each generator's images; saved as `grid.png` (upscaled x2)."""
    train = load_labelled_dataset(str(data_dir), split="train")
    manifest = FewShotManifest.load(manifest_path)
    columns = {"real (K-shot)": None} | synthetic
    per_source = {}
    for name, folder in columns.items():
        dataset = manifest.select(train) if folder is None else load_synthetic_dataset(folder)
        images, labels = decode_images(dataset.select_columns(["image", "label"])), labels_of(dataset)
        per_source[name] = [
            [im for im, y in zip(images, labels) if y == c][:GRID_IMAGES] for c in range(len(manifest.class_names))
        ]
    # One block per source, side by side; in each block a row per class.
    blocks = [image_grid(per_source[name], scale=2) for name in columns]
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


def render_report(summary: dict) -> str:
    settings = summary["settings"]
    lines = [
        "# DataDream on the tiny world (offline)",
        "",
        f"K = {settings['k']} real images per class (seed 0), {settings['images_per_class']} synthetic images per "
        "class, "
        f"classifier seeds {settings['seeds']}. Accuracy is measured on the held-out real **test** split; model "
        "selection used a validation split carved from the real train split outside the K shots. Stage wall time: "
        f"{sum(summary['stage_times_s'].values()) / 60:.1f} min (per stage in `timings.json`).",
        "",
        "## Test accuracy (mean ± std over seeds)",
        "",
        "| run | test accuracy | seeds |",
        "| --- | --- | --- |",
    ]
    for row in accuracy_table(summary["accuracy"]):
        lines.append(f"| {row['run']} | {100 * row['mean']:.1f} ± {100 * row['std']:.1f} | {row['n']} |")
    lines += [
        "",
        "## Alignment of synthetic with real test images (tiny CLIP image features)",
        "",
        "Frechet distance (lower = closer) and k-NN precision/recall (k=3), averaged over classes, and on all images.",
        "",
        "| generator | Frechet (class mean) | precision (class mean) | recall (class mean) | Frechet (all) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rows in summary["alignment"].items():
        per_class = [r for r in rows if r["class"] != "all"]
        overall = next(r for r in rows if r["class"] == "all")
        mean = {m: np.mean([r[m] for r in per_class]) for m in ("frechet", "precision", "recall")}
        lines.append(
            f"| {name} | {mean['frechet']:.3f} | {mean['precision']:.2f} | {mean['recall']:.2f} | "
            f"{overall['frechet']:.3f} |"
        )
    lines += [
        "",
        "## Class fidelity of the generated images",
        "",
        "Share of images that a digit probe (logistic regression on 8x8 greyscale, fit on the real train split) reads "
        "as the prompted class; chance is 1/classes. The probe's confidence is a digit-likeness proxy.",
        "",
        "| images | class fidelity | probe confidence |",
        "| --- | --- | --- |",
    ]
    for name, row in summary.get("class_fidelity", {}).items():
        lines.append(f"| {name} | {100 * row['accuracy']:.1f}% | {row['mean_confidence']:.2f} |")
    lines += [
        "",
        "![alignment per class](alignment.png)",
        "",
        "## Real vs generated images per class",
        "",
        "Rows: classes. Column blocks: the K-shot real images, then each generator's first images.",
        "",
        "![grid](grid.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, summary: dict, data_dir: Path, manifest_path: Path, synthetic: dict[str, Path]) -> Path:
    write_image_grid(out, data_dir, manifest_path, synthetic)
    write_alignment_figure(out, summary["alignment"], summary["class_names"])
    path = out / "report.md"
    write_text_atomic(path, render_report(summary))
    return path
