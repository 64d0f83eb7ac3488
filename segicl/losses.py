"""Segmentation losses on logits.

``dice_bce_loss`` is the objective of the VLSM papers (seed 003, eq. 2; seed 002, sec. 6.2):
``L = dice_weight * Dice(sigmoid(logits), target) + bce_weight * BCE(logits, target)`` with
``dice_weight=1.5, bce_weight=1.0``. It takes raw logits and applies the sigmoid exactly once, inside
(MONAI's ``DiceLoss(sigmoid=True)`` semantics). The medvlsm / vlsm-adapter configs build MONAI's
``DiceCELoss(lambda_dice=1.5, lambda_ce=1.0)`` without ``sigmoid=True`` and feed it single-channel
logits, so their Dice term is computed on raw, unbounded logits instead of probabilities; this
module is the fix.

The Dice term is computed per image, then averaged over the batch; an empty prediction on an empty
target gives a Dice loss of 0 thanks to ``smooth`` (so empty masks are learnable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) tensors, got {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of ``sigmoid(logits)`` against a binary target, per image then batch mean.

    Args:
        logits: (B, 1, H, W) raw scores.
        target: (B, 1, H, W) in {0, 1} (float or bool).
        smooth: added to numerator and denominator (MONAI's ``smooth_nr`` = ``smooth_dr``).

    Returns:
        Scalar ``mean_b(1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s))``.
    """
    _check(logits, target)
    prob = torch.sigmoid(logits.float()).flatten(1)
    tgt = target.float().flatten(1)
    inter = (prob * tgt).sum(1)
    denom = prob.sum(1) + tgt.sum(1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float = 1.5,
    bce_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Weighted Dice + binary cross-entropy on logits.

    Args:
        logits: (B, 1, H, W) raw scores (no sigmoid applied by the caller).
        target: (B, 1, H, W) binary mask in {0, 1}.
        dice_weight: weight of the soft Dice term (1.5 in seed 003).
        bce_weight: weight of the BCE term (1.0 in seed 003).
        smooth: Dice smoothing constant.

    Returns:
        Scalar loss.

    Raises:
        ValueError: shapes differ or are not (B, 1, H, W); target values outside [0, 1]; negative weights.
    """
    _check(logits, target)
    if dice_weight < 0 or bce_weight < 0:
        raise ValueError(f"loss weights must be non-negative, got dice={dice_weight}, bce={bce_weight}")
    tgt = target.float()
    if tgt.numel() and (tgt.min() < 0 or tgt.max() > 1):
        raise ValueError("target must lie in [0, 1]")
    loss = logits.new_zeros((), dtype=torch.float32)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, tgt, smooth)
    if bce_weight:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits.float(), tgt)
    return loss


class DiceBCELoss(nn.Module):
    """Module form of :func:`dice_bce_loss` (weights fixed at construction)."""

    def __init__(self, dice_weight: float = 1.5, bce_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.dice_weight, self.bce_weight, self.smooth = dice_weight, bce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(logits, target, self.dice_weight, self.bce_weight, self.smooth)
