"""The UniverSeg-style comparator (issue 16): support-order invariance, padding, save/load, eval method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segicl.universeg import UniverSeg, UniverSegConfig


def _model():
    torch.manual_seed(0)
    return UniverSeg(UniverSegConfig(size=32, channels=(8, 8, 8))).eval()


def _inputs(k=3):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, k, 3, 32, 32, generator=g) * 2 - 1,
            (torch.rand(2, k, 1, 32, 32, generator=g) > 0.5).float())


def test_output_ignores_support_order_and_padding_but_not_masks():
    m = _model()
    q, si, sm = _inputs()
    with torch.no_grad():
        out = m(q, si, sm)
        perm = m(q, si[:, [2, 0, 1]], sm[:, [2, 0, 1]])
        assert out.shape == (2, 1, 32, 32) and torch.allclose(out, perm, atol=1e-5)
        padded = m(q, torch.cat([si[:, :2], torch.zeros_like(si[:, :1])], 1),
                   torch.cat([sm[:, :2], torch.zeros_like(sm[:, :1])], 1), [2, 2])
        assert torch.allclose(padded, m(q, si[:, :2], sm[:, :2]), atol=1e-5)
        assert (m(q, si, 1 - sm) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="supports"):
        m(q, si, sm, [0, 3])


def test_save_load_round_trip_and_tamper_check(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "us")
    back = UniverSeg.from_pretrained(tmp_path / "us")
    q, si, sm = _inputs()
    with torch.no_grad():
        assert torch.equal(back(q, si, sm), m(q, si, sm))
    (tmp_path / "us" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="checksum"):
        UniverSeg.from_pretrained(tmp_path / "us")


def test_universeg_eval_method_predicts_at_the_query_size(tmp_path):
    from eval.methods import build_method, parse_spec
    from segicl.data import Sample

    _model().save_pretrained(tmp_path / "us")
    method, prov = build_method(f"universeg:{tmp_path / 'us'}", {})
    rng = np.random.default_rng(0)

    def sample(stem):
        from PIL import Image

        return Sample(image=Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)), mask=rng.random((40, 50)) > 0.5,
                      dataset="d", label="x", label_value=1, modality="x", stem=stem, group=stem, split="train",
                      image_path=tmp_path / f"{stem}.png", mask_path=tmp_path / f"{stem}_m.png")

    prob, unc = method.predict(sample("q"), [sample("a"), sample("b")], "", 0)
    assert prob.shape == (40, 50) and 0 <= prob.min() and prob.max() <= 1 and unc is None
    with pytest.raises(ValueError, match="directory"):
        parse_spec("universeg")
