"""Metrics: hand-computed cases, the empty policy, bad input, and agreement with an independent
scipy distance-transform computation and with MONAI's own implementation on random masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt, gaussian_filter

from eval import metrics as M


def _square(shape: tuple[int, int], r0: int, c0: int, size: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def _point(shape: tuple[int, int], r: int, c: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r, c] = True
    return m


def _blobs(rng: np.random.Generator, shape: tuple[int, int], sigma: float, level: float) -> np.ndarray:
    """Random smooth blobs (realistic mask shapes), thresholded Gaussian-filtered noise."""
    return gaussian_filter(rng.standard_normal(shape), sigma) > level


# ------------------------------------------------------------------------------ hand-computed
def test_dice_iou_hand_computed() -> None:
    pred = np.zeros((4, 4), dtype=bool)
    pred[0:2, 0:2] = True  # 4 px
    gt = np.zeros((4, 4), dtype=bool)
    gt[0:2, 1:4] = True  # 6 px, overlap 2
    assert M.dice(pred, gt) == pytest.approx(2 * 2 / (4 + 6))
    assert M.iou(pred, gt) == pytest.approx(2 / 8)
    assert M.dice(gt, gt) == 1.0 and M.iou(gt, gt) == 1.0
    # {0, 1} integer and float arrays are accepted like bool
    assert M.dice(pred.astype(np.uint8), gt.astype(np.float32)) == pytest.approx(0.4)


def test_surface_is_boundary_pixels() -> None:
    sq = _square((7, 7), 2, 2, 3)
    edge = M.surface(sq)
    assert edge.sum() == 8 and not edge[3, 3]
    # foreground touching the image border is boundary there (zeros outside the image)
    full = np.ones((3, 3), dtype=bool)
    assert M.surface(full).sum() == 8
    assert M.surface(np.zeros((3, 3), dtype=bool)).sum() == 0


def test_hd95_and_nsd_hand_computed() -> None:
    # two single pixels 3 rows and 4 columns apart: every distance is 5
    a, b = _point((6, 6), 0, 0), _point((6, 6), 3, 4)
    assert M.hd95(a, b) == pytest.approx(5.0)
    assert M.nsd(a, b, tolerance=4.9) == 0.0
    assert M.nsd(a, b, tolerance=5.0) == 1.0
    # anisotropic spacing: rows 2 units, columns 1 unit -> sqrt(6^2 + 4^2)
    assert M.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(52))
    assert M.hd95(a, b, spacing=3.0) == pytest.approx(15.0)

    # a point at the centre of a 3x3 square: square boundary = 4 px at 1 and 4 px at sqrt(2)
    pt, sq = _point((5, 5), 2, 2), _square((5, 5), 1, 1, 3)
    d_pt, d_tp = M.surface_distances(pt, sq)
    assert d_pt.tolist() == [1.0]
    assert sorted(d_tp.tolist()) == pytest.approx([1.0] * 4 + [math.sqrt(2)] * 4)
    assert M.hd95(pt, sq) == pytest.approx(math.sqrt(2))  # max(q95([1]), q95(d_tp))
    assert M.hd95(pt, sq, percentile=0) == pytest.approx(1.0)
    assert M.nsd(pt, sq, tolerance=1.0) == pytest.approx(5 / 9)
    assert M.nsd(pt, sq, tolerance=1.5) == 1.0

    # identical masks: zero distance, full surface agreement
    assert M.hd95(sq, sq) == 0.0 and M.nsd(sq, sq, tolerance=0.0) == 1.0


def test_hd95_is_max_of_directed_percentiles() -> None:
    # 10x10 square against the same square plus a far single pixel: 1 of 37 gt->pred distances is large
    pred = _square((30, 30), 2, 2, 10)
    gt = pred.copy()
    gt[27, 27] = True
    d_pt, d_tp = M.surface_distances(pred, gt)
    assert np.all(d_pt == 0) and np.count_nonzero(d_tp) == 1
    expected = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    assert M.hd95(pred, gt) == pytest.approx(expected)
    assert M.hd95(pred, gt, percentile=100) == pytest.approx(math.hypot(27 - 11, 27 - 11))


# ----------------------------------------------------------------------------------- empties
def test_empty_policy() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    sq = _square((8, 8), 2, 2, 3)
    both = M.compute_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["iou"] == 1.0
    assert math.isnan(both["hd95"]) and math.isnan(both["nsd"])
    for pred, gt in ((empty, sq), (sq, empty)):
        one = M.compute_metrics(pred, gt)
        assert one["dice"] == 0.0 and one["iou"] == 0.0
        assert math.isnan(one["hd95"])
        assert one["nsd"] == 0.0
    assert set(both) == set(M.METRICS)


def test_accumulator_excludes_and_counts_nan() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    sq = _square((8, 8), 2, 2, 3)
    shifted = _square((8, 8), 2, 3, 3)
    acc = M.MetricAccumulator(nsd_tolerance=1.0)
    r1 = acc.update(sq, sq)
    r2 = acc.update(shifted, sq)
    acc.update(empty, empty)
    assert len(acc) == 3
    agg = acc.aggregate()
    assert agg["dice"]["n"] == 3 and agg["dice"]["nan"] == 0
    assert agg["dice"]["mean"] == pytest.approx((1 + r2["dice"] + 1) / 3)
    assert agg["hd95"]["n"] == 2 and agg["hd95"]["nan"] == 1
    assert agg["hd95"]["mean"] == pytest.approx((r1["hd95"] + r2["hd95"]) / 2)
    assert agg["nsd"]["std"] == pytest.approx(np.std([r1["nsd"], r2["nsd"]], ddof=1))
    acc.add({"dice": 0.5, "iou": 0.25, "hd95": float("nan"), "nsd": float("nan")})
    assert acc.aggregate()["hd95"]["nan"] == 2
    acc.reset()
    assert acc.aggregate()["dice"] == {"n": 0, "nan": 0, "mean": pytest.approx(float("nan"), nan_ok=True),
                                       "std": pytest.approx(float("nan"), nan_ok=True)}


def test_summarize() -> None:
    s = M.summarize([1.0, float("nan"), 3.0])
    assert s == {"n": 2, "nan": 1, "mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    one = M.summarize([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"])
    with pytest.raises(ValueError, match="infinite"):
        M.summarize([1.0, float("inf")])


# -------------------------------------------------------------------------------- bad input
def test_invalid_input_raises() -> None:
    sq = _square((6, 6), 1, 1, 2)
    with pytest.raises(ValueError, match="same shape"):
        M.dice(sq, np.zeros((5, 6), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        M.iou(np.zeros((1, 6, 6), dtype=bool), np.zeros((1, 6, 6), dtype=bool))
    with pytest.raises(ValueError, match="binary"):
        M.dice(sq.astype(np.uint8) * 255, sq)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(sq, sq, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(sq, sq, spacing=0.0)
    with pytest.raises(ValueError, match="tolerance"):
        M.nsd(sq, sq, tolerance=-1.0)
    with pytest.raises(ValueError, match="percentile"):
        M.hd95(sq, sq, percentile=101)
    with pytest.raises(ValueError, match="lacks"):
        M.MetricAccumulator().add({"dice": 1.0})


# ----------------------------------------------------------- independent reference computations
def _edges_by_shifts(m: np.ndarray) -> np.ndarray:
    """Boundary = foreground with a 4-neighbour that is background or outside the image."""
    p = np.pad(m, 1, constant_values=False)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def _reference(pred: np.ndarray, gt: np.ndarray, tol: float, spacing: tuple[float, float]) -> tuple[float, float]:
    """HD95 and NSD from scipy's exact Euclidean distance transform (no KD-tree)."""
    ep, eg = _edges_by_shifts(pred), _edges_by_shifts(gt)
    d_pg = distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = distance_transform_edt(~ep, sampling=spacing)[eg]
    hd = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    nsd = (np.count_nonzero(d_pg <= tol) + np.count_nonzero(d_gp <= tol)) / (d_pg.size + d_gp.size)
    return float(hd), float(nsd)


def _random_pairs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        shape = (int(rng.integers(16, 48)), int(rng.integers(16, 48)))
        if i % 3 == 0:  # salt-and-pepper: many tiny components, stresses the boundary definition
            pred, gt = rng.random(shape) < 0.3, rng.random(shape) < 0.3
        else:
            pred = _blobs(rng, shape, sigma=2.5, level=0.05)
            gt = _blobs(rng, shape, sigma=2.5, level=0.05)
        if not pred.any():
            pred[shape[0] // 2, shape[1] // 2] = True
        if not gt.any():
            gt[0, 0] = True
        pairs.append((pred, gt))
    return pairs


def test_against_scipy_distance_transform() -> None:
    for pred, gt in _random_pairs(12, seed=1):
        for spacing in ((1.0, 1.0), (0.7, 1.3)):
            hd_ref, nsd_ref = _reference(pred, gt, 2.0, spacing)
            assert M.hd95(pred, gt, spacing=spacing) == pytest.approx(hd_ref, rel=1e-6)
            assert M.nsd(pred, gt, tolerance=2.0, spacing=spacing) == pytest.approx(nsd_ref, rel=1e-9)
        inter = np.logical_and(pred, gt).sum()
        assert M.dice(pred, gt) == pytest.approx(2 * inter / (pred.sum() + gt.sum()))
        assert M.iou(pred, gt) == pytest.approx(inter / np.logical_or(pred, gt).sum())


@pytest.mark.filterwarnings("ignore:the (prediction|ground truth) of class:UserWarning")
def test_against_monai() -> None:
    torch = pytest.importorskip("torch")
    mm = pytest.importorskip("monai.metrics")
    pairs = _random_pairs(9, seed=2)
    # include the empty cases: MONAI's values there define where our policy departs (inf -> NaN)
    empty = np.zeros((20, 20), dtype=bool)
    pairs += [(empty, _square((20, 20), 3, 3, 5)), (empty, empty)]
    for pred, gt in pairs:
        yp = torch.from_numpy(pred.astype(np.float32))[None, None]
        yt = torch.from_numpy(gt.astype(np.float32))[None, None]
        for spacing in (None, (0.7, 1.3)):
            hd_m = float(mm.compute_hausdorff_distance(yp, yt, include_background=True, percentile=95,
                                                       spacing=spacing))
            nsd_m = float(mm.compute_surface_dice(yp, yt, [2.0], include_background=True, spacing=spacing))
            ours = M.compute_metrics(pred, gt, spacing=spacing, nsd_tolerance=2.0)
            if pred.any() and gt.any():
                assert ours["hd95"] == pytest.approx(hd_m, rel=1e-5)
            else:  # MONAI: inf (one empty) or NaN (both); ours: NaN either way
                assert math.isnan(ours["hd95"]) and (math.isinf(hd_m) or math.isnan(hd_m))
            assert ours["nsd"] == pytest.approx(nsd_m, rel=1e-6, nan_ok=True)
        if pred.any() or gt.any():  # MONAI's dice/iou of two empties depend on flags; ours is 1
            dice_m = float(mm.compute_dice(yp, yt, include_background=True))
            iou_m = float(mm.compute_iou(yp, yt, include_background=True))
            assert M.dice(pred, gt) == pytest.approx(dice_m, rel=1e-6)
            assert M.iou(pred, gt) == pytest.approx(iou_m, rel=1e-6)


# ---------------------------------------------------------------------------------- uncertainty
def _pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by definition: P(score of a positive > score of a negative), ties one half (O(n^2))."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_auroc_hand_computed_and_ties() -> None:
    # the classic 4-point example: of the 4 (positive, negative) pairs, 3 are ordered right
    assert M.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == pytest.approx(0.75)
    # ties count one half: pairs (1,0)=1, (1,1)=0.5, (2,0)=1, (2,1)=1 -> 3.5 / 4
    assert M.auroc(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1], bool)) == pytest.approx(0.875)
    assert M.auroc(np.array([1, 1, 2, 2]), np.array([0, 1, 0, 1], bool)) == pytest.approx(0.5)
    assert M.auroc(np.array([0, 0, 5, 9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert M.auroc(np.array([5, 9, 0, 0]), np.array([0, 0, 1, 1], bool)) == 0.0
    # undefined: constant scores, no positive, no negative
    assert math.isnan(M.auroc(np.full(4, 0.3), np.array([0, 0, 1, 1], bool)))
    assert math.isnan(M.auroc(np.array([0.1, 0.2]), np.array([0, 0], bool)))
    assert math.isnan(M.auroc(np.array([0.1, 0.2]), np.array([1, 1], bool)))
    with pytest.raises(ValueError, match="same size"):
        M.auroc(np.zeros(3), np.zeros(4, bool))


def test_auroc_matches_pairwise_definition_on_random_tied_scores() -> None:
    rng = np.random.default_rng(5)
    for _ in range(5):
        scores = rng.integers(0, 6, size=300).astype(np.float32) / 5  # many ties
        labels = rng.random(300) < rng.uniform(0.05, 0.6)
        assert M.auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_uncertainty_metrics_hand_computed() -> None:
    gt = np.zeros((4, 4), dtype=bool)
    gt[0:2, 0:2] = True  # 4 px
    pred = gt.copy()
    pred[0, 0] = False  # false negative
    pred[3, 3] = True  # false positive
    unc = np.zeros((4, 4), dtype=np.float32)
    unc[0, 0] = unc[3, 3] = 0.5  # exactly the two errors
    unc[2, 2] = 0.1  # a correct background pixel, outside pred ∪ gt: not in unc_mean
    out = M.uncertainty_metrics(unc, pred, gt)
    assert set(out) == set(M.UNCERTAINTY_METRICS)
    assert out["unc_mean"] == pytest.approx((0.5 + 0.5) / 5)  # pred ∪ gt = 4 gt px + the false positive
    assert out["unc_auroc"] == 1.0  # both errors above all 14 correct pixels
    # ranking the errors below some correct pixels lowers the AUROC: 2 errors x 14 correct pairs
    unc2 = unc.copy()
    unc2[2, 2] = 0.9  # one correct pixel above both errors: 2 of 28 pairs wrong
    assert M.uncertainty_metrics(unc2, pred, gt)["unc_auroc"] == pytest.approx(26 / 28)


def test_uncertainty_metrics_undefined_and_absent() -> None:
    gt = np.zeros((4, 4), dtype=bool)
    gt[1:3, 1:3] = True
    unc = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    # not measured: None or an all-zero map (one diffusion sample) -> None, not NaN
    assert M.uncertainty_metrics(None, gt, gt) == {"unc_mean": None, "unc_auroc": None}
    assert M.uncertainty_metrics(np.zeros((4, 4)), gt, gt) == {"unc_mean": None, "unc_auroc": None}
    # perfect prediction: no error -> AUROC NaN, unc_mean still defined
    perfect = M.uncertainty_metrics(unc, gt, gt)
    assert math.isnan(perfect["unc_auroc"]) and perfect["unc_mean"] == pytest.approx(unc[1:3, 1:3].mean())
    # constant non-zero uncertainty -> AUROC NaN
    assert math.isnan(M.uncertainty_metrics(np.full((4, 4), 0.2), ~gt, gt)["unc_auroc"])
    # every pixel wrong: no correct pixel -> AUROC NaN
    assert math.isnan(M.uncertainty_metrics(unc, ~gt, gt)["unc_auroc"])
    # both masks empty: unc_mean NaN (no foreground region); AUROC NaN (no error)
    empty = np.zeros((4, 4), dtype=bool)
    both = M.uncertainty_metrics(unc, empty, empty)
    assert math.isnan(both["unc_mean"]) and math.isnan(both["unc_auroc"])
    with pytest.raises(ValueError, match="NaN or inf"):
        M.uncertainty_metrics(np.full((4, 4), np.nan), gt, gt)
    with pytest.raises(ValueError, match="shape"):
        M.uncertainty_metrics(np.ones((3, 4)), gt, gt)
