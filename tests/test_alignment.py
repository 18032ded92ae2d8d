"""Alignment metrics against closed forms and obvious cases."""

import numpy as np
import pytest

from datadream_hf.tiny_world.alignment import (
    alignment_per_class,
    frechet_distance,
    nearest_shot_distance,
    precision_recall,
)


def test_frechet_distance_of_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal(3.0, 2.0, size=(20000, 2))
    # Diagonal covariances: |mu|^2 + sum (s_a - s_b)^2 = 2 * 9 + 2 * (1 - 2)^2 = 20.
    assert frechet_distance(a, b) == pytest.approx(20.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_separate_and_identical_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, size=(200, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = rng.normal(50, 1, size=(200, 4))
    assert precision_recall(real, far) == (0.0, 0.0)
    # A collapsed generator: precise (inside the real manifold) but no recall.
    collapsed = np.zeros((200, 4)) + rng.normal(0, 0.01, size=(200, 4))
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.2


def test_per_class_rows_and_bad_shapes():
    rng = np.random.default_rng(0)
    real, synthetic = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    labels = np.repeat([0, 1], 20)
    rows = alignment_per_class(real, labels, synthetic, labels)
    assert [r["class"] for r in rows] == [0, 1, "all"]
    with pytest.raises(ValueError, match="Feature sizes differ"):
        frechet_distance(real, synthetic[:, :2])
    with pytest.raises(ValueError, match="N >= 4"):
        precision_recall(real[:3], synthetic)


def test_nearest_shot_distance_measures_copies_of_the_own_class_shots():
    shots = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    shot_labels = np.array([0, 0, 1])
    copies = shots + np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    assert nearest_shot_distance(shots, shot_labels, copies, shot_labels) == pytest.approx(2.0)
    # Class 1's image sits on a class-0 shot but is measured against its own class's shot only.
    assert nearest_shot_distance(shots, shot_labels, np.array([[10.0, 0.0]]), np.array([1])) == pytest.approx(
        np.hypot(10, 10)
    )
    with pytest.raises(ValueError, match=r"Classes \[2\] have images but no shots"):
        nearest_shot_distance(shots, shot_labels, copies, np.array([0, 1, 2]))
