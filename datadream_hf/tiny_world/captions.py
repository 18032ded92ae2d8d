"""Label-free captions of digit images: the language the tiny world's generator and CLIP learn.

A caption says what a digit image looks like, computed from its pixels alone: stroke thickness, slant, where the ink
lies (a 4 x 3 grid, read row by row) and closed loops. It never names a digit, and no function here sees a label: as
a web caption describes an aircraft's wings and engines without naming its model, which is what lets Stable Diffusion
draw a class it cannot name. The words are `CAPTION_WORDS`; the ten digit names are not among them.

    >>> description = describe_digit(image)
    >>> description.caption()
    'a photo of a thick digit slanted top middle right, upper middle right, lower left middle, bottom left right'

The thresholds below are label-free statistics of the tiny world's pre-training images (medians and terciles, see
`caption_thresholds`), measured once and written here, so that a caption depends on its image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# The 8 x 8 scan (the digits' native resolution) in 4 row bands of 2 rows and 3 column bands (3, 2, 3 columns).
ROW_WORDS = ("top", "upper", "lower", "bottom")
COLUMN_WORDS = ("left", "middle", "right")
_ROW_BANDS = (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8))
_COLUMN_BANDS = (slice(0, 3), slice(3, 5), slice(5, 8))
# A cell is named when its mean ink (0..1) exceeds the median over the pre-training images: each word of the grid is
# in about half of the captions.
GRID_THRESHOLDS = (
    (0.195, 0.706, 0.166),
    (0.273, 0.538, 0.214),
    (0.184, 0.601, 0.278),
    (0.152, 0.659, 0.229),
)
# Terciles of the slant (x shift of the ink per row up, > 0: the top leans right) and of the total ink of the scan;
# the middle third gets no word.
SLANT_TERCILES = (-0.095, 0.012)
INK_TERCILES = (18.77, 20.81)
INK_LEVEL = 0.35  # a pixel of the 32 px image above this (0..1) is ink when loops are counted
MIN_LOOP_PIXELS = 4  # a closed background region smaller than this (32 px) is a blot, not a loop

CAPTION_WORDS = tuple(
    "a photo of digit thin thick slanted backslanted and loop double".split() + list(ROW_WORDS + COLUMN_WORDS)
)
ATTRIBUTES = ("thickness", "slant", "ink", "loops")


@dataclass(frozen=True)
class DigitDescription:
    """What a digit image looks like. `None` or empty means "unremarkable": the words are left out."""

    thickness: str | None  # "thin" | "thick" | None
    slant: str | None  # "slanted" | "backslanted" | None
    ink: tuple[tuple[str, ...], ...]  # per row band (top to bottom), the column words whose cell holds ink
    loops: int  # closed loops: 0, 1 or 2 (2: two or more)

    def caption(self, keep: dict[str, bool] | None = None) -> str:
        """`a photo of a [thin|thick] digit [slanted|backslanted] [top left, upper ..., bottom ...] [and a loop]`.

        `keep` maps attribute names (`ATTRIBUTES`) to False to leave them out: pre-training drops attributes at random,
        so that the models also know partial descriptions, down to `a photo of a digit`.
        """
        keep = keep or {}
        words = ["a photo of a"]
        if self.thickness and keep.get("thickness", True):
            words.append(self.thickness)
        words.append("digit")
        if self.slant and keep.get("slant", True):
            words.append(self.slant)
        rows = [f"{row} {' '.join(columns)}" for row, columns in zip(ROW_WORDS, self.ink) if columns]
        if rows and keep.get("ink", True):
            words.append(", ".join(rows))
        if self.loops and keep.get("loops", True):
            words.append("and a loop" if self.loops == 1 else "and a double loop")
        return " ".join(words)


def describe_digit(image: Image.Image) -> DigitDescription:
    """Describes a digit image (any size; light ink on a dark ground, as the bundled digits) from its pixels alone."""
    grey = image.convert("L")
    scan = np.asarray(grey.resize((8, 8), Image.BOX), np.float32) / 255.0  # (8, 8)
    fine = np.asarray(grey.resize((32, 32), Image.BILINEAR), np.float32) / 255.0  # (32, 32): loops need detail
    slant, ink = slant_and_ink(scan)
    thickness = "thin" if ink < INK_TERCILES[0] else "thick" if ink > INK_TERCILES[1] else None
    leaning = "backslanted" if slant < SLANT_TERCILES[0] else "slanted" if slant > SLANT_TERCILES[1] else None
    cells = grid_ink(scan) > np.asarray(GRID_THRESHOLDS)  # (4, 3)
    rows = tuple(tuple(word for word, on in zip(COLUMN_WORDS, row) if on) for row in cells)
    return DigitDescription(thickness, leaning, rows, min(count_loops(fine), 2))


def grid_ink(scan: np.ndarray) -> np.ndarray:
    """(4, 3) mean ink of each cell of an (8, 8) scan in [0, 1]."""
    return np.array([[scan[rows, columns].mean() for columns in _COLUMN_BANDS] for rows in _ROW_BANDS])


def slant_and_ink(scan: np.ndarray) -> tuple[float, float]:
    """The slant (ink-weighted regression of x on -y) and the total ink of an (8, 8) scan in [0, 1]."""
    total = float(scan.sum())
    if total <= 0:
        return 0.0, 0.0
    ys, xs = np.mgrid[0:8, 0:8]
    weights = scan / total
    cy, cx = (weights * ys).sum(), (weights * xs).sum()
    var_y = (weights * (ys - cy) ** 2).sum()
    cov_xy = (weights * (xs - cx) * (ys - cy)).sum()
    return float(-cov_xy / max(var_y, 1e-6)), total


def count_loops(fine: np.ndarray) -> int:
    """Closed background regions (not touching the border, at least `MIN_LOOP_PIXELS`) of a (32, 32) image."""
    background, count = ndimage.label(fine <= INK_LEVEL)  # 4-connected
    border = set(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]).tolist())
    sizes = ndimage.sum(np.ones_like(background), background, index=range(1, count + 1))
    return sum(1 for label in range(1, count + 1) if label not in border and sizes[label - 1] >= MIN_LOOP_PIXELS)


def caption_thresholds(scans: list[np.ndarray]) -> dict:
    """The statistics the thresholds above were set from, over (8, 8) scans in [0, 1]: the median ink of each grid
    cell and the terciles of slant and total ink."""
    grids = np.stack([grid_ink(scan) for scan in scans])  # (N, 4, 3)
    slant, ink = np.array([slant_and_ink(scan) for scan in scans]).T
    return {
        "grid": np.median(grids, axis=0),
        "slant": tuple(np.quantile(slant, [1 / 3, 2 / 3])),
        "ink": tuple(np.quantile(ink, [1 / 3, 2 / 3])),
    }
