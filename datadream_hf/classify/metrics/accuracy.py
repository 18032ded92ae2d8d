"""Top-1 and per-class accuracy as a local `evaluate` metric (the Hub's `accuracy` cannot load offline).

Load it with `evaluate.load(datadream_hf.classify.metrics.accuracy_metric_path())`. `evaluate` parses this file's
imports line by line and copies it alone into its module cache, so it keeps one import per line and no relative
imports.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy (fraction of correct predictions), the accuracy of each class (fraction of its references predicted
correctly) and their mean, the balanced accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    num_classes (`int`, *optional*): number of classes; defaults to 1 + the largest id seen.
Returns:
    accuracy (`float`): top-1 accuracy over all examples.
    balanced_accuracy (`float`): mean of the per-class accuracies over classes present in `references`.
    per_class_accuracy (`list[float | None]`): accuracy of each class id, None for a class without references.
    per_class_count (`list[int]`): number of references of each class id.
Example:
    >>> metric = evaluate.load("datadream_hf/classify/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], num_classes=2)["accuracy"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if len(references) == 0:
            raise ValueError("accuracy: `references` is empty; evaluate on at least one example.")
        if num_classes is None:
            num_classes = int(max(references.max(), predictions.max())) + 1
        if references.min() < 0 or references.max() >= num_classes:
            raise ValueError(
                f"accuracy: reference ids must lie in 0..{num_classes - 1} (`num_classes`={num_classes}), got "
                f"{references.min()}..{references.max()}."
            )
        correct = predictions == references
        counts = np.bincount(references, minlength=num_classes)
        hits = np.bincount(references[correct], minlength=num_classes)
        per_class = [float(hits[c] / counts[c]) if counts[c] else None for c in range(num_classes)]
        present = [acc for acc in per_class if acc is not None]
        return {
            "accuracy": float(correct.mean()),
            "balanced_accuracy": float(np.mean(present)),
            "per_class_accuracy": per_class,
            "per_class_count": [int(c) for c in counts],
        }
