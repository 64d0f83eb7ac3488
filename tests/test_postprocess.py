"""segicl.postprocess: the supports' masks decide the post-processing; the pipeline applies it."""

from __future__ import annotations

import numpy as np
import pytest

from segicl.config import load_preset
from segicl.pipeline import SegICLPipeline
from segicl.postprocess import Decision, apply, decide, largest_component


def _disc(h=64, w=64, cy=32, cx=32, r=12):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def test_one_piece_supports_without_holes_allow_both():
    assert decide([_disc(), _disc(cy=20, r=8)]) == Decision(main_components=True, fill_holes=True)
    assert decide([_disc(), _disc() | _disc(cy=55, cx=55, r=2)], min_largest=0.95).main_components  # a speck is fine
    assert decide([np.zeros((8, 8), bool)]) == Decision()  # nothing to learn from: nothing changes
    assert decide([]) == Decision()


def test_several_pieces_or_rings_keep_the_raw_prediction():
    two = _disc(cx=16, r=8) | _disc(cx=48, r=8)  # two polyps in one support
    assert not decide([_disc(), two]).main_components
    ring = _disc(r=14) & ~_disc(r=8)  # a myocardium
    assert decide([ring, ring]) == Decision(drop_fragments=True)
    arcs = ring.copy()
    arcs[30:35, :] = False  # the predicted ring in two large arcs, plus a speck
    arcs[60:62, 0:2] = True
    out = apply(arcs, decide([ring]))
    np.testing.assert_array_equal(out, ring & ~np.isin(np.arange(64)[:, None], range(30, 35)))  # arcs kept, speck gone


def test_apply_drops_stray_blobs_and_fills_holes():
    pred = _disc() & ~_disc(r=3)  # the structure with a hole
    pred[2:5, 2:5] = True  # a stray blob in a corner
    out = apply(pred, Decision(main_components=True, fill_holes=True))
    np.testing.assert_array_equal(out, _disc())
    np.testing.assert_array_equal(apply(pred, Decision()), pred)
    assert apply(pred, Decision()) is not pred  # a new array, the input untouched
    np.testing.assert_array_equal(largest_component(np.zeros((4, 4), bool)), np.zeros((4, 4), bool))


def test_solid_structures_keep_blobs_of_similar_size():
    """solid_min_fragment < 1: blobs of similar size are kept, a much smaller one goes."""
    big, rival, small = _disc(cx=18, r=10), _disc(cx=46, r=9), _disc(cy=56, cx=56, r=4)
    pred = big | rival | small
    solid = Decision(main_components=True, fill_holes=True)
    np.testing.assert_array_equal(apply(pred, solid, solid_min_fragment=0.5), big | rival)  # rival 0.8 of it, small 0.16
    np.testing.assert_array_equal(apply(pred, solid), big)  # the default: the largest alone
    np.testing.assert_array_equal(apply(pred, solid, solid_min_fragment=0.1), pred)


def test_pipeline_applies_the_supports_decision_to_the_mask_only():
    pipe = SegICLPipeline.from_preset("tiny", matching={"mode": "route"})
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 255).astype(np.uint8)
    sup = [(img, _disc()), (img, _disc(cy=24))]
    out = pipe([img, img], text="x", supports=[sup, []], num_inference_steps=2)
    assert out.postprocess == [{"main_components": True, "fill_holes": True, "drop_fragments": False},
                               {"main_components": False, "fill_holes": False, "drop_fragments": False}]
    raw = out.probabilities[0] > pipe.config.threshold
    np.testing.assert_array_equal(out.masks[0], apply(raw, Decision(True, True), pipe.config.postprocess.min_fragment,
                                                          pipe.config.postprocess.solid_min_fragment))
    np.testing.assert_array_equal(out.masks[1], out.probabilities[1] > pipe.config.threshold)
    pipe.set_postprocess(mode="none")
    out = pipe([img], text="x", supports=[sup], num_inference_steps=2)
    assert out.postprocess == [{"main_components": False, "fill_holes": False, "drop_fragments": False}]
    with pytest.raises(ValueError, match="postprocess.mode"):
        load_preset("tiny", postprocess={"mode": "always"})
