"""Pseudo-tasks for in-context training (issue 16): many more tasks than the datasets' labels.

Ten real labels teach a matcher the look of ten structures; to learn *matching* it must see tasks
whose only common thread is "the query's label is what looks like the supports' label". Two
generators, both producing items in the format of :class:`training.episodes.EpisodeDataset`:

* ``superpixel`` (SSL-ALPNet, Ouyang et al. 2020): a training image is over-segmented with
  scikit-image's Felzenszwalb graph segmentation (random scale), one segment (sometimes merged with
  a neighbour) is the label, and the query and the supports are different strong augmentations
  (crop, affine, flips, photometric) of that image and its mask. Only images of the training cache
  are used, so a fold's held-out datasets never enter.
* ``synthetic`` (the procedural tasks of UniverSeg / MultiverSeg training): a task draws a shape
  family (ellipses, polygons, smooth blobs, curvilinear strokes) and two textures (colour, smoothed
  noise at a random scale, stripes); every image of the episode is a fresh background texture with
  one or more new shapes of the foreground texture, so supports and query share a task, not pixels.

Task augmentations over the whole episode (UniverSeg): an intensity remap (gamma, channel
permutation, inversion, greyscale) applied to every image of the episode alike, and label inversion.
Every item is a fixed function of ``(seed, epoch, index)`` and draws a new task, so the number of
distinct tasks seen equals the number of pseudo-episodes drawn (:class:`MixedEpisodes` counts them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.augment import PairAugment
from training.cache import PairCache
from training.episodes import collate

KINDS = ("superpixel", "synthetic")
STRONG = {"crop_scale": (0.5, 1.0), "hflip": 0.5, "vflip": 0.5, "degrees": 30, "translate": 0.1,
          "scale": (0.8, 1.2), "brightness": 0.3, "contrast": 0.3}


def _smooth_noise(rng: np.random.Generator, size: int, channels: int, scale: float) -> np.ndarray:
    """(size, size, channels) noise in [0, 1] smoothed at ``scale`` pixels (bilinear upsampling of a coarse grid)."""
    coarse = max(2, int(round(size / max(scale, 1.0))))
    x = torch.from_numpy(rng.random((1, channels, coarse, coarse), dtype=np.float32))
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0]
    x = (x - x.min()) / (x.max() - x.min() + 1e-6)
    return x.permute(1, 2, 0).numpy()


def _texture(rng: np.random.Generator) -> dict[str, Any]:
    return {"colour": rng.random(3), "amp": rng.uniform(0.05, 0.5), "scale": float(np.exp(rng.uniform(0, np.log(16)))),
            "stripes": rng.random() < 0.25, "freq": rng.uniform(0.1, 0.6), "angle": rng.uniform(0, np.pi)}


def _render_texture(t: dict[str, Any], rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.broadcast_to(t["colour"], (size, size, 3)).astype(np.float32)
    img = img + t["amp"] * (_smooth_noise(rng, size, 3, t["scale"]) - 0.5)
    if t["stripes"]:
        yy, xx = np.mgrid[:size, :size]
        wave = np.sin(t["freq"] * (xx * np.cos(t["angle"]) + yy * np.sin(t["angle"])) + rng.uniform(0, 6.3))
        img = img + 0.15 * wave[..., None]
    return np.clip(img, 0, 1)


def _shape(rng: np.random.Generator, family: str, size: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    if family == "ellipse":
        a, b = radius * rng.uniform(0.5, 1.5, 2)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    if family == "polygon":
        from skimage.draw import polygon

        n = int(rng.integers(3, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = radius * rng.uniform(0.5, 1.4, n)
        m = np.zeros((size, size), bool)
        rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), (size, size))
        m[rr, cc] = True
        return m
    if family == "blob":
        field = _smooth_noise(rng, size, 1, radius)[..., 0]
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius)
        return field - d > 0.2
    # "stroke": a thin random curve (vessel-like), 1-3 px wide
    from skimage.draw import line
    from skimage.morphology import dilation, disk

    m = np.zeros((size, size), bool)
    y, x, ang = cy, cx, rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(6, 14))):
        ang += rng.normal(0, 0.6)
        y2, x2 = np.clip(y + radius * np.sin(ang), 0, size - 1), np.clip(x + radius * np.cos(ang), 0, size - 1)
        rr, cc = line(int(y), int(x), int(y2), int(x2))
        m[rr, cc] = True
        y, x = y2, x2
    return dilation(m, disk(int(rng.integers(0, 2))))


def synthetic_pair(task: dict[str, Any], rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (size, size, 3), mask bool) of a synthetic task."""
    img = _render_texture(task["bg"], rng, size)
    fg = _render_texture(task["fg"], rng, size)
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, task["max_shapes"] + 1))):
        mask |= _shape(rng, task["family"], size, task["radius"] * rng.uniform(0.7, 1.3))
    if not mask.any():
        mask[size // 2, size // 2] = True
    if task["distractor"]:  # a shape of the foreground family in a third texture: shape alone does not decide
        other = _render_texture(task["other"], rng, size)
        d = _shape(rng, task["family"], size, task["radius"]) & ~mask
        img = np.where(d[..., None], other, img)
    img = np.where(mask[..., None], fg, img)
    return (img * 255).astype(np.uint8), mask


def synthetic_task(rng: np.random.Generator, size: int) -> dict[str, Any]:
    family = str(rng.choice(["ellipse", "polygon", "blob", "stroke"], p=[0.3, 0.25, 0.25, 0.2]))
    return {"family": family, "bg": _texture(rng), "fg": _texture(rng), "other": _texture(rng),
            "radius": float(rng.uniform(0.05, 0.3) * size), "max_shapes": int(rng.integers(1, 4)),
            "distractor": bool(rng.random() < 0.3)}


def superpixel_mask(image: np.ndarray, rng: np.random.Generator, min_frac: float = 0.02,
                    max_frac: float = 0.5) -> np.ndarray | None:
    """A random Felzenszwalb segment of ``image`` (uint8 (H, W, 3)), sometimes merged with a neighbour,
    covering ``min_frac``..``max_frac`` of the image; None when no segment fits."""
    from skimage.segmentation import felzenszwalb

    seg = felzenszwalb(image, scale=float(np.exp(rng.uniform(np.log(50), np.log(800)))), sigma=0.5, min_size=20)
    ids, counts = np.unique(seg, return_counts=True)
    frac = counts / seg.size
    ok = ids[(frac >= min_frac) & (frac <= max_frac)]
    if not len(ok):
        return None
    mask = seg == rng.choice(ok)
    if rng.random() < 0.3:  # merge with a touching segment
        from skimage.morphology import dilation, disk

        ring = dilation(mask, disk(1)) & ~mask
        near = np.unique(seg[ring])
        if len(near):
            merged = mask | (seg == rng.choice(near))
            if merged.mean() <= max_frac:
                mask = merged
    return mask


def _remap(rng: np.random.Generator) -> dict[str, Any]:
    return {"gamma": float(np.exp(rng.uniform(-0.7, 0.7))), "perm": rng.permutation(3), "invert": rng.random() < 0.3,
            "grey": rng.random() < 0.3}


def _apply_remap(x: torch.Tensor, r: dict[str, Any]) -> torch.Tensor:
    """(3, S, S) in [-1, 1] -> the same intensity remap for every image of an episode."""
    y = ((x + 1) / 2).clamp(0, 1) ** r["gamma"]
    y = y[torch.as_tensor(r["perm"])]
    if r["grey"]:
        y = y.mean(0, keepdim=True).expand(3, -1, -1)
    if r["invert"]:
        y = 1 - y
    return y * 2 - 1


class PseudoTaskEpisodes(Dataset):
    """Superpixel and synthetic in-context episodes (see the module docstring).

    Args:
        cache: training images for the superpixel tasks (masks unused).
        k_max: supports per item (zeros beyond ``num_supports``); k is uniform in min_k..k_max.
        length: episodes per epoch.
        seed: base seed; item ``i`` of epoch ``e`` depends on ``(seed, e, i)`` only.
        kinds: probability of each generator, e.g. ``{"superpixel": 0.5, "synthetic": 0.5}``.
        image_size: model resolution (default: the cache's).
        remap_prob / invert_prob: episode-wide intensity remap and label inversion.
    """

    collate_fn = staticmethod(collate)

    def __init__(self, cache: PairCache, k_max: int = 5, length: int = 10000, seed: int = 0,
                 kinds: dict[str, float] | None = None, image_size: int | None = None, remap_prob: float = 0.5,
                 invert_prob: float = 0.1, min_k: int = 0):
        kinds = dict(kinds or {"superpixel": 0.5, "synthetic": 0.5})
        bad = set(kinds) - set(KINDS)
        if bad or not kinds or any(v < 0 for v in kinds.values()) or sum(kinds.values()) <= 0:
            raise ValueError(f"kinds must give non-negative weights to {KINDS}, got {kinds}")
        if not 0 <= min_k <= k_max or length < 1:
            raise ValueError(f"need 0 <= min_k <= k_max and length >= 1, got {min_k} / {k_max} / {length}")
        self.min_k = int(min_k)
        self.cache, self.k_max, self.length, self.seed = cache, int(k_max), int(length), int(seed)
        self.kinds = list(kinds)
        p = np.array([kinds[k] for k in self.kinds], np.float64)
        self.kind_probs = p / p.sum()
        self.size = int(image_size or cache.size)
        self.augment = PairAugment(self.size, STRONG)
        self.remap_prob, self.invert_prob = float(remap_prob), float(invert_prob)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _pairs(self, kind: str, rng: np.random.Generator, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seeds = rng.integers(0, 2**62, size=n)
        if kind == "superpixel":
            for _ in range(20):
                row = int(rng.integers(len(self.cache)))
                image = self.cache.images[row]
                mask = superpixel_mask(image, rng)
                if mask is not None:
                    break
            else:
                raise RuntimeError("no superpixel of 2-50 % of the image in 20 training images")
            return [self.augment(image, mask, int(s)) for s in seeds]
        task = synthetic_task(rng, self.size)
        out = []
        for _ in range(n):
            image, mask = synthetic_pair(task, rng, self.size)
            x = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1)
            out.append((x, torch.from_numpy(mask)[None].float()))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 7])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_probs))]
        k = int(rng.integers(self.min_k, self.k_max + 1))
        pairs = self._pairs(kind, rng, k + 1)
        if rng.random() < self.remap_prob:
            r = _remap(rng)
            pairs = [(_apply_remap(x, r), m) for x, m in pairs]
        invert = k > 0 and rng.random() < self.invert_prob
        if invert:
            pairs = [(x, 1 - m) for x, m in pairs]
        s_imgs = torch.zeros(self.k_max, 3, self.size, self.size)
        s_masks = torch.zeros(self.k_max, 1, self.size, self.size)
        for j, (x, m) in enumerate(pairs[1:]):
            s_imgs[j], s_masks[j] = x, m
        return {"query_image": pairs[0][0], "query_mask": pairs[0][1], "support_images": s_imgs, "support_masks": s_masks,
                "num_supports": k, "text": "", "dataset": f"pseudo:{kind}", "label": 1,
                "stems": [f"{kind}-{self.epoch}-{index}-{j}" for j in range(k + 1)], "inverted": bool(invert)}


class MixedEpisodes(Dataset):
    """Real episodes with probability ``1 - pseudo_prob``, else a pseudo-task episode, per index (seeded).

    ``distinct_tasks(steps, batch_size)``: the real (dataset, label) tasks plus one per pseudo-episode drawn."""

    collate_fn = staticmethod(collate)

    def __init__(self, real: Dataset, pseudo: PseudoTaskEpisodes, pseudo_prob: float, seed: int = 0):
        if not 0 <= pseudo_prob <= 1:
            raise ValueError(f"pseudo_prob must be in [0, 1], got {pseudo_prob}")
        self.real, self.pseudo, self.pseudo_prob, self.seed = real, pseudo, float(pseudo_prob), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in (self.real, self.pseudo):
            d.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 11])
        if rng.random() < self.pseudo_prob:
            return self.pseudo[int(index) % len(self.pseudo)]
        return self.real[index]

    def distinct_tasks(self, episodes: int) -> int:
        """Expected number of distinct tasks after ``episodes`` episodes."""
        return len(getattr(self.real, "tasks", [])) + int(round(episodes * self.pseudo_prob))
