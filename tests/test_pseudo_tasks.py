"""Pseudo-task generator (issue 16): superpixel and synthetic in-context episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segicl import PACKAGE_DIR
from training.episodes import EpisodeDataset, load_split
from training.pseudo_tasks import (
    MixedEpisodes,
    PseudoTaskEpisodes,
    superpixel_mask,
    synthetic_pair,
    synthetic_task,
)

DEMO = PACKAGE_DIR / "assets" / "demo"


@pytest.fixture(scope="module")
def demo_cache():
    return load_split([DEMO], "train", 64, progress=False)


def test_superpixel_mask_is_one_segment_of_the_image(demo_cache):
    _, cache = demo_cache
    rng = np.random.default_rng(0)
    masks = [superpixel_mask(cache.images[i % len(cache)], rng) for i in range(6)]
    got = [m for m in masks if m is not None]
    assert got, "no superpixel found in six demo images"
    for m in got:
        assert m.shape == cache.images[0].shape[:2] and 0.02 <= m.mean() <= 0.5


def test_synthetic_task_images_share_a_task_but_not_pixels():
    rng = np.random.default_rng(1)
    task = synthetic_task(rng, 64)
    (a, ma), (b, mb) = synthetic_pair(task, rng, 64), synthetic_pair(task, rng, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and ma.any() and mb.any()
    assert not np.array_equal(ma, mb) and not np.array_equal(a, b)
    # the label is the foreground texture: inside the masks the colours agree more than across classes
    fg = np.concatenate([a[ma], b[mb]]).mean(0)
    bg = np.concatenate([a[~ma], b[~mb]]).mean(0)
    assert np.abs(a[ma].mean(0) - b[mb].mean(0)).sum() < np.abs(fg - bg).sum() + 60


def test_pseudo_episodes_are_seeded_well_formed_and_all_new(demo_cache):
    _, cache = demo_cache
    ds = PseudoTaskEpisodes(cache, k_max=3, length=12, seed=5)
    items = [ds[i] for i in range(12)]
    again = PseudoTaskEpisodes(cache, k_max=3, length=12, seed=5)[3]
    assert torch.equal(items[3]["query_image"], again["query_image"])
    kinds = {it["dataset"] for it in items}
    assert kinds <= {"pseudo:superpixel", "pseudo:synthetic"} and len(kinds) == 2
    for it in items:
        k = it["num_supports"]
        assert it["query_image"].shape == (3, 64, 64) and it["support_images"].shape == (3, 3, 64, 64)
        assert it["query_image"].min() >= -1 and it["query_image"].max() <= 1
        assert 0 < it["query_mask"].mean() < 1 and set(it["query_mask"].unique().tolist()) <= {0.0, 1.0}
        assert all(it["support_masks"][j].sum() > 0 for j in range(k)) and it["support_masks"][k:].sum() == 0
    assert len({it["query_image"].sum().item() for it in items}) == 12  # every episode a new task
    assert PseudoTaskEpisodes(cache, k_max=3, length=8, seed=0, min_k=2)[0]["num_supports"] >= 2
    with pytest.raises(ValueError):
        PseudoTaskEpisodes(cache, kinds={"noise": 1.0})


def test_mixed_episodes_mix_and_count_tasks(demo_cache):
    datasets, cache = demo_cache
    real = EpisodeDataset(cache, datasets, k_max=3, seed=0)
    mixed = MixedEpisodes(real, PseudoTaskEpisodes(cache, k_max=3, length=len(real), seed=0), 0.5)
    names = [mixed[i]["dataset"] for i in range(len(mixed))]
    share = np.mean([n.startswith("pseudo:") for n in names])
    assert 0.2 < share < 0.8
    assert mixed.distinct_tasks(100) == len(real.tasks) + 50
    batch = mixed.collate_fn([mixed[i] for i in range(4)])
    assert batch["query_image"].shape == (4, 3, 64, 64)
