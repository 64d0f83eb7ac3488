"""The dense in-context layout of the multimodal encoder (issue 16): the condition map must depend on
the supports' masks, on which supports are given, and be the same whatever the batch padding."""

from __future__ import annotations

import pytest
import torch

from segicl.config import load_preset
from segicl.encoder import MultimodalEncoder


def _encoder(prior: str = "propagation") -> MultimodalEncoder:
    torch.manual_seed(0)
    return MultimodalEncoder(load_preset("tiny", lm={"support_tokens": "dense", "support_prior": prior})).eval()


def _episode(b: int = 2, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, 3, 64, 64, generator=g) * 2 - 1
    si = torch.rand(b, k, 3, 64, 64, generator=g) * 2 - 1
    sm = (torch.rand(b, k, 1, 64, 64, generator=g) > 0.7).float()
    return q, si, sm


@pytest.mark.parametrize("prior", ["none", "propagation"])
def test_dense_condition_map_shapes_and_support_mask_dependence(prior):
    enc = _encoder(prior)
    q, si, sm = _episode()
    with torch.no_grad():
        out = enc(["segment the lesion"] * 2, q, si, None, [3, 3], support_masks=sm, return_dict=True)
        assert out["cond"].shape == (2, 64, enc.cfg.condition.dim)  # one condition token per cell of the 8 x 8 grid
        assert out["mask_logits"].shape == (2, 1, 64, 64)
        flipped = sm.clone()
        flipped[0, 0] = 1 - flipped[0, 0]  # one support's mask changes
        out2 = enc(["segment the lesion"] * 2, q, si, None, [3, 3], support_masks=flipped, return_dict=True)
    assert (out2["cond"][0] - out["cond"][0]).abs().max() > 1e-3
    assert torch.allclose(out2["cond"][1], out["cond"][1], atol=1e-5)  # the other item is untouched


def test_dense_supports_of_another_task_change_the_output_and_padding_does_not():
    enc = _encoder()
    q, si, sm = _episode(b=2, k=3)
    with torch.no_grad():
        own = enc(["x", "x"], q, si, None, [3, 3], support_masks=sm)
        swapped = enc(["x", "x"], q, si.flip(0), None, [3, 3], support_masks=sm.flip(0))  # each gets the other's
        assert (own - swapped).abs().max() > 1e-3
        # item 0 with k = 2 alone equals item 0 with k = 2 in a batch padded to k = 3 beside a k = 3 item
        alone = enc(["x"], q[:1], si[:1, :2], None, [2], support_masks=sm[:1, :2])
        mixed = enc(["x", "x"], q, si, None, [2, 3], support_masks=sm)
        zero = enc(["x"], q[:1])
    assert torch.allclose(alone[0], mixed[0], atol=1e-4)
    assert zero.shape == own[:1].shape and (zero[0] - own[0]).abs().max() > 1e-3  # k = 0 is its own answer


def test_dense_layout_checks_its_config():
    with pytest.raises(ValueError, match="propagation"):
        load_preset("tiny", lm={"support_prior": "propagation"})  # needs the dense layout
    with pytest.raises(ValueError, match="one vision patch per condition cell"):
        load_preset("tiny", lm={"support_tokens": "dense"}, vision={"patch_size": 16, "pool_to": 2})
    enc = MultimodalEncoder(load_preset("tiny"))
    with pytest.raises(ValueError, match="return_dict"):
        enc(["x"], torch.zeros(1, 3, 64, 64), return_dict=True)


def test_pipeline_runs_the_dense_learned_path_end_to_end():
    import numpy as np

    from segicl.pipeline import SegICLPipeline

    pipe = SegICLPipeline.from_preset("tiny", lm={"support_tokens": "dense", "support_prior": "propagation"})
    pipe.set_fine(mode="none").set_postprocess(mode="none")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    sup = [(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8), rng.random((50, 50)) > 0.6) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    out = pipe([img, img], text="segment", supports=[sup, []], num_inference_steps=2, generator=g)
    assert out.paths == ["encoder", "encoder"]  # matching none: the learned path alone, with or without supports
    assert out.masks[0].shape == (48, 40) and out.probabilities[1].shape == (48, 40)


def test_dense_condition_mask_renders_the_mask_heads_mask():
    from segicl.pipeline import SegICLPipeline

    pipe = SegICLPipeline.from_preset("tiny", lm={"support_tokens": "dense", "support_prior": "propagation"})
    q, si, sm = _episode(b=1, k=2)
    sup = [[(si[0, j], sm[0, j]) for j in range(2)]]
    with torch.no_grad():
        tokens = pipe.encode(q, ["x"], sup)
        out = pipe.encoder(["x"], q, si, None, [2], support_masks=sm, return_dict=True)
        mask_cond = pipe.set_lm(dense_condition="mask").encode(q, ["x"], sup)
        expected = pipe.condition_encoder((torch.sigmoid(out["mask_logits"]) > pipe.config.threshold).float())
    assert torch.allclose(tokens, out["cond"], atol=1e-5) and torch.allclose(mask_cond, expected, atol=1e-5)
    with pytest.raises(ValueError, match="dense_condition only"):
        pipe.set_lm(hidden_size=8)


def test_dense_mask_head_starts_at_the_propagation():
    """'Start from the propagation, then pass it': before training, the mask head of an item with supports
    is the label propagation itself (residual head initialised at zero); without supports it is undecided."""
    from segicl.matching import match_supports

    enc = _encoder()
    q, si, sm = _episode(b=2, k=3)
    with torch.no_grad():
        out = enc(["x", "x"], q, si, None, [3, 0], support_masks=sm, return_dict=True)
        prop = match_supports(q, si, sm, [3, 0], enc.cfg.matching, enc.cfg.mask_size)
    assert torch.allclose(torch.sigmoid(out["mask_logits"][0]), prop[0].clamp(1e-3, 1 - 1e-3), atol=1e-5)
    assert torch.allclose(torch.sigmoid(out["mask_logits"][1]), torch.full_like(prop[1], 0.5))


def test_dense_vision_off_reads_only_the_image_relative_features():
    torch.manual_seed(0)
    enc = MultimodalEncoder(load_preset("tiny", lm={"support_tokens": "dense", "support_prior": "propagation",
                                                    "dense_vision": False})).eval()
    q, si, sm = _episode(b=1, k=2)
    with torch.no_grad():
        before = enc(["x"], q, si, None, [2], support_masks=sm)
        for p in enc.vision.parameters():
            p.add_(1.0)
        after = enc(["x"], q, si, None, [2], support_masks=sm)
        # a global brightness / contrast change of every image leaves the features (standardised per image) alone
        shifted = enc(["x"], q * 0.8 + 0.1, si * 0.8 + 0.1, None, [2], support_masks=sm)
    assert torch.equal(before, after)
    assert torch.allclose(before, shifted, atol=2e-2)
