"""Distribution alignment between real and synthetic images: Frechet distance and k-NN precision/recall on features.

Frechet distance as in FID (Heusel et al., 2017), on any feature extractor; precision/recall as improved
precision/recall (Kynkaanniemi et al., 2019): precision = share of synthetic samples inside the real k-NN manifold,
recall = share of real samples inside the synthetic one. How closely images copy the few-shot images they were
learned from: the mean distance of each image to the nearest shot of its class.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)) between Gaussian fits of two (N, D) feature sets."""
    _check_features(real, synthetic, minimum=2)
    mu_r, mu_s = real.mean(axis=0), synthetic.mean(axis=0)
    cov_r = np.cov(real, rowvar=False)
    cov_s = np.cov(synthetic, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_r @ cov_s, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularize, as the FID reference implementation does
        offset = np.eye(cov_r.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_r + offset) @ (cov_s + offset))
    covmean = covmean.real
    return float(((mu_r - mu_s) ** 2).sum() + np.trace(cov_r) + np.trace(cov_s) - 2 * np.trace(covmean))


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    distances = _pairwise_distances(features, features)
    # Column 0 of each sorted row is the point itself (distance 0).
    return np.sort(distances, axis=1)[:, k]


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T  # (Na, Nb)
    return np.sqrt(np.clip(squared, 0, None))


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of `synthetic` against `real`, with k-NN balls of radius = distance to the k-th
    neighbour."""
    _check_features(real, synthetic, minimum=k + 1)
    real_radii, synthetic_radii = _knn_radii(real, k), _knn_radii(synthetic, k)
    distances = _pairwise_distances(synthetic, real)  # (Ns, Nr)
    precision = (distances <= real_radii[None, :]).any(axis=1).mean()
    recall = (distances.T <= synthetic_radii[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def _check_features(real: np.ndarray, synthetic: np.ndarray, minimum: int) -> None:
    for name, features in (("real", real), ("synthetic", synthetic)):
        if features.ndim != 2 or len(features) < minimum:
            raise ValueError(f"`{name}` features must be (N, D) with N >= {minimum}, got shape {features.shape}.")
    if real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"Feature sizes differ: real {real.shape[1]} vs synthetic {synthetic.shape[1]}.")


def alignment_per_class(
    real: np.ndarray, real_labels: np.ndarray, synthetic: np.ndarray, synthetic_labels: np.ndarray, k: int = 3
) -> list[dict]:
    """Frechet distance, precision and recall for every class present in both sets, plus an `all` row."""
    rows = []
    for label in sorted(set(real_labels.tolist()) & set(synthetic_labels.tolist())):
        r, s = real[real_labels == label], synthetic[synthetic_labels == label]
        precision, recall = precision_recall(r, s, k)
        rows.append({"class": int(label), "frechet": frechet_distance(r, s), "precision": precision, "recall": recall})
    precision, recall = precision_recall(real, synthetic, k)
    rows.append(
        {"class": "all", "frechet": frechet_distance(real, synthetic), "precision": precision, "recall": recall}
    )
    return rows


def nearest_shot_distance(
    shots: np.ndarray, shot_labels: np.ndarray, images: np.ndarray, image_labels: np.ndarray
) -> float:
    """Mean over `images` of the distance to the nearest of its own class's `shots` (lower = closer to a copy)."""
    _check_features(shots, images, minimum=1)
    missing = sorted(set(image_labels.tolist()) - set(shot_labels.tolist()))
    if missing:
        raise ValueError(f"Classes {missing} have images but no shots.")
    nearest = np.empty(len(images))
    for label in np.unique(image_labels):
        mask = image_labels == label
        nearest[mask] = _pairwise_distances(images[mask], shots[shot_labels == label]).min(axis=1)
    return float(nearest.mean())
