"""Interactive segmentation: interactions as inputs, the growing context, the robot user, the benchmark."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import segicl.interactive as inter
from eval.robot_user import add_correction, jittered_box, next_click, next_scribble
from segicl.interactive import Interactions, InteractiveConfig, InteractiveSegmenter, random_walk


def _scene(centre=(40, 40), radius=14, size=(96, 112), seed=0):
    """A noisy grey image with a bright disc and its mask (not square, on purpose)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    img = 60 + 120 * mask + rng.normal(0, 8, size)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB"), mask


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_interactions_round_trip_and_validation():
    ints = Interactions([(3, 4)], [(5, 6)], [(9, 1, 2, 8)], [[(1, 1), (2, 2)]], [])
    back = Interactions.from_dict(ints.to_dict())
    assert back.pos_points == [(3, 4)] and back.boxes == [(2, 1, 9, 8)]  # corners ordered
    assert back.count == 4 and not back.empty and Interactions().empty
    with pytest.raises(ValueError, match="unknown interaction fields"):
        Interactions.from_dict({"clicks": []})
    with pytest.raises(ValueError, match="a point is"):
        Interactions.from_dict({"pos_points": [[1, 2, 3]]})


def test_seeds_follow_the_image_scale_and_the_box_marks_outside():
    ints = Interactions(pos_points=[(50, 100)], neg_points=[(10, 10)])
    seeds = ints.seeds((50, 100), (0.5, 0.5), radius=0, box_margin=0.0)  # image 100 x 200 -> grid 50 x 100
    assert seeds[25, 50] == 1 and seeds[5, 5] == 2 and (seeds > 0).sum() == 2
    boxed = Interactions(boxes=[(20, 20, 39, 59)]).seeds((50, 100), (1.0, 1.0), radius=0, box_margin=0.0)
    assert (boxed[:20] == 2).all() and (boxed[20:40, 20:60] == 0).all() and (boxed[:, 60:] == 2).all()


def test_random_walk_stops_at_edges_and_keeps_the_prior_far_from_seeds():
    feats = np.zeros((20, 40, 1))
    feats[:, 20:] = 1.0  # an edge between the left and the right half
    seeds = np.zeros((20, 40), np.int8)
    seeds[10, 5], seeds[10, 35] = 1, 2
    p = random_walk(feats, seeds, None, 0.0, beta=4.0)
    assert p[:, :18].min() > 0.9 and p[:, 22:].max() < 0.1
    prior = np.full((20, 40), 0.9, np.float32)
    p = random_walk(feats, np.zeros_like(seeds), prior, 0.01, beta=4.0)
    assert np.allclose(p, 0.9, atol=1e-3)  # no seeds: the prior is the answer
    with pytest.raises(ValueError, match="both labels"):
        random_walk(feats, np.where(seeds == 2, 0, seeds).astype(np.int8), None, 0.0, 4.0)


def test_a_click_segments_the_structure_under_it():
    img, mask = _scene()
    seg = InteractiveSegmenter(InteractiveConfig(max_size=64), embed=lambda ims: np.ones((len(ims), 1)))
    empty = seg.predict(img, Interactions(), key="q")
    assert not empty.mask.any() and empty.prob.shape == mask.shape  # nothing known yet
    out = seg.predict(img, Interactions(pos_points=[(40, 40)]), key="q")
    assert out.mask[40, 40] and _dice(out.mask, mask) > 0.85
    moved = seg.predict(img, Interactions(pos_points=[(80, 95)]), key="q")  # a click on the background
    assert moved.mask[80, 95] and not moved.mask[40, 40]
    boxed = seg.predict(img, Interactions(boxes=[(24, 24, 56, 56)]), key="q")  # a box alone
    assert _dice(boxed.mask, mask) > 0.85 and not boxed.mask[:, 70:].any()


def test_context_grows_is_searched_once_per_version_and_segments_a_new_image(monkeypatch):
    calls = []
    real = inter._top_k_search

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(inter, "_top_k_search", counting)
    seg = InteractiveSegmenter(InteractiveConfig(max_size=64, max_context=2), embed=lambda ims: np.ones((len(ims), 1)))
    for i, c in enumerate([(30, 30), (60, 70), (45, 80)]):
        seg.add_context(*_scene(centre=c, seed=i), key=f"ctx{i}")
    assert seg.context_keys == ["ctx0", "ctx1", "ctx2"] and seg.version == 3
    query, mask = _scene(centre=(50, 50), seed=7)
    out = seg.predict(query, Interactions(), key="q")
    assert len(out.context_used) == 2 and _dice(out.mask, mask) > 0.7
    seg.predict(query, Interactions(neg_points=[(5, 5)]), key="q")
    seg.predict(query, Interactions(neg_points=[(5, 5), (90, 5)]), key="q")
    assert len(calls) == 1  # interactions reuse the cached context search
    seg.add_context(query, mask, key="q2")
    seg.predict(query, Interactions(), key="q")
    assert len(calls) == 2  # a new context version searches again
    with pytest.raises(ValueError, match="does not match"):
        seg.add_context(query, mask[:10], key="bad")


def test_robot_clicks_the_centre_of_the_largest_error_and_scribbles_inside_it():
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    pred = np.zeros_like(gt)
    pred[30:34, 30:34] = True  # a small false positive; the large false negative comes first
    positive, (y, x) = next_click(pred, gt)
    assert positive and 13 <= y <= 16 and 13 <= x <= 16
    assert next_click(gt, gt) is None
    positive, lines = next_scribble(pred, gt)
    assert positive and lines and all(gt[p] for ln in lines for p in ln)
    ints = Interactions()
    assert add_correction(ints, gt | pred, gt) and not ints.pos_points
    (y, x), = ints.neg_points  # the only error left is the false positive
    assert 30 <= y <= 33 and 30 <= x <= 33
    box = jittered_box(gt, np.random.default_rng(0), 0.1)
    assert abs(box[0] - 5) <= 2 and abs(box[3] - 24) <= 2


def test_benchmark_interactive_writes_its_table(shared_data, tmp_path):
    cmd = [sys.executable, "-m", "segicl", "benchmark", "interactive", "--data", str(shared_data / "hc18_fetal_head_us"),
           "--limit", "3", "--max-interactions", "3", "--settings", "both,interactive,context", "--set", "max_size=64",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(open(tmp_path / "interactive.csv")))
    assert {r["setting"] for r in rows} == {"both", "interactive", "context"} and len(rows) == 9
    for col in ("dataset", "setting", "position", "image", "interactions", "dice_final", "dice_after_1",
                "dice_after_3", "dice_after_5", "seconds"):
        assert col in rows[0]
    inter_rows = [r for r in rows if r["setting"] == "interactive"]
    assert all(float(r["dice_initial"]) == 0.0 for r in inter_rows)  # no context: nothing to start from
    assert all(int(r["interactions"]) >= 1 for r in inter_rows)
    assert all(int(r["interactions"]) == 0 for r in rows if r["setting"] == "context")
    assert [int(r["context"]) for r in rows if r["setting"] == "context"] == [0, 1, 2]
    assert (tmp_path / "interactive.png").stat().st_size > 0 and "| hc18_fetal_head_us |" in (tmp_path / "interactive.md").read_text()


def test_a_pipeline_can_give_the_context_prior():
    """With ``pipeline``, the proposal is the model's probability given the nearest context images."""
    calls = []

    class FakePipeline:  # stands in for SegICLPipeline: answers the left half, records its supports
        def __call__(self, images, text, supports, generator):
            calls.append((text, len(supports[0])))
            prob = np.zeros((images[0].height, images[0].width), np.float32)
            prob[:, : images[0].width // 2] = 1.0
            return type("Out", (), {"probabilities": [prob]})()

    seg = InteractiveSegmenter(InteractiveConfig(max_size=64), embed=lambda ims: np.ones((len(ims), 1)),
                               pipeline=FakePipeline(), text="Segment the disc.", model_k=2)
    query, _ = _scene(seed=3)
    assert not seg.predict(query, Interactions(), key="q").mask.any() and not calls  # no context: no model call
    for i in range(3):
        seg.add_context(*_scene(seed=i), key=f"c{i}")
    out = seg.predict(query, Interactions(), key="q")
    assert calls == [("Segment the disc.", 2)]
    assert out.mask[:, :50].mean() > 0.9 and not out.mask[:, 62:].any()
    seg.predict(query, Interactions(neg_points=[(5, 5)]), key="q")
    assert len(calls) == 1  # a click does not call the model again
