"""eval.metrics.volume_metrics: 3D Dice, HD95 and NSD in millimetres against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.metrics import volume_metrics

SPACING = (0.5, 2.0, 3.0)  # mm along X, Y, Z


def _voxels(*points: tuple[int, int, int], shape=(9, 9, 9)) -> np.ndarray:
    m = np.zeros(shape, bool)
    for p in points:
        m[p] = True
    return m


def test_hd95_of_single_voxels_is_their_distance_in_mm() -> None:
    # offset (0, 1, 2) voxels = (0, 2, 6) mm -> sqrt(40) mm
    r = volume_metrics(_voxels((2, 2, 2)), _voxels((2, 3, 4)), SPACING, nsd_tolerance=6.0)
    assert r["dice"] == 0.0
    assert r["hd95_mm"] == pytest.approx(math.sqrt(40.0))
    assert r["nsd_mm"] == 0.0  # 6.32 mm > 6 mm
    assert volume_metrics(_voxels((2, 2, 2)), _voxels((2, 3, 4)), SPACING, nsd_tolerance=6.4)["nsd_mm"] == 1.0


def test_hd95_is_the_directed_95th_percentile() -> None:
    # pred: two isolated voxels at 0 and 3 slices (9 mm) from the one target voxel.
    # pred->target distances [0, 9] -> 95th percentile 0 + 0.95 * 9 = 8.55; target->pred [0] -> 0
    r = volume_metrics(_voxels((2, 2, 2), (2, 2, 5)), _voxels((2, 2, 2)), SPACING)
    assert r["hd95_mm"] == pytest.approx(8.55)
    assert r["dice"] == pytest.approx(2 / 3)


def test_cube_with_a_bump_nsd_and_dice() -> None:
    # target: a 3x3x3 cube (26 boundary voxels under the 6-connected erosion, the centre is inside).
    # pred: the cube plus one voxel on a face along X; that face's centre becomes interior, so pred has
    # 26 boundary voxels: 25 shared, the bump at 0.5 mm; the target's face centre is 0.5 mm from the bump.
    t = np.zeros((9, 9, 9), bool)
    t[3:6, 3:6, 3:6] = True
    p = t.copy()
    p[6, 4, 4] = True
    r = volume_metrics(p, t, SPACING, nsd_tolerance=0.4)
    assert r["dice"] == pytest.approx(2 * 27 / (28 + 27))
    assert r["nsd_mm"] == pytest.approx(50 / 52)
    assert volume_metrics(p, t, SPACING, nsd_tolerance=0.5)["nsd_mm"] == 1.0
    # the bump along Z is 3 mm from the target's face centre (4, 4, 5), which itself is 0.5 mm (one
    # voxel along X) from pred's boundary voxel (3, 4, 5): with tolerance 0.5 mm only the bump misses
    p2 = t.copy()
    p2[4, 4, 6] = True
    assert volume_metrics(p2, t, SPACING, nsd_tolerance=0.5)["nsd_mm"] == pytest.approx(51 / 52)
    assert volume_metrics(p2, t, SPACING, nsd_tolerance=0.4)["nsd_mm"] == pytest.approx(50 / 52)


def test_empty_policy() -> None:
    empty = np.zeros((4, 4, 4), bool)
    one = _voxels((1, 1, 1), shape=(4, 4, 4))
    both = volume_metrics(empty, empty, (1, 1, 1))
    assert both["dice"] == 1.0 and math.isnan(both["hd95_mm"]) and math.isnan(both["nsd_mm"])
    half = volume_metrics(one, empty, (1, 1, 1))
    assert half["dice"] == 0.0 and math.isnan(half["hd95_mm"]) and half["nsd_mm"] == 0.0


def test_bad_arguments() -> None:
    m = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="3-D masks of one shape"):
        volume_metrics(m, m[0], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing must be three"):
        volume_metrics(m, m, (1, 1))
    with pytest.raises(ValueError, match="binary"):
        volume_metrics(m.astype(int) * 2 + 2, m, (1, 1, 1))
