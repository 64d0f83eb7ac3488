"""TuneVLSeg's learnable upsampler: a trainable last layer for frozen decoders (seed 002, sec. 5).

``logits' = (1 - r) * logits + r * Conv_k(Upsample_s(features))`` where ``features`` is the decoder's
penultimate map, ``Upsample_s`` bilinear by the patch size (CLIPSeg) or 1 (CRIS, whose projector
features are already at the logits' resolution), ``Conv_k`` a k x k convolution to one channel
(k = 5, replicate padding) and ``r`` a learnable residual factor (init 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnableUpsampler(nn.Module):
    """Blend the decoder's logits with a learned projection of its penultimate features.

    Args:
        in_channels: channels C of the penultimate features.
        scale: bilinear upsampling factor applied to the features first.
        kernel_size: odd convolution kernel (5 in TuneVLSeg).
        residual_init: initial r.

    Shapes:
        features (B, C, h, w), logits (B, 1, H, W) -> (B, 1, H, W); the upsampled map is resized to
        (H, W) if the sizes differ by rounding.
    """

    def __init__(self, in_channels: int, scale: float, kernel_size: int = 5, residual_init: float = 0.5):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.scale = float(scale)
        self.conv = nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2, padding_mode="replicate")
        self.residual = nn.Parameter(torch.tensor(float(residual_init)))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        x = features
        if self.scale != 1.0:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        x = self.conv(x)
        if x.shape[-2:] != logits.shape[-2:]:
            x = F.interpolate(x, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return (1 - self.residual) * logits + self.residual * x
