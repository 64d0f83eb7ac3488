"""segicl.native (the native-resolution path for thin structures), the fast matcher and the
pipeline's choice of path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.metrics import dice
from segicl import native
from segicl.config import FineConfig, MatchingConfig, load_preset
from segicl.matching import match_supports, vote
from segicl.native import (
    coarse_ceiling,
    fine_propagation,
    forest_probability,
    native_probability,
    round_trip,
    use_fine,
    working_shape,
)
from segicl.pipeline import SegICLPipeline


def _vessels(seed: int, h: int, w: int, n: int = 6) -> tuple[Image.Image, np.ndarray]:
    """Noisy grey background crossed by ``n`` random 2-px bright lines (the 'vessels', ~5 % of pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for _ in range(n):
        y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
        angle = rng.uniform(0, np.pi)
        dist = np.abs((yy - y0) * np.cos(angle) - (xx - x0) * np.sin(angle))
        mask |= dist < 1.0
    smooth = np.asarray(Image.fromarray((rng.random((h // 8 + 1, w // 8 + 1)) * 255).astype(np.uint8))
                        .resize((w, h), Image.BICUBIC), np.float32)
    img = 0.5 * smooth + rng.normal(0, 12, (h, w)) + 110 * mask  # slow shading, noise, bright lines
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), mask


def _blob(seed: int, h: int, w: int) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - h * rng.uniform(0.4, 0.6)) ** 2 + (xx - w * rng.uniform(0.4, 0.6)) ** 2 < (0.2 * min(h, w)) ** 2
    img = rng.normal(60, 10, (h, w)) + 120 * mask
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), mask


def test_working_shape_keeps_aspect_caps_the_long_side_and_fits_patches():
    assert working_shape(1000, 700, 512, 2) == (512, 358)
    assert working_shape(700, 1000, 512, 2) == (358, 512)
    assert working_shape(333, 101, 512, 2) == (332, 100)  # below the cap: its own size in whole patches
    assert working_shape(3, 5, 512, 2) == (8, 8)  # at least 4 patches a side
    assert all(s % 4 == 0 for s in working_shape(997, 613, 300, 4))


def test_coarse_ceiling_tells_thin_from_blob():
    thin = [_vessels(s, 256, 256)[1] for s in range(3)]
    blobs = [_blob(s, 256, 256)[1] for s in range(3)]
    assert coarse_ceiling(thin, 64) < 0.7 < 0.95 < coarse_ceiling(blobs, 64)
    assert coarse_ceiling(thin, 256) == 1.0 and coarse_ceiling([np.zeros((9, 9), bool)], 4) == 1.0
    assert dice(round_trip(blobs[0], 64), blobs[0]) > 0.97
    fine = FineConfig()
    assert use_fine(thin, fine, 64) and not use_fine(blobs, fine, 64) and not use_fine([], fine, 64)
    assert not use_fine(thin, FineConfig(mode="none"), 64) and use_fine(blobs, FineConfig(mode="always"), 64)


def test_faiss_top_k_vote_equals_the_all_pairs_vote_on_small_inputs():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    keys = F.normalize(torch.randn(300, 8, generator=g), dim=-1)
    vals = (torch.rand(300, generator=g) < 0.2).float()
    for balanced in (False, True):
        fast = vote(q, keys, vals, 30.0, top_k=10, balanced=balanced)
        logits = 30.0 * q @ keys.T  # reference: dense logits, everything below the 10th best masked out
        kth = logits.topk(10, dim=-1).values[:, -1:]
        w = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        if balanced:
            pi = vals.mean()
            fg, bg = w @ vals / pi, w @ (1 - vals) / (1 - pi)
            ref = fg / (fg + bg)
        else:
            ref = w @ vals
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_inverted_file_search_agrees_with_exact_search_on_clustered_keys():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    lab = torch.randint(0, 40, (20000,), generator=g)
    keys = F.normalize(centres[lab] + 0.15 * torch.randn(20000, 16, generator=g), dim=-1)
    vals = (lab < 8).float()  # 8 of 40 clusters are foreground
    qlab = torch.randint(0, 40, (500,), generator=g)
    q = F.normalize(centres[qlab] + 0.15 * torch.randn(500, 16, generator=g), dim=-1)
    exact = vote(q, keys, vals, 100.0, top_k=20, balanced=True)
    approx = vote(q, keys, vals, 100.0, top_k=20, balanced=True, nprobe=8)  # 78 lists, 8 searched
    assert ((exact > 0.5) == (approx > 0.5)).float().mean() > 0.99
    assert ((approx > 0.5) == (qlab < 8)).float().mean() > 0.95


def test_support_budget_keeps_both_classes():
    vals = torch.zeros(10000)
    vals[:300] = 1.0  # 3 % foreground
    keys = F.normalize(torch.cat([torch.ones(300, 2) * torch.tensor([1.0, 0.0]), torch.ones(9700, 2) * torch.tensor([0.0, 1.0])])
                       + 0.01 * torch.randn(10000, 2, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = vote(q, keys, vals, 50.0, top_k=20, balanced=True, max_support_patches=400)
    assert out[0] > 0.9 and out[1] < 0.1  # 200 foreground + 200 background kept, votes still right
    from segicl.matching import _support_sample

    keep = _support_sample(vals, 400, balanced=True)
    assert len(keep) == len(set(keep.tolist())) == 400 and vals[keep].sum() == 200


@pytest.mark.parametrize("hw", [(1000, 700), (141, 333), (256, 256)])
def test_fine_propagation_returns_the_query_size_and_finds_thin_lines(hw):
    h, w = hw
    sup = [_vessels(s, w, h) for s in (1, 2, 3)]  # supports of the transposed shape (the same pixel scale)
    qimg, qmask = _vessels(9, h, w, n=max(4, (h * w) // 40000))
    prob = fine_propagation(qimg, sup, MatchingConfig(), FineConfig())
    assert prob.shape == (h, w) and prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    fine_dice = dice(prob > 0.5, qmask)
    assert fine_dice > 0.6
    if hw == (256, 256):  # the same vote on the 64 px grid cannot hold 2 px lines
        to_t = lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((64, 64)), np.float32)).permute(2, 0, 1) / 127.5 - 1  # noqa: E731
        smask = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(m).resize((64, 64)))).float()[None] for _, m in sup])
        coarse = match_supports(to_t(qimg)[None], torch.stack([to_t(i) for i, _ in sup])[None], smask[None], [3],
                                MatchingConfig(), 64)[0, 0]
        coarse_dice = dice(np.asarray(Image.fromarray(coarse.numpy()).resize((w, h), Image.BILINEAR)) > 0.5, qmask)
        assert fine_dice > coarse_dice + 0.15
        # the supports' labels drive it: inverted support masks give the inverse answer
        inv = fine_propagation(qimg, [(i, ~m) for i, m in sup], MatchingConfig(), FineConfig())
        assert dice(inv > 0.5, qmask) < 0.2


@pytest.mark.parametrize("hw", [(1000, 700), (141, 333)])
def test_forest_returns_the_query_size_and_finds_thin_lines_the_supports_mark(hw):
    h, w = hw
    sup = [_vessels(s, w, h) for s in (1, 2, 3)]
    qimg, qmask = _vessels(9, h, w, n=max(4, (h * w) // 40000))
    fine = FineConfig()
    assert fine.classifier == "forest"
    prob = forest_probability(qimg, sup, fine)
    assert prob.shape == (h, w) and prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    assert dice(prob > 0.5, qmask) > 0.7
    np.testing.assert_array_equal(prob, native_probability(qimg, sup, MatchingConfig(), fine))  # seeded: repeatable
    native._FORESTS.clear()  # fitted again (not the cached forest): the same answer
    np.testing.assert_array_equal(prob, forest_probability(qimg, sup, fine))
    assert len(native._FORESTS) == 1
    # the supports' labels drive it: inverted masks give the inverse answer, a colour copy of the query works too
    inv = forest_probability(qimg, [(i, ~m) for i, m in sup], fine)
    assert dice(inv > 0.5, qmask) < 0.2 and dice(inv < 0.5, qmask) > 0.7
    colour = [(Image.merge("RGB", (i, i, i.point(lambda v: v // 2))), m) for i, m in sup]
    assert dice(forest_probability(Image.merge("RGB", (qimg, qimg, qimg.point(lambda v: v // 2))), colour, fine) > 0.5,
                qmask) > 0.7
    assert dice(forest_probability(qimg, colour[:1] + sup[1:], fine) > 0.5, qmask) > 0.7  # grey and colour mixed
    # supports with a single class anywhere: that class, no fit
    empty = forest_probability(qimg, [(i, np.zeros_like(m)) for i, m in sup], fine)
    assert empty.shape == (h, w) and not empty.any()
    with pytest.raises(ValueError, match="at least one support"):
        forest_probability(qimg, [], fine)
    with pytest.raises(ValueError, match="fine.classifier"):
        FineConfig(classifier="svm").validate()


def test_pipeline_sends_thin_supports_to_the_native_path_and_blobs_to_the_model():
    pipe = SegICLPipeline.from_preset("tiny", matching={"mode": "route"})
    thin = [_vessels(s, 200, 200) for s in (1, 2)]
    blob = [_blob(s, 200, 200) for s in (1, 2)]
    q, _ = _vessels(5, 123, 77)  # odd, portrait
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = pipe([q, q, q], text="x", supports=[thin, blob, []], num_inference_steps=2, generator=gen())
    assert out.paths == ["fine", "blend", "encoder"]
    np.testing.assert_array_equal(out.probabilities[0], forest_probability(q, thin, pipe.config.fine))
    assert all(m.shape == (123, 77) for m in out.masks) and all(p.shape == (123, 77) for p in out.probabilities)
    assert np.allclose(out.uncertainty[0], np.sqrt(out.probabilities[0] * (1 - out.probabilities[0])))
    # blend: half the model's probability (the route alone), half the propagation at blend_size
    prop = fine_propagation(q, blob, pipe.config.matching, FineConfig(max_size=pipe.config.fine.blend_size))
    pipe.set_fine(mode="none")
    assert pipe([q], text="x", supports=[thin], num_inference_steps=2).paths == ["route"]
    route = pipe([q, q], text="x", supports=[blob, []], num_inference_steps=2, generator=gen())  # the same batch
    np.testing.assert_allclose(out.probabilities[1], 0.5 * route.probabilities[0] + 0.5 * prop, atol=1e-5)
    np.testing.assert_allclose(out.probabilities[2], route.probabilities[1], atol=1e-6)
    with pytest.raises(ValueError, match="fine.mode"):
        pipe.set_fine(mode="sometimes")
    with pytest.raises(ValueError, match="fine.max_size"):
        load_preset("tiny", fine={"max_size": 4})


def test_evaluate_overrides_the_native_classifier():
    from eval.cli import parse_args
    from eval.methods import build_method

    method, prov = build_method("segicl", {"segicl": {"native_classifier": "vote", "fine": "always"}}, 0, "preset:tiny")
    assert method.pipe.config.fine.classifier == "vote" and method.pipe.config.fine.mode == "always"
    assert "fine.classifier = vote" in " ".join(prov.values())
    assert parse_args(["--data", "x", "--out", "y", "--native-classifier", "vote"]).native_classifier == "vote"
    with pytest.raises(SystemExit):
        parse_args(["--data", "x", "--out", "y", "--native-classifier", "svm"])
