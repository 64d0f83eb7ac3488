"""Native-resolution path: label propagation at the image's own resolution for thin structures.

The models work on a ``mask_size`` grid (64 px for the tiny preset). A blob survives that (the
ground truth taken to 64 px and back keeps Dice >= 0.90 on every label of ../shared/data), a thin
structure does not (retinal vessels 0.37-0.58). So before segmenting, the pipeline asks the
supports: :func:`coarse_ceiling` is the Dice their own masks keep through the coarse grid (pooled). When it
is below ``fine.min_ceiling`` (``fine.mode = "auto"``), the item is segmented here instead, by the
training-free label propagation of :mod:`segicl.matching` run at the image's own resolution (longer
side capped at ``fine.max_size``, aspect kept, 2 px patches) with the multi-scale features (local
contrast and Hessian ridges, which tell a vessel from the background it crosses). Blobs keep the
coarse path unchanged.

Why no tiles: every feature is local (a Gaussian surround of at most 8 patches) and the vote is a
top-k search over a fixed budget of support patches (``fine.max_support_patches``), so the cost
and memory grow linearly with the query's pixels, and a whole image is exactly what tiles blended
with a window would approximate. A 1024 x 1024 image at ``max_size: 1024`` is 262k query patches
(``segicl benchmark resolution`` reports time and memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from segicl.matching import patch_features, vote


def round_trip(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary mask taken to ``size x size`` (area average) and back (bilinear, > 0.5): what a
    perfect prediction on that grid looks like at the mask's resolution."""
    from segicl.data.transforms import resize_prob

    m = np.asarray(mask, dtype=bool)
    small = Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BOX)
    return resize_prob(np.array(small, dtype=np.float32), m.shape) > 0.5


def coarse_ceiling(masks: Sequence[np.ndarray], size: int) -> float:
    """Dice that the ``masks`` keep through a ``size x size`` grid, pooled over all their pixels
    (1.0 when all are empty). Pooled, not averaged per mask: one small mask among large ones (an
    apical heart slice) barely moves it, so only a structure that is thin in every support does."""
    inter = total = 0
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if m.any():
            back = round_trip(m, size)
            inter += int((back & m).sum())
            total += int(back.sum() + m.sum())
    return 1.0 if total == 0 else 2 * inter / total


def working_shape(height: int, width: int, max_size: int, patch: int) -> tuple[int, int]:
    """(H, W) of the working image: the longer side capped at ``max_size``, aspect kept, both sides
    multiples of ``patch`` and at least 4 patches."""
    scale = min(1.0, max_size / max(height, width))
    return tuple(max(4, round(side * scale / patch)) * patch for side in (height, width))  # type: ignore[return-value]


def _image(img: Image.Image, shape: tuple[int, int]) -> torch.Tensor:
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    arr = np.asarray(rgb.resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).clamp(-1.0, 1.0)[None]


def _patch_values(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Foreground fraction of each patch (area average of the mask at its own resolution)."""
    small = Image.fromarray(np.asarray(mask, dtype=np.float32)).resize((grid[1], grid[0]), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32).clip(0, 1)).flatten()


def fine_propagation(query: Image.Image, supports: Sequence[tuple[Image.Image, np.ndarray]], matching,
                     fine) -> np.ndarray:
    """The label-propagation probability (H, W) of ``query`` at its own resolution.

    Args:
        query: the query image (any size, any aspect).
        supports: (image, binary mask) pairs, each at its own size (at least one).
        matching: :class:`segicl.config.MatchingConfig` (scale, position, top_k, balanced).
        fine: :class:`segicl.config.FineConfig` (max_size, patch, features, max_support_patches, nprobe).
    """
    from segicl.data.transforms import resize_prob

    if not supports:
        raise ValueError("the native-resolution path needs at least one support")
    keys, vals = [], []
    for img, mask in supports:
        shape = working_shape(img.height, img.width, fine.max_size, fine.patch)
        grid = (shape[0] // fine.patch, shape[1] // fine.patch)
        keys.append(patch_features(_image(img, shape), grid, matching.position, fine.features)[0])
        vals.append(_patch_values(mask, grid))
    shape = working_shape(query.height, query.width, fine.max_size, fine.patch)
    grid = (shape[0] // fine.patch, shape[1] // fine.patch)
    q = patch_features(_image(query, shape), grid, matching.position, fine.features)[0]
    prob = vote(q, torch.cat(keys), torch.cat(vals), matching.scale, matching.top_k, matching.balanced,
                fine.max_support_patches, fine.nprobe)
    return resize_prob(prob.view(grid), (query.height, query.width))


def use_fine(masks: Sequence[np.ndarray], fine, coarse_size: int) -> bool:
    """Whether an item with these support masks takes the native-resolution path (``fine.mode``)."""
    if fine.mode == "none" or not len(masks):
        return False
    return fine.mode == "always" or coarse_ceiling(masks, coarse_size) < fine.min_ceiling
