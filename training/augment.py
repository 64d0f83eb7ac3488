"""Consistent image + mask augmentation with torchvision.transforms.v2 (tv_tensors.Image / Mask).

Geometric transforms (random resized crop from the cache's margin, flips, a small affine) apply the
same parameters to the image and its mask (masks nearest-neighbour, so they stay binary);
brightness/contrast touch the image only. Every call is a fixed function of its ``seed``: the
randomness runs inside ``torch.random.fork_rng`` seeded with it, so the global RNG (dropout,
diffusion noise of the training step) is left untouched and item i of an epoch is reproducible in
any worker process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


@dataclass
class AugmentConfig:
    """Augmentation settings (``data.augment`` in the training configs; ``false`` disables).

    Attributes:
        enabled: False = plain resize to the model resolution.
        crop_scale: area range of the random resized crop taken from the stored (margin) image.
        crop_ratio: aspect-ratio range of that crop.
        hflip, vflip: flip probabilities.
        degrees: max rotation; translate: max shift as a fraction of the side; scale: zoom range.
        brightness, contrast: ColorJitter strengths (image only).
    """

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    hflip: float = 0.5
    vflip: float = 0.0
    degrees: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2
    contrast: float = 0.2

    @classmethod
    def from_any(cls, value: AugmentConfig | dict | bool | None) -> AugmentConfig:
        if isinstance(value, AugmentConfig):
            return value
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"unknown augmentation keys {sorted(unknown)}; known: {sorted(names)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return cls(**kw)


class PairAugment:
    """``(image uint8 (H, W, 3), mask (H, W) bool/uint8, seed) -> (image (3, S, S) float in [-1, 1],
    mask (1, S, S) float in {0, 1})``."""

    def __init__(self, size: int, config: AugmentConfig | dict | bool | None = None):
        self.size = int(size)
        self.config = c = AugmentConfig.from_any(config)
        self.resize = v2.Resize([self.size, self.size], antialias=True)
        crop = v2.RandomResizedCrop([self.size, self.size], scale=c.crop_scale, ratio=c.crop_ratio, antialias=True)
        affine = v2.RandomAffine(degrees=c.degrees, translate=(c.translate, c.translate), scale=c.scale)
        self.geometric = v2.Compose([crop, affine])
        self.flips = v2.Compose([v2.RandomHorizontalFlip(c.hflip), v2.RandomVerticalFlip(c.vflip)])
        self.photometric = v2.ColorJitter(brightness=c.brightness, contrast=c.contrast) if (c.brightness or c.contrast) else None

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, seed: int, *, flips: bool = True, geometric: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one pair.

        Args:
            image: (H, W, 3) uint8.
            mask: (H, W) binary.
            seed: fixes every random choice.
            flips: allow flips (False when the text names a location: "polyp at the left").
            geometric: allow crop/affine. When they remove every foreground pixel of a non-empty
                mask, the pair falls back to the plain resize (+ flips), so a mask that holds the
                label keeps it.
        """
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        m = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask).astype(np.uint8))[None])
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
            if c.enabled and geometric:
                out_img, out_m = self.geometric(img, m)
                if bool(m.any()) and not bool(out_m.any()):
                    out_img, out_m = self.resize(img, m)
            else:
                out_img, out_m = self.resize(img, m)
            if c.enabled and flips:
                out_img, out_m = self.flips(out_img, out_m)
            if c.enabled and self.photometric is not None:
                out_img = self.photometric(out_img)
        x = out_img.as_subclass(torch.Tensor).float().div(127.5).sub(1.0).clamp(-1.0, 1.0)
        y = (out_m.as_subclass(torch.Tensor) > 0).float()
        return x, y


def plain(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-augmented resize of :class:`PairAugment` (validation, k-shot evaluation)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    x = TF.resize_image(img, [size, size], antialias=True).float().div(127.5).sub(1.0).clamp(-1.0, 1.0)
    y = (TF.resize_mask(torch.from_numpy(np.ascontiguousarray(mask).astype(np.uint8))[None], [size, size]) > 0).float()
    return x, y
