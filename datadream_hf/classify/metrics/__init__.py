"""Evaluation metrics shipped in the package, loadable offline with `evaluate.load(path)`."""

from __future__ import annotations

from pathlib import Path

ACCURACY_METRIC_FILE = Path(__file__).with_name("accuracy.py")


def accuracy_metric_path() -> str:
    """Path of the local top-1 / per-class accuracy metric module, for `evaluate.load`."""
    return str(ACCURACY_METRIC_FILE)


def load_accuracy_metric():
    """`evaluate.load` of the local accuracy metric, kept in memory (no Arrow cache files shared between ranks)."""
    import evaluate

    return evaluate.load(accuracy_metric_path(), keep_in_memory=True)


def classification_report(predictions, references, class_names: list[str], source: str) -> dict:
    """Top-1, balanced and per-class accuracy of one evaluation, with `source` saying which split it comes from."""
    result = load_accuracy_metric().compute(
        predictions=list(predictions), references=list(references), num_classes=len(class_names)
    )
    return {
        "source": source,
        "num_examples": len(references),
        "accuracy": result["accuracy"],
        "balanced_accuracy": result["balanced_accuracy"],
        "per_class_accuracy": dict(zip(class_names, result["per_class_accuracy"])),
        "per_class_count": dict(zip(class_names, result["per_class_count"])),
    }


def report_markdown(report: dict) -> str:
    """A markdown summary of a stage-3 report: one row per evaluated split, then per-class accuracy."""
    evaluations = report["evaluations"]
    lines = [
        "# DataDream classifier report",
        "",
        f"Model selection: best `{report['selection']['metric']}` on the **{report['selection']['split']}** split "
        "(never on test).",
        "",
        "| split | where the images come from | images | top-1 accuracy | balanced accuracy |",
        "|---|---|---|---|---|",
    ]
    for split, result in evaluations.items():
        lines.append(
            f"| {split} | {_cell(result['source'])} | {result['num_examples']} | {100 * result['accuracy']:.2f}% | "
            f"{100 * result['balanced_accuracy']:.2f}% |"
        )
    lines += ["", "## Per-class accuracy", "", "| class | " + " | ".join(evaluations) + " |"]
    lines.append("|---|" + "---|" * len(evaluations))
    class_names = list(next(iter(evaluations.values()))["per_class_accuracy"]) if evaluations else []
    for name in class_names:
        cells = []
        for result in evaluations.values():
            value = result["per_class_accuracy"].get(name)
            cells.append("n/a" if value is None else f"{100 * value:.1f}%")
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A markdown table cell: a `|` in a class name would split the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")
