"""Segmentation metrics on binary masks: Dice, IoU, HD95, NSD, plus an accumulator.

All functions take two binary 2-D numpy arrays of the same shape ``(H, W)`` (bool, or numbers in
{0, 1}) at the mask's *stored* resolution, and return a Python float. Distances are in pixels unless
``spacing`` (one number, or ``(row, col)``) gives the physical size of a pixel.

Definitions follow MONAI (``monai.metrics``), which the tests check against:

- **Surface**: the boundary pixels of a mask, ``mask & ~binary_erosion(mask)`` with the 4-connected
  cross and zeros outside the image (MONAI's ``get_mask_edges`` without sub-voxel areas). A
  foreground pixel on the image border is a boundary pixel.
- **Surface distances**: for each boundary pixel of one mask, the Euclidean distance to the nearest
  boundary pixel of the other (``get_surface_distance``), in both directions.
- **HD95**: MONAI's ``compute_hausdorff_distance(percentile=95)``: the 95th percentile
  (linear interpolation, as ``torch.quantile``) of each *directed* distance set, then the larger of
  the two. Note that this is not the percentile of the pooled (union) distance set; the two agree
  when both boundaries are similar in size and differ slightly otherwise. MONAI's is used because
  it is what published numbers computed with MONAI report.
- **NSD** at tolerance ``tau``: MONAI's ``compute_surface_dice`` (pixel counting, no sub-voxels):
  ``(#{d_pred->gt <= tau} + #{d_gt->pred <= tau}) / (|boundary pred| + |boundary gt|)``.

Empty policy (deliberate, documented; differs from MONAI only where MONAI gives inf):

============================  =====  =====  =====  =====
case                           Dice   IoU   HD95   NSD
============================  =====  =====  =====  =====
both empty                       1      1    NaN    NaN
only one empty                   0      0    NaN     0
============================  =====  =====  =====  =====

NaN means undefined: :class:`MetricAccumulator` excludes it from means and counts it separately.
HD95 with one empty side is NaN (MONAI returns inf), never a made-up large number and never 0.
NSD with one empty side is 0 as in MONAI: no boundary pixel lies within tolerance of the other.

Uncertainty (a method's per-pixel uncertainty map, e.g. SegICL's std over diffusion samples),
measured against the thresholded prediction and the ground truth by :func:`uncertainty_metrics`:

- **unc_mean**: the mean uncertainty over the pixels of predicted foreground ∪ ground-truth
  foreground. Averaging over the whole image would let the easy background (most of the pixels,
  near-zero uncertainty) dilute the number and make it mostly a measure of object size. Every
  misclassified pixel lies in that union (an error is ``pred != gt``). NaN when both masks are empty.
- **unc_auroc**: pixel-level AUROC of the uncertainty for separating misclassified pixels from
  correct ones over the whole image (rank-based, ties count one half: :func:`auroc`). 1 means every
  error is more uncertain than every correct pixel, 0.5 chance. NaN when there is no error, no
  correct pixel, or the uncertainty is constant.

A method without uncertainty (None) or with an all-zero map (SegICL with one sample) gets None for
both: nothing was measured, which differs from NaN (measured but undefined).

Volumes: :func:`volume_metrics` gives 3D Dice, HD95 and NSD of (X, Y, Z) masks in millimetres,
computed by MONAI itself (``compute_hausdorff_distance``, ``compute_surface_dice`` with ``spacing``:
3D boundaries by erosion with the 6-connected cross), with the same empty policy as above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree
from scipy.stats import rankdata

METRICS = ("dice", "iou", "hd95", "nsd")
"""Names of the metrics :func:`compute_metrics` returns, in column order."""

UNCERTAINTY_METRICS = ("unc_mean", "unc_auroc")
"""Names of the uncertainty measures :func:`uncertainty_metrics` returns, in column order."""

DEFAULT_NSD_TOLERANCE = 2.0
"""NSD tolerance in pixels (at the stored resolution) when none is given."""

DEFAULT_NSD_TOLERANCE_MM = 2.0
"""3D NSD tolerance in millimetres (:func:`volume_metrics`) when none is given."""

VOLUME_METRICS = ("dice", "hd95_mm", "nsd_mm")
"""Names of the metrics :func:`volume_metrics` returns."""

Spacing = float | Sequence[float] | None


# ----------------------------------------------------------------------------------- validation
def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """Return ``mask`` as a bool (H, W) array; raise ValueError on anything else."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be boolean or numeric, got dtype {arr.dtype}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name} must be binary (bool or values in {{0, 1}}), found values such as {bad.tolist()}")
    return arr.astype(bool)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_binary(pred, "pred"), _as_binary(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    return p, t


def _spacing(spacing: Spacing) -> np.ndarray:
    """Pixel spacing as a (2,) float array (row, col); ``None`` -> (1, 1)."""
    if spacing is None:
        return np.ones(2)
    s = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if s.shape == (1,):
        s = np.repeat(s, 2)
    if s.shape != (2,):
        raise ValueError(f"spacing must be one number or (row, col), got {spacing!r}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be finite and positive, got {spacing!r}")
    return s


# ----------------------------------------------------------------------------- overlap metrics
def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient ``2|P∩T| / (|P| + |T|)``; 1.0 when both masks are empty.

    Args:
        pred: (H, W) binary prediction.
        target: (H, W) binary ground truth.
    """
    p, t = _check_pair(pred, target)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P∩T| / |P∪T|``; 1.0 when both masks are empty."""
    p, t = _check_pair(pred, target)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union


# ----------------------------------------------------------------------------- surface metrics
def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: ``mask & ~erosion(mask)`` (4-connected, zero outside).

    Args:
        mask: (H, W) binary mask.

    Returns:
        (H, W) bool, True on boundary pixels. Empty when the mask is empty.
    """
    m = _as_binary(mask, "mask")
    return m & ~binary_erosion(m, border_value=0)


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Spacing = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between the boundaries of two masks.

    Args:
        pred: (H, W) binary prediction.
        target: (H, W) binary ground truth.
        spacing: pixel size, one number or (row, col); ``None`` means distances in pixels.

    Returns:
        ``(d_pred_to_target, d_target_to_pred)``: float64 arrays with one entry per boundary pixel
        of ``pred`` (resp. ``target``): the Euclidean distance to the nearest boundary pixel of the
        other mask. ``inf`` entries when the other mask is empty; empty arrays when this mask is.
    """
    p, t = _check_pair(pred, target)
    scale = _spacing(spacing)
    cp = np.argwhere(surface(p)).astype(np.float64) * scale
    ct = np.argwhere(surface(t)).astype(np.float64) * scale

    def directed(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if len(src) == 0:
            return np.zeros(0)
        if len(dst) == 0:
            return np.full(len(src), np.inf)
        return cKDTree(dst).query(src, k=1)[0]

    return directed(cp, ct), directed(ct, cp)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Spacing = None, percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance (MONAI's ``compute_hausdorff_distance(percentile=95)``).

    ``max(q(d_pred->target), q(d_target->pred))`` with ``q`` the ``percentile``-th percentile
    (linear interpolation). NaN when either mask is empty (see the module's empty policy).

    Args:
        pred: (H, W) binary prediction.
        target: (H, W) binary ground truth.
        spacing: pixel size, one number or (row, col); ``None``: pixels.
        percentile: in [0, 100]; 100 gives the classic Hausdorff distance.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    p, t = _check_pair(pred, target)
    if not p.any() or not t.any():
        return math.nan
    d_pt, d_tp = surface_distances(p, t, spacing)
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def nsd(pred: np.ndarray, target: np.ndarray, tolerance: float = DEFAULT_NSD_TOLERANCE, spacing: Spacing = None) -> float:
    """Normalized surface Dice at ``tolerance`` (MONAI's ``compute_surface_dice``, pixel counting).

    Fraction of boundary pixels of both masks lying within ``tolerance`` of the other boundary.
    NaN when both masks are empty; 0.0 when exactly one is.

    Args:
        pred: (H, W) binary prediction.
        target: (H, W) binary ground truth.
        tolerance: accepted boundary deviation, in pixels (or in ``spacing`` units when given).
        spacing: pixel size, one number or (row, col); ``None``: pixels.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    d_pt, d_tp = surface_distances(pred, target, spacing)
    total = len(d_pt) + len(d_tp)
    if total == 0:
        return math.nan
    return float((np.count_nonzero(d_pt <= tolerance) + np.count_nonzero(d_tp <= tolerance)) / total)


def compute_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Spacing = None,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
) -> dict[str, float]:
    """All metrics of one (prediction, target) pair.

    Returns:
        ``{"dice", "iou", "hd95", "nsd"}`` as floats (NaN where undefined, see the empty policy).
    """
    p, t = _check_pair(pred, target)
    return {
        "dice": dice(p, t),
        "iou": iou(p, t),
        "hd95": hd95(p, t, spacing),
        "nsd": nsd(p, t, nsd_tolerance, spacing),
    }


# ---------------------------------------------------------------------------------------- volumes
def volume_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, float]:
    """3D Dice, HD95 and NSD of one volume pair, distances in millimetres (MONAI's definitions).

    Args:
        pred: (X, Y, Z) binary prediction.
        target: (X, Y, Z) binary ground truth on the same voxel grid.
        spacing: voxel size in mm along each axis, e.g. ``Volume.spacing``.
        nsd_tolerance: accepted boundary deviation in mm.

    Returns:
        ``{"dice", "hd95_mm", "nsd_mm"}``: NaN where undefined (the module's empty policy: HD95 NaN
        when either mask is empty, NSD NaN when both are and 0 when one is).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p, t = np.asarray(pred), np.asarray(target)
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"pred and target must be 3-D masks of one shape, got {p.shape} and {t.shape}")
    for arr, name in ((p, "pred"), (t, "target")):
        if arr.dtype != bool and (arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all()):
            raise ValueError(f"{name} must be binary (bool or values in {{0, 1}})")
    p, t = p.astype(bool), t.astype(bool)
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three finite positive numbers (mm), got {spacing!r}")
    if not math.isfinite(nsd_tolerance) or nsd_tolerance < 0:
        raise ValueError(f"nsd_tolerance must be finite and >= 0, got {nsd_tolerance}")
    n_p, n_t = int(p.sum()), int(t.sum())
    out = {"dice": 1.0 if n_p + n_t == 0 else 2.0 * int((p & t).sum()) / (n_p + n_t)}
    if n_p == 0 or n_t == 0:
        return {**out, "hd95_mm": math.nan, "nsd_mm": math.nan if n_p == n_t else 0.0}

    def onehot(m: np.ndarray) -> torch.Tensor:  # (1, 2, X, Y, Z): background, foreground
        x = torch.from_numpy(m)
        return torch.stack([~x, x])[None].float()

    yp, y = onehot(p), onehot(t)
    spacing_list = sp.tolist()
    hd = compute_hausdorff_distance(yp, y, include_background=False, percentile=95, spacing=spacing_list)
    sd = compute_surface_dice(yp, y, [float(nsd_tolerance)], include_background=False, spacing=spacing_list)
    return {**out, "hd95_mm": float(hd.reshape(-1)[0]), "nsd_mm": float(sd.reshape(-1)[0])}


# ---------------------------------------------------------------------------------- uncertainty
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``labels`` True from False.

    The Mann-Whitney form ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the sum
    of the positives' ranks among all scores (average ranks for ties), i.e. the probability that a
    random positive scores above a random negative, ties counting one half.

    Args:
        scores: any shape, finite.
        labels: same shape, bool (True: positive).

    Returns:
        A float in [0, 1]; NaN when there is no positive, no negative, or the scores are constant.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same size, got {s.size} and {y.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or s.min() == s.max():
        return math.nan
    rank_sum = float(rankdata(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def uncertainty_mean(uncertainty: np.ndarray, pred: np.ndarray, target: np.ndarray) -> float:
    """Mean of ``uncertainty`` over predicted ∪ ground-truth foreground; NaN when both are empty."""
    p, t = _check_pair(pred, target)
    region = p | t
    if not region.any():
        return math.nan
    return float(np.asarray(uncertainty, dtype=np.float64)[region].mean())


def uncertainty_metrics(
    uncertainty: np.ndarray | None, pred: np.ndarray, target: np.ndarray
) -> dict[str, float | None]:
    """``{"unc_mean", "unc_auroc"}`` of one prediction (definitions in the module docstring).

    Args:
        uncertainty: (H, W) per-pixel uncertainty of the prediction, or None.
        pred: (H, W) binary prediction (the thresholded probability).
        target: (H, W) binary ground truth.

    Returns:
        Both None when ``uncertainty`` is None or all zero (nothing was measured); otherwise floats,
        NaN where undefined.
    """
    p, t = _check_pair(pred, target)
    if uncertainty is None:
        return dict.fromkeys(UNCERTAINTY_METRICS)
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.shape != p.shape:
        raise ValueError(f"uncertainty must have the masks' shape {p.shape}, got {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("uncertainty contains NaN or inf")
    if not u.any():
        return dict.fromkeys(UNCERTAINTY_METRICS)
    return {"unc_mean": uncertainty_mean(u, p, t), "unc_auroc": auroc(u, p != t)}


# ----------------------------------------------------------------------------------- accumulator
def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """Mean and sample std (ddof=1) of the finite values; NaN entries are counted, not averaged.

    Returns:
        ``{"n": finite count, "nan": NaN count, "mean": ..., "std": ...}``; mean is NaN when
        ``n == 0`` and std is NaN when ``n < 2``. Infinite values raise ValueError (the metrics
        never produce them; they would silently dominate a mean).
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if np.isinf(arr).any():
        raise ValueError("infinite metric value; metrics must be finite or NaN")
    finite = arr[~np.isnan(arr)]
    n = int(finite.size)
    return {
        "n": n,
        "nan": int(arr.size - n),
        "mean": float(finite.mean()) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n > 1 else math.nan,
    }


@dataclass
class MetricAccumulator:
    """Collects per-image metrics and reports means that exclude (and count) undefined values.

    Example::

        acc = MetricAccumulator(nsd_tolerance=2.0)
        for pred, gt in pairs:
            acc.update(pred, gt)
        acc.aggregate()["dice"]  # {"n": ..., "nan": ..., "mean": ..., "std": ...}
    """

    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE
    spacing: Spacing = None
    rows: list[dict[str, float]] = field(default_factory=list)

    def update(self, pred: np.ndarray, target: np.ndarray, spacing: Spacing = None) -> dict[str, float]:
        """Compute the metrics of one pair, store them and return them.

        Args:
            pred: (H, W) binary prediction.
            target: (H, W) binary ground truth.
            spacing: overrides the accumulator's spacing for this image.
        """
        row = compute_metrics(pred, target, spacing if spacing is not None else self.spacing, self.nsd_tolerance)
        self.rows.append(row)
        return row

    def add(self, row: dict[str, float]) -> None:
        """Store metrics computed elsewhere (a dict with every name in :data:`METRICS`)."""
        missing = [m for m in METRICS if m not in row]
        if missing:
            raise ValueError(f"metric row lacks {missing}")
        self.rows.append({m: float(row[m]) for m in METRICS})

    def __len__(self) -> int:
        return len(self.rows)

    def aggregate(self) -> dict[str, dict[str, float | int]]:
        """Per metric: ``{"n", "nan", "mean", "std"}`` over the stored rows (see :func:`summarize`)."""
        return {m: summarize(r[m] for r in self.rows) for m in METRICS}

    def reset(self) -> None:
        self.rows.clear()
