"""Claims with their uncertainty: "run A beats run B" as the paired difference over seeds with a t-interval.

Two classifier runs trained with the same seed share their validation draw, initialisation order and data order, so
their accuracies are paired: the difference per seed cancels what the seed moves in both (the checkpoint that a
small validation set happens to pick, for one), and the interval is that of the mean difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass
class PairedDifference:
    """`a - b` in points over the seeds both runs have; `interval` is the two-sided t-interval of the mean (Student's
    t with n - 1 degrees of freedom), None with fewer than two seeds."""

    a: str
    b: str
    seeds: list[int]
    differences: list[float]
    mean: float
    std: float | None
    interval: tuple[float, float] | None
    confidence: float = CONFIDENCE

    def excludes_zero(self) -> bool:
        return self.interval is not None and (self.interval[0] > 0 or self.interval[1] < 0)

    def above(self, threshold: float = 0.0) -> bool:
        """The whole interval lies above `threshold` points (A beats B by more than it)."""
        return self.interval is not None and self.interval[0] > threshold

    def describe(self) -> str:
        """`+3.5 [+2.1, +4.9] (n=10)`: the mean difference, its interval and the number of paired seeds."""
        if self.interval is None:
            return f"{self.mean:+.1f} (n={len(self.seeds)}, no interval)"
        low, high = self.interval
        return f"{self.mean:+.1f} [{low:+.1f}, {high:+.1f}] (n={len(self.seeds)})"

    def to_dict(self) -> dict:
        return asdict(self) | {"interval": list(self.interval) if self.interval else None, "method": "paired t"}


def paired_difference(a: dict[int, float], b: dict[int, float], a_name: str = "a", b_name: str = "b",
                      confidence: float = CONFIDENCE) -> PairedDifference:  # fmt: skip
    """The paired difference `a[seed] - b[seed]` over the seeds in both (values in points).

    Raises if they share no seed: unpaired runs cannot be compared this way.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"Runs {a_name!r} and {b_name!r} share no seed: a paired difference needs the same seeds.")
    differences = [float(a[s] - b[s]) for s in seeds]
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return PairedDifference(a_name, b_name, seeds, differences, mean, None, None, confidence)
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return PairedDifference(a_name, b_name, seeds, differences, mean, std, (mean - half, mean + half), confidence)
