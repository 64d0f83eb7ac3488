"""The learned interactive network (issue 22, item 1): input encoding, save/load, the simulated user
of its training, learning from clicks, and its place in InteractiveSegmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from segicl.click_net import ClickNet, ClickNetConfig, encode, rasterise
from segicl.interactive import Interactions, InteractiveConfig, InteractiveSegmenter
from training.click_task import ClickItems, ClickTask, first_interactions, robot_dice, simulated_prior

SMALL = ClickNetConfig(size=32, channels=(8, 16, 16), strides=(2, 2), num_res_units=0, click_radius=1)


def _disc(size=32, cy=14, cx=18, r=7):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_rasterise_marks_clicks_scribbles_and_boxes_where_they_are():
    ints = Interactions(pos_points=[(10, 20)], neg_points=[(60, 4)], boxes=[(40, 40, 59, 79)],
                        pos_scribbles=[[(0, 0), (0, 30)]])
    maps = rasterise(ints, (32, 40), (0.5, 0.5), 0)  # an 64 x 80 image on a 32 x 40 grid
    assert maps.shape == (3, 32, 40)
    assert maps[0, 5, 10] == 1 and maps[0, 0, 0:15].all() and maps[1, 30, 2] == 1
    assert maps[2, 20:29, 20:39].all() and maps[2, :19].sum() == 0 and maps[2].sum() == 10 * 20
    assert maps[1].sum() == 1


def test_encode_flags_the_prior_per_item():
    img = torch.zeros(2, 3, 8, 8)
    marks = torch.zeros(2, 3, 8, 8)
    prior = torch.stack([torch.full((1, 8, 8), 0.75), torch.full((1, 8, 8), float("nan"))])
    x = encode(img, marks, prior)
    assert x.shape == (2, 8, 8, 8)
    assert torch.allclose(x[0, 6], torch.full((8, 8), 0.5)) and x[0, 7].eq(1).all()
    assert x[1, 6].eq(0).all() and x[1, 7].eq(0).all() and not torch.isnan(x).any()
    assert encode(img, marks, None)[:, 7].eq(0).all()


def test_save_load_round_trip_and_a_tampered_file_is_refused(tmp_path):
    torch.manual_seed(0)
    net = ClickNet(SMALL).eval()
    net.save_pretrained(tmp_path / "click")
    back = ClickNet.from_pretrained(tmp_path / "click")
    x = torch.randn(1, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), back(x))
    (tmp_path / "click" / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="checksum"):
        ClickNet.from_pretrained(tmp_path / "click")


def test_simulated_prior_follows_the_mask_and_first_clicks_land_inside():
    mask = _disc(64, 30, 34, 14)
    inside, outside = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p = simulated_prior(mask, rng)
        assert p.shape == mask.shape and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
        inside.append(p[mask].mean())
        outside.append(p[~mask].mean())
        ints, kind = first_interactions(mask, np.random.default_rng(seed))
        assert not ints.empty and kind in ("clicks", "scribbles")
        for y, x in ints.pos_points + [pt for s in ints.pos_scribbles for pt in s]:
            assert mask[y, x]
        for y, x in ints.neg_points:
            assert not mask[y, x]
        for y0, x0, y1, x1 in ints.boxes:
            ys, xs = np.nonzero(mask)
            assert y0 <= ys.mean() <= y1 and x0 <= xs.mean() <= x1
    assert np.mean(inside) > np.mean(outside) + 0.2


class _Discs(Dataset):
    """Discs of random place and size, brighter than a noisy background."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        m = _disc(32, *rng.integers(8, 24, 2), int(rng.integers(4, 9)))
        x = rng.normal(0, 0.2, (3, 32, 32)) + np.where(m, 0.6, -0.4) * rng.choice([-1, 1])
        return {"image": torch.tensor(x, dtype=torch.float32).clamp(-1, 1), "mask": torch.from_numpy(m)[None].float(),
                "dataset": "discs"}


def test_training_with_the_robot_user_learns_to_segment_from_one_click():
    torch.manual_seed(0)
    net = ClickNet(SMALL)
    items = ClickItems(_Discs(), prior_prob=0.5, seed=0, length=64)
    task = ClickTask(net, {}, max_rounds=1, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    test = [_Discs()[1000 + i] for i in range(8)]
    before = np.mean([robot_dice(net.eval(), t["image"], t["mask"], 1)[0] for t in test])
    net.train()
    for step in range(60):
        batch = ClickItems.collate_fn([items[(step * 8 + j) % 64] for j in range(8)])
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [robot_dice(net.eval(), t["image"], t["mask"], 3) for t in test]
    assert np.mean([a[0] for a in after]) > max(0.6, before + 0.2)
    assert np.mean([a[2] for a in after]) >= np.mean([a[0] for a in after]) - 0.05


def test_segmenter_uses_the_network_for_interactions_only(tmp_path):
    torch.manual_seed(0)
    net = ClickNet(SMALL).eval()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    ctx_img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    cfg = InteractiveConfig(max_size=64)
    plain, learned = InteractiveSegmenter(cfg, embed=_embed), InteractiveSegmenter(cfg, embed=_embed, click_net=net)
    for seg in (plain, learned):
        seg.add_context(ctx_img, np.pad(_disc(48, 20, 30, 10), ((0, 0), (0, 16))), "c")
    a, b = plain.predict(img, Interactions(), "q"), learned.predict(img, Interactions(), "q")
    assert np.array_equal(a.prob, b.prob)  # no interactions: the context prior alone, network unused
    ints = Interactions(pos_points=[(24, 32)])
    out = learned.predict(img, ints, "q")
    h, w = net.working_shape(48, 64)
    expect = net.predict(img, ints, None)
    assert out.prob.shape == (48, 64) and expect.shape == (h, w)
    assert not np.allclose(out.prob, plain.predict(img, ints, "q").prob)


def _embed(images):
    return np.ones((len(images), 4), np.float32) / 2


def test_train_click_cli_on_real_data(tmp_path, shared_data):
    from segicl.cli import main

    out = tmp_path / "click"
    rc = main(["train", "click", "--config", "configs/train/tiny_click.yaml", "--data", str(shared_data / "hc18_fetal_head_us"),
               "--out", str(out), "--set", "train.steps=2", "--set", "train.val_every=2", "--set", "data.val_per_task=1",
               "--set", "model.size=32", "--set", "model.channels=[8,8,8]", "--set", "model.strides=[2,2]",
               "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.progress=false"])
    assert rc == 0
    net = ClickNet.from_pretrained(out / "model")
    prob = net.predict(Image.new("RGB", (50, 40)), Interactions(pos_points=[(20, 25)]))
    assert prob.shape == net.working_shape(40, 50) and np.isfinite(prob).all()


def test_benchmark_runs_the_click_settings_with_the_held_out_folds_network(shared_data, tmp_path):
    import csv
    import subprocess
    import sys

    torch.manual_seed(0)
    ClickNet(SMALL).save_pretrained(tmp_path / "nets" / "B" / "model")  # HC18 is held out in fold B
    cmd = [sys.executable, "-m", "segicl", "benchmark", "interactive", "--data", str(shared_data / "hc18_fetal_head_us"),
           "--limit", "2", "--max-interactions", "2", "--settings", "interactive:click,both:click", "--set", "max_size=64",
           "--click-models", str(tmp_path / "nets"), "--out", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(open(tmp_path / "out" / "interactive.csv")))
    assert [r["setting"] for r in rows] == ["interactive:click"] * 2 + ["both:click"] * 2
    assert [int(r["context"]) for r in rows] == [0, 0, 0, 1]  # only 'both' grows a context
    assert all(int(r["interactions"]) >= 1 for r in rows if r["setting"] == "interactive:click")
    md = (tmp_path / "out" / "interactive.md").read_text()
    assert "| B | hc18_fetal_head_us |" in md


def test_half_precision_copy_loads_as_float32_and_predicts_alike(tmp_path):
    torch.manual_seed(0)
    net = ClickNet(SMALL).eval()
    net.save_pretrained(tmp_path / "half", half=True)
    back = ClickNet.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in back.parameters())
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    ints = Interactions(pos_points=[(20, 25)])
    assert np.abs(net.predict(img, ints) - back.predict(img, ints)).max() < 0.02


def test_the_shipped_network_answers_a_click():
    from segicl.click_net import shipped_click_checkpoint

    path = shipped_click_checkpoint(required=False)
    if path is None:
        pytest.skip("no interactive network ships in this checkout")
    net = ClickNet.from_pretrained(path)
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 48) ** 2 + (xx - 60) ** 2 <= 20**2
    img = Image.fromarray(np.where(disc[..., None], 200, 40).astype(np.uint8).repeat(3, 2))
    prob = net.predict(img, Interactions(pos_points=[(48, 60)]))
    h, w = net.working_shape(96, 128)
    up = np.asarray(Image.fromarray((prob * 255).astype(np.uint8)).resize((128, 96))) > 127
    inter = (up & disc).sum()
    assert prob.shape == (h, w) and 2 * inter / (up.sum() + disc.sum()) > 0.8  # a bright disc on a dark ground
