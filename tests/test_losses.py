"""segicl.losses: Dice + BCE on logits, checked against MONAI and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from segicl.losses import DiceBCELoss, dice_bce_loss, soft_dice_loss


def test_matches_monai_dice_with_sigmoid_plus_bce():
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    monai_dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    expected = 1.5 * monai_dice + 1.0 * bce
    assert torch.allclose(dice_bce_loss(logits, target), expected, atol=1e-6)
    assert torch.allclose(DiceBCELoss(2.0, 0.5)(logits, target), 2.0 * monai_dice + 0.5 * bce, atol=1e-6)


def test_hand_computed_values():
    # logits 0 -> p = 0.5 everywhere; target: half of 4 pixels on.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    dice = 1 - (2 * 1.0 + 1) / (2.0 + 2.0 + 1)  # sum(p t) = 1, sum p = 2, sum t = 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(dice)
    assert dice_bce_loss(logits, target, dice_weight=0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    assert dice_bce_loss(logits, target).item() == pytest.approx(1.5 * dice + math.log(2), abs=1e-6)


def test_empty_prediction_on_empty_target_is_near_zero_and_sigmoid_applied_once():
    target = torch.zeros(2, 1, 4, 4)
    confident_empty = torch.full((2, 1, 4, 4), -20.0)
    assert dice_bce_loss(confident_empty, target).item() < 1e-6
    # Raw logits are not probabilities: large positive logits on an empty target must cost a lot.
    assert dice_bce_loss(torch.full((2, 1, 4, 4), 20.0), target).item() > 10


def test_per_image_dice_then_batch_mean():
    logits = torch.tensor([20.0, -20.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    target = torch.ones(2, 1, 2, 2)
    # image 0 perfect (loss ~0), image 1 all missed: 1 - 1/(4+1) = 0.8 -> mean 0.4
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.4, abs=1e-4)


def test_gradient_flows_to_logits():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    dice_bce_loss(logits, (torch.rand(2, 1, 4, 4) > 0.5).float()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logits, target",
    [
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5)),
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)),
        (torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4)),
        (torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)),
    ],
)
def test_bad_inputs_raise(logits, target):
    with pytest.raises(ValueError):
        dice_bce_loss(logits, target)


def test_negative_weight_raises():
    with pytest.raises(ValueError, match="non-negative"):
        dice_bce_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), dice_weight=-1.0)
