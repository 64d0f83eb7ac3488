"""A simulated user for interactive segmentation benchmarks (the robot of the interactive literature).

Clicks: at the point of the largest error region (false negative or false positive, 4-connected)
farthest from its border (the maximum of its Euclidean distance transform), positive on a false
negative, negative on a false positive: the protocol of RITM / SAM / ScribblePrompt / MultiverSeg
evaluations. Scribbles: the skeleton of that region after a 1-pixel erosion (scikit-image), traced
into polylines. Boxes: the bounding box of the ground truth with each side moved by up to
``jitter`` x its extent.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segicl.interactive import Interactions


def largest_error(pred: np.ndarray, gt: np.ndarray) -> tuple[bool, np.ndarray] | None:
    """(positive, region) of the largest connected error region; None when the prediction is exact."""
    best = None
    for positive, err in ((True, gt & ~pred), (False, pred & ~gt)):
        lab, n = ndimage.label(err)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            i = int(sizes.argmax())
            if best is None or sizes[i] > best[0]:
                best = (int(sizes[i]), positive, lab == i + 1)
    return None if best is None else (best[1], best[2])


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[bool, tuple[int, int]] | None:
    """(positive, (row, column)) of the robot's next click, None when there is nothing to correct."""
    found = largest_error(np.asarray(pred, bool), np.asarray(gt, bool))
    if found is None:
        return None
    positive, region = found
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return positive, (int(y), int(x))


def _trace(points: np.ndarray) -> list[list[tuple[int, int]]]:
    """Skeleton pixels -> polylines: a greedy nearest-neighbour walk, broken where the next pixel is
    not 8-adjacent."""
    left = {tuple(p) for p in points.tolist()}
    lines = []
    while left:
        cur = min(left)
        line = [cur]
        left.remove(cur)
        while True:
            nxt = next(((cur[0] + dy, cur[1] + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                        if (cur[0] + dy, cur[1] + dx) in left), None)
            if nxt is None:
                break
            left.remove(nxt)
            line.append(nxt)
            cur = nxt
        lines.append([(int(y), int(x)) for y, x in line])
    return lines


def next_scribble(pred: np.ndarray, gt: np.ndarray) -> tuple[bool, list[list[tuple[int, int]]]] | None:
    """(positive, polylines) along the skeleton of the largest error region, None when exact."""
    from skimage.morphology import skeletonize

    found = largest_error(np.asarray(pred, bool), np.asarray(gt, bool))
    if found is None:
        return None
    positive, region = found
    eroded = ndimage.binary_erosion(region)
    skel = skeletonize(eroded if eroded.any() else region)
    lines = _trace(np.argwhere(skel))
    return positive, [ln for ln in lines if len(ln) >= 2] or lines[:1]


def jittered_box(gt: np.ndarray, rng: np.random.Generator, jitter: float = 0.05) -> tuple[int, int, int, int] | None:
    """The ground truth's bounding box (y0, x0, y1, x1) with each side moved by up to ``jitter`` x its extent."""
    ys, xs = np.nonzero(gt)
    if not len(ys):
        return None
    h, w = gt.shape
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    dy, dx = jitter * (y1 - y0 + 1), jitter * (x1 - x0 + 1)
    j = rng.uniform(-1, 1, 4)
    return (int(np.clip(y0 + j[0] * dy, 0, h - 1)), int(np.clip(x0 + j[1] * dx, 0, w - 1)),
            int(np.clip(y1 + j[2] * dy, 0, h - 1)), int(np.clip(x1 + j[3] * dx, 0, w - 1)))


def add_correction(ints: Interactions, pred: np.ndarray, gt: np.ndarray, kind: str = "clicks") -> bool:
    """Add the robot's next ``kind`` ("clicks" or "scribbles") interaction; False when there is none."""
    if kind == "clicks":
        c = next_click(pred, gt)
        if c is None:
            return False
        (ints.pos_points if c[0] else ints.neg_points).append(c[1])
        return True
    if kind == "scribbles":
        s = next_scribble(pred, gt)
        if s is None:
            return False
        target = ints.pos_scribbles if s[0] else ints.neg_scribbles
        target.extend(s[1])
        return True
    raise ValueError(f"unknown interaction kind {kind!r}: clicks or scribbles")
