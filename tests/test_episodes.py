"""training.episodes / augment / cache: deterministic episodes, distinct stems, k in range, label in
every mask, exclusion, weighting, aligned augmentation, cache round trip. Demo data (shipped) and a
small slice of the real datasets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO
from training.augment import AugmentConfig, PairAugment, plain
from training.cache import build_cache, load_cache
from training.episodes import EpisodeDataset, PairDataset, collate, load_split

torch.set_num_threads(1)
DEMO = REPO / "segicl" / "assets" / "demo"


@pytest.fixture(scope="module")
def demo():
    return load_split([DEMO], "train", 32, progress=False)


@pytest.fixture(scope="module")
def wbc(shared_data):
    """WBC: two labels (cytoplasm 128, nucleus 255) per image."""
    return load_split([shared_data], "train", 32, names=["wbc_blood_smear"], progress=False)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_episodes_deterministic_under_seed_epoch_index(demo):
    datasets, cache = demo
    e = EpisodeDataset(cache, datasets, k_max=3, seed=7)
    first = [e[i] for i in (5, 0, 3)]
    again = EpisodeDataset(cache, datasets, k_max=3, seed=7)
    assert all(same(a, again[i]) for a, i in zip(first, (5, 0, 3)))  # order of access does not matter
    assert not same(EpisodeDataset(cache, datasets, k_max=3, seed=8)[5], first[0])
    e.set_epoch(1)
    assert not same(e[5], first[0])
    e.set_epoch(0)
    assert same(e[5], first[0])
    # DataLoader workers give the same batch as the main process
    serial = next(iter(DataLoader(e, batch_size=4, collate_fn=collate)))
    parallel = next(iter(DataLoader(e, batch_size=4, collate_fn=collate, num_workers=2)))
    assert torch.equal(serial["support_images"], parallel["support_images"]) and serial["text"] == parallel["text"]


@pytest.mark.parametrize("which", ["demo", "wbc"])
def test_episode_invariants(which, request):
    datasets, cache = request.getfixturevalue(which)
    k_max = 5
    e = EpisodeDataset(cache, datasets, k_max=k_max, seed=0, length=60)
    ks, labels = [], set()
    for i in range(len(e)):
        it = e[i]
        k = it["num_supports"]
        ks.append(k)
        labels.add((it["dataset"], it["label"]))
        assert 0 <= k <= k_max
        assert len(it["stems"]) == k + 1 and len(set(it["stems"])) == k + 1  # never the same stem twice
        ds = datasets[it["dataset"]]
        for stem in it["stems"]:
            assert stem in ds.stems("train") and it["label"] in ds.labels_present(stem)
        assert it["query_mask"].sum() > 0 and set(it["query_mask"].unique().tolist()) <= {0.0, 1.0}
        assert all(it["support_masks"][j].sum() > 0 for j in range(k))  # label present after augmentation
        assert not it["support_images"][k:].any() and not it["support_masks"][k:].any()  # zero padding
        assert it["query_image"].min() >= -1 and it["query_image"].max() <= 1
        assert it["query_image"].shape == (3, 32, 32) and it["support_images"].shape == (k_max, 3, 32, 32)
    assert min(ks) == 0 and max(ks) == k_max  # the uniform k distribution reaches both ends
    if which == "wbc":
        assert {lab for _, lab in labels} == {128, 255}
    batch = collate([e[0], e[1]])
    assert batch["query_image"].shape == (2, 3, 32, 32) and isinstance(batch["text"], list)
    assert batch["num_supports"].dtype == torch.int64 and isinstance(batch["stems"][0], list)


def test_k_distribution_and_task_weighting(demo, wbc):
    datasets, cache = demo
    e = EpisodeDataset(cache, datasets, k_max=4, k_dist="max", seed=0, length=10)
    assert all(e[i]["num_supports"] == 4 for i in range(10))
    e = EpisodeDataset(cache, datasets, k_max=4, k_dist=[1, 0, 0, 0, 0], seed=0, length=5)
    assert all(e[i]["num_supports"] == 0 for i in range(5))
    with pytest.raises(ValueError, match="weights"):
        EpisodeDataset(cache, datasets, k_max=4, k_dist=[1, 1])
    both = {**demo[0], **wbc[0]}
    from training.cache import PairCache

    merged = PairCache(
        np.concatenate([demo[1].images, wbc[1].images]), np.concatenate([demo[1].label_maps, wbc[1].label_maps]),
        demo[1].datasets + wbc[1].datasets, demo[1].stems + wbc[1].stems,
        np.concatenate([demo[1].dataset_of, wbc[1].dataset_of + len(demo[1].datasets)]), "train", 32, demo[1].stored,
    )
    uni = EpisodeDataset(merged, both, task_weighting="uniform")
    size = EpisodeDataset(merged, both, task_weighting="size")
    assert np.allclose(uni.task_probs, 1 / 5)  # 3 demo tasks + 2 WBC labels
    n = np.array([len(t[2]) for t in size.tasks])
    assert np.allclose(size.task_probs, n / n.sum()) and n.max() > 16
    draws = [uni[i]["dataset"] for i in range(200)]
    assert 0.25 < draws.count("wbc_blood_smear") / 200 < 0.55  # 2 of 5 tasks


def test_exclude_and_unknown_names():
    datasets, cache = load_split([DEMO], "train", 32, exclude=["hc18_fetal_head_us"], progress=False)
    assert set(datasets) == set(cache.datasets) == {"busbra_breast_us", "fuseg_foot_ulcer"}
    e = EpisodeDataset(cache, datasets, seed=0, length=30)
    assert {e[i]["dataset"] for i in range(30)} == {"busbra_breast_us", "fuseg_foot_ulcer"}
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split([DEMO], "train", 32, exclude=["nope"], progress=False)


def l_shape(n: int = 72) -> np.ndarray:
    m = np.zeros((n, n), dtype=bool)
    m[10:60, 8:20] = True  # vertical bar on the left
    m[48:60, 8:50] = True  # foot to the right, at the bottom
    return m


def test_flip_moves_image_and_mask_together():
    m = l_shape()
    img = np.repeat((m * 200 + 20).astype(np.uint8)[..., None], 3, axis=2)
    still = dict(crop_scale=(1, 1), crop_ratio=(1, 1), degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    flip = PairAugment(64, AugmentConfig(hflip=1.0, **still))
    x, y = flip(img, m, seed=0)
    x0, y0 = plain(img, m, 64)
    assert torch.equal(y, y0.flip(-1)) and not torch.equal(y, y0)
    assert torch.allclose(x, x0.flip(-1), atol=1e-5)
    x, y = flip(img, m, seed=0, flips=False)
    assert torch.equal(y, y0)


def test_random_augmentation_keeps_image_and_mask_aligned():
    m = l_shape()
    img = np.repeat((m * 200 + 20).astype(np.uint8)[..., None], 3, axis=2)
    aug = PairAugment(64, AugmentConfig(hflip=0.5, vflip=0.5, degrees=15, brightness=0, contrast=0))
    changed = 0
    for seed in range(20):
        x, y = aug(img, m, seed)
        fg = x[0] > (x[0].max() + x[0].min()) / 2  # the bright L in the image
        inter = (fg & (y[0] > 0)).sum().item()
        union = (fg | (y[0] > 0)).sum().item()
        assert inter / union > 0.85, seed  # image and mask moved together
        changed += not torch.equal(y, plain(img, m, 64)[1])
        assert torch.equal(aug(img, m, seed)[1], y)  # same seed, same result
    assert changed >= 18
    # brightness/contrast change the image only
    jitter = PairAugment(64, AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), degrees=0, translate=0, scale=(1, 1), hflip=0))
    x, y = jitter(img, m, 3)
    assert torch.equal(y, plain(img, m, 64)[1]) and not torch.allclose(x, plain(img, m, 64)[0])


def test_pair_dataset(demo):
    datasets, cache = demo
    p = PairDataset(cache, datasets, seed=0)
    # 16 train images x 3 single-label datasets; masks empty at 32 px (a tiny ulcer) are left out
    assert len(p) == sum(len(cache.rows_with(n, 255)) for n in cache.datasets) >= 45
    assert len(PairDataset(cache, datasets, include_empty=True)) == 48
    it = p[0]
    assert it["image"].shape == (3, 32, 32) and it["mask"].shape == (1, 32, 32) and it["mask"].sum() > 0
    assert same(it, PairDataset(cache, datasets, seed=0)[0]) and not same(it, PairDataset(cache, datasets, seed=1)[0])
    flat = PairDataset(cache, datasets, augment=False)
    ds = datasets[flat[0]["dataset"]]
    ref = plain(cache.images[0], cache.label_maps[0] == 255, 32)[1]
    assert torch.equal(flat[0]["mask"], ref) and flat[0]["stem"] == ds.stems("train")[0]


def test_cache_round_trip_and_key(tmp_path):
    src = tmp_path / "data"
    shutil.copytree(DEMO / "hc18_fetal_head_us", src / "hc18_fetal_head_us")
    datasets, cache = load_split([src], "train", 32, cache_dir=tmp_path / "cache", progress=False)
    assert cache.path is not None and cache.path.is_file() and cache.stored == 36
    files = list((tmp_path / "cache").iterdir())
    assert files == [cache.path]  # no temp file left
    again = load_cache(cache.path)
    assert np.array_equal(again.images, cache.images) and np.array_equal(again.label_maps, cache.label_maps)
    assert again.stems == cache.stems and again.datasets == ["hc18_fetal_head_us"]
    mtime = cache.path.stat().st_mtime_ns
    _, reloaded = load_split([src], "train", 32, cache_dir=tmp_path / "cache", progress=False)
    assert reloaded.path == cache.path and cache.path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # images match the data layer's own resize
    ds = datasets["hc18_fetal_head_us"]
    stem = cache.stems[3]
    sample = ds.sample(stem, 255)
    ref = np.asarray(sample.image.convert("RGB").resize((36, 36), 3))
    assert np.array_equal(cache.images[3], ref)
    # a changed file gives a new key; other sizes and splits are other files
    meta = json.loads((src / "hc18_fetal_head_us" / "dataset.json").read_text())
    meta["splits"]["train"] = meta["splits"]["train"][:5]
    (src / "hc18_fetal_head_us" / "dataset.json").write_text(json.dumps(meta))
    _, small = load_split([src], "train", 32, cache_dir=tmp_path / "cache", progress=False)
    assert small.path != cache.path and len(small) == 5
    built = build_cache(list(datasets.values()), "test", 16, tmp_path / "cache", progress=False)
    assert built.stored == 18 and len(list((tmp_path / "cache").iterdir())) == 3


def test_alternative_prompts_and_val_supports(shared_data, tmp_path):
    """A slice of Kvasir (it ships prompts.json): alternatives appear; val queries take train supports."""
    src = shared_data / "kvasir_seg"
    meta = json.loads((src / "dataset.json").read_text())
    dst = tmp_path / "kvasir_seg"
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    keep = {"train": meta["splits"]["train"][:6], "val": meta["splits"]["val"][:3]}
    for stem in keep["train"] + keep["val"]:
        shutil.copy(src / "images" / f"{stem}{meta['image_ext']}", dst / "images")
        shutil.copy(src / "masks" / f"{stem}.png", dst / "masks")
    meta["splits"], meta["groups"] = keep, {}
    (dst / "dataset.json").write_text(json.dumps(meta))
    prompts = json.loads((src / "prompts.json").read_text())
    (dst / "prompts.json").write_text(json.dumps({s: prompts[s] for s in keep["train"] + keep["val"] if s in prompts}))
    datasets, train = load_split([dst], "train", 32, progress=False)
    _, val = load_split([dst], "val", 32, progress=False)
    e = EpisodeDataset(train, datasets, k_max=2, seed=0, length=40, alt_prompt_prob=0.5)
    texts = [e[i]["text"] for i in range(40)]
    default = datasets["kvasir_seg"].instruction(255)
    assert default in texts and len(set(texts)) > 3
    v = EpisodeDataset(val, datasets, k_max=2, fixed_k=2, seed=0, augment=False, support_cache=train, length=6)
    for i in range(6):
        it = v[i]
        assert it["stems"][0] in keep["val"] and set(it["stems"][1:]) <= set(keep["train"]) and it["num_supports"] == 2


def test_label_flip_and_text_drop_tasks(demo):
    """invert_prob: query and support masks inverted together, no text, only with supports;
    text_drop_prob: empty instructions. Zero probabilities leave every other draw unchanged."""
    datasets, cache = demo
    plain_e = EpisodeDataset(cache, datasets, k_max=3, seed=5, length=80)
    inv = EpisodeDataset(cache, datasets, k_max=3, seed=5, length=80, invert_prob=0.5)
    drop = EpisodeDataset(cache, datasets, k_max=3, seed=5, length=80, text_drop_prob=1.0)
    n_inv = 0
    for i in range(80):
        a, b = plain_e[i], inv[i]
        assert a["stems"] == b["stems"] and torch.equal(a["query_image"], b["query_image"])
        if b["inverted"]:
            n_inv += 1
            k = b["num_supports"]
            assert k >= 1 and b["text"] == ""
            assert torch.equal(b["query_mask"], 1 - a["query_mask"])
            assert torch.equal(b["support_masks"][:k], 1 - a["support_masks"][:k])
            assert torch.equal(b["support_masks"][k:], a["support_masks"][k:])  # padding stays zero
        else:
            assert same({x: a[x] for x in a if x != "inverted"}, {x: b[x] for x in a if x != "inverted"})
        assert drop[i]["text"] == "" and torch.equal(drop[i]["query_mask"], a["query_mask"])
        assert not a["inverted"] and a["text"]
    assert 20 < n_inv < 60
    with pytest.raises(ValueError, match="invert_prob"):
        EpisodeDataset(cache, datasets, k_max=3, invert_prob=1.5)
