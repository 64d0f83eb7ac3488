"""Native-resolution path: thin structures segmented at the image's own resolution.

The models work on a ``mask_size`` grid (64 px for the tiny preset). A blob survives that (the
ground truth taken to 64 px and back keeps Dice >= 0.90 on every label of ../shared/data), a thin
structure does not (retinal vessels 0.37-0.58). So before segmenting, the pipeline asks the
supports: :func:`coarse_ceiling` is the Dice their own masks keep through the coarse grid (pooled). When it
is below ``fine.min_ceiling`` (``fine.mode = "auto"``), the item is segmented here instead, at the
image's own resolution (longer side capped at ``fine.max_size``, aspect kept), by one of two
classifiers of the query's pixels that learn from the supports alone, nothing trained beforehand
(``fine.classifier``):

- ``forest`` (default), :func:`forest_probability`: the pixel classifier of ilastik and of
  scikit-image's trainable segmentation. Every pixel is described by a filter bank at several scales
  (scikit-image ``multiscale_basic_features``: Gaussian intensity, gradient magnitude and Hessian
  eigenvalues, sigma 1-16, on the grey image; plus the smoothed colour channels of a colour image), a
  scikit-learn random forest is fitted to pixels drawn uniformly from the supports (so its
  probability keeps the structure's true share of pixels, and 0.5 is a calibrated threshold), and it
  predicts every query pixel;
- ``vote``, :func:`fine_propagation`: the label propagation of :mod:`segicl.matching` at 2 px
  patches, with the multi-scale patch features (local contrast and Hessian ridges).

Chosen on the val split of the one thin-structure dataset (rossa_octa_vessel, 12 images, k = 5
retrieved): the vote 0.727 (0.792 without its class balancing), the forest 0.849; a forest fitted to
class-balanced samples 0.783, which thickens every vessel. Blobs keep the coarse path; their
coarse-to-fine blend keeps the vote: at 128 px (val, 8 images per label, k = 5 retrieved) the forest
won on BUS-BRA, CVC and the left ventricle cavity but lost Kvasir 0.473 -> 0.347, FUSeg 0.260 -> 0.058
and the myocardium 0.351 -> 0.128, where the vote's position feature and patch context count.

Why no tiles: every feature is local (a Gaussian surround of at most 8 patches for the vote, 4 x 16 px
for the forest's filters), the vote is a top-k search over a fixed budget of support patches
(``fine.max_support_patches``) and the forest is fitted to a fixed number of support pixels
(``fine.forest_samples``) and predicts the query in row blocks, so the cost and memory grow linearly
with the query's pixels, and a whole image is exactly what tiles blended
with a window would approximate. A 1024 x 1024 image at ``max_size: 1024`` is 262k query patches
(``segicl benchmark resolution`` reports time and memory).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
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


def _is_colour(img: Image.Image) -> bool:
    if img.mode in ("1", "L", "I", "F", "I;16", "LA"):
        return False
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(np.abs(rgb[..., 0] - rgb[..., 1]).max() > 2 or np.abs(rgb[..., 1] - rgb[..., 2]).max() > 2)


def _pixel_features(img: Image.Image, shape: tuple[int, int], fine, colour: bool) -> np.ndarray:
    """(H, W, F) float32 filter bank of ``img`` resized to ``shape``: multi-scale Gaussian intensity, gradient
    magnitude and Hessian eigenvalues of the grey image (scikit-image), and with ``colour`` (any image of the
    task in colour) its three channels smoothed at the smallest and largest scale."""
    from scipy import ndimage
    from skimage.feature import multiscale_basic_features

    rgb = np.asarray(img.convert("RGB").resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    lo, hi = fine.forest_sigmas
    feats = [multiscale_basic_features(grey, sigma_min=lo, sigma_max=hi, num_sigma=fine.forest_num_sigma)]
    if colour:  # the channels, smoothed, beside the grey filter bank
        feats += [ndimage.gaussian_filter(rgb, (s, s, 0)) for s in (lo, hi)]
    return np.concatenate(feats, axis=-1).astype(np.float32, copy=False)


_FORESTS: OrderedDict = OrderedDict()  # the last few fitted forests, by their supports and settings
_FOREST_CACHE = 4


def _digest(img: Image.Image, mask: np.ndarray) -> str:
    h = hashlib.sha1(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    h.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes() + str(np.shape(mask)).encode())
    return h.hexdigest()


def _fit_forest(supports: Sequence[tuple[Image.Image, np.ndarray]], fine, seed: int, colour: bool):
    """The forest fitted to the supports' pixels, or the one class every sampled pixel has (a float). Cached:
    a folder segmented with the same supports fits once."""
    from sklearn.ensemble import RandomForestClassifier

    key = (tuple(_digest(img, m) for img, m in supports), fine.max_size, fine.forest_samples, fine.forest_trees,
           fine.forest_depth, tuple(fine.forest_sigmas), fine.forest_num_sigma, seed, colour)
    if key in _FORESTS:
        _FORESTS.move_to_end(key)
        return _FORESTS[key]
    rng = np.random.default_rng(seed)
    per = max(1, fine.forest_samples // len(supports))
    xs, ys = [], []
    for img, mask in supports:
        shape = working_shape(img.height, img.width, fine.max_size, 1)
        feats = _pixel_features(img, shape, fine, colour)
        feats = feats.reshape(-1, feats.shape[-1])
        m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)) > 127
        idx = rng.choice(m.size, min(per, m.size), replace=False)  # uniform: the true share of foreground
        xs.append(feats[idx])
        ys.append(m.ravel()[idx])
    y = np.concatenate(ys)
    if y.all() or not y.any():  # one class in every sampled pixel: nothing to learn, answer that class
        forest = float(y[0])
    else:
        forest = RandomForestClassifier(n_estimators=fine.forest_trees, max_depth=fine.forest_depth, min_samples_leaf=5,
                                        n_jobs=-1, random_state=int(rng.integers(1 << 31)))  # threads
        forest.fit(np.concatenate(xs), y)
    _FORESTS[key] = forest
    while len(_FORESTS) > _FOREST_CACHE:
        _FORESTS.popitem(last=False)
    return forest


def forest_probability(query: Image.Image, supports: Sequence[tuple[Image.Image, np.ndarray]], fine,
                       seed: int = 0) -> np.ndarray:
    """Foreground probability (H, W) of ``query`` from a random forest fitted to the supports' pixels.

    Args:
        query: the query image (any size, any aspect).
        supports: (image, binary mask) pairs, each at its own size (at least one).
        fine: :class:`segicl.config.FineConfig` (max_size, forest_* settings).
        seed: seeds the pixel sample and the forest (the same inputs give the same answer).
    """
    from segicl.data.transforms import resize_prob

    if not supports:
        raise ValueError("the native-resolution path needs at least one support")
    colour = any(_is_colour(im) for im in (query, *(img for img, _ in supports)))
    forest = _fit_forest(supports, fine, seed, colour)
    if isinstance(forest, float):
        return np.full((query.height, query.width), forest, np.float32)
    shape = working_shape(query.height, query.width, fine.max_size, 1)
    feats = _pixel_features(query, shape, fine, colour)
    prob = np.empty(shape, np.float32)
    rows = max(1, (1 << 18) // shape[1])  # predicted in blocks of ~262k pixels (bounded memory)
    for r in range(0, shape[0], rows):
        block = feats[r : r + rows]
        prob[r : r + rows] = forest.predict_proba(block.reshape(-1, block.shape[-1]))[:, 1].reshape(block.shape[:2])
    return resize_prob(prob, (query.height, query.width))


def native_probability(query: Image.Image, supports: Sequence[tuple[Image.Image, np.ndarray]], matching, fine,
                       seed: int = 0) -> np.ndarray:
    """The native-resolution path's probability (H, W) of ``query``: ``fine.classifier`` (forest or vote)."""
    if fine.classifier == "forest":
        return forest_probability(query, supports, fine, seed)
    return fine_propagation(query, supports, matching, fine)


def use_fine(masks: Sequence[np.ndarray], fine, coarse_size: int) -> bool:
    """Whether an item with these support masks takes the native-resolution path (``fine.mode``)."""
    if fine.mode == "none" or not len(masks):
        return False
    return fine.mode == "always" or coarse_ceiling(masks, coarse_size) < fine.min_ceiling
