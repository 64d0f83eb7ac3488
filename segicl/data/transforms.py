"""Transforms between stored resolution and model resolution.

Images and masks are resized to a square ``size x size`` (aspect ratio not kept); predictions are
resized back to the stored ``(H, W)`` with the exact inverse mapping, so metrics are computed at the
mask's stored resolution.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image (RGB or L, any size) -> (3, size, size) float32 in [-1, 1].

    Grayscale is replicated to 3 channels; bicubic resize (antialiased by PIL).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has zero size {img.width}x{img.height}")
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    arr = np.asarray(rgb.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).clamp(-1.0, 1.0).contiguous()


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Binary mask (H, W) -> (1, size, size) float32 in {0, 1} (nearest-neighbour resize)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    pil = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    arr = np.asarray(pil.resize((size, size), Image.NEAREST)) > 127
    return torch.from_numpy(arr.astype(np.float32))[None]


def resize_prob(prob: np.ndarray | torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """Probability / uncertainty map (h, w) -> (H, W) float32, bilinear (align_corners=False)."""
    t = torch.as_tensor(np.asarray(prob, dtype=np.float32) if not torch.is_tensor(prob) else prob.float())
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {tuple(t.shape)}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if (h, w) == tuple(t.shape):
        return t.detach().cpu().numpy().astype(np.float32)
    out = F.interpolate(t[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return out.detach().cpu().numpy().astype(np.float32)


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image (for figures)."""
    arr = ((t.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
