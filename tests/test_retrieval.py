"""retrieval/: the FAISS support store, its embedders, persistence, leakage guards and CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

faiss = pytest.importorskip("faiss")

from retrieval import index as ix  # noqa: E402
from retrieval.embedders import DEFAULT_EMBEDDER, EmbedderError, PixelEmbedder, get_embedder  # noqa: E402
from retrieval.store import EmbedderMismatchError, StoreError, SupportStore  # noqa: E402
from segicl.data import find_datasets, load_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "segicl" / "assets" / "demo"


@pytest.fixture(scope="module")
def demo_dirs() -> list[Path]:
    return find_datasets(DEMO)


@pytest.fixture(scope="module")
def demo_store(demo_dirs) -> SupportStore:
    return SupportStore.build(demo_dirs, progress=False)


def _write_toy(root: Path) -> Path:
    """A small multi-label dataset with groups of 2 stems and a pair of identical images.

    Stems t00..t11: random textures; groups g0..g5 hold (t00, t01), (t02, t03), ...; masks carry
    label 1 everywhere, label 2 only on even stems. dupA / dupB: the same image (group gA / gB).
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems, groups = [], {}
    for i in range(12):
        stem = f"t{i:02d}"
        img = rng.integers(0, 255, (40, 48, 3))
        Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[5:15, 5:20] = 1
        if i % 2 == 0:
            mask[20:30, 25:40] = 2
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        stems.append(stem)
        groups[stem] = f"g{i // 2}"
    dup = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    for stem, g in (("dupA", "gA"), ("dupB", "gB")):
        Image.fromarray(dup).save(root / "images" / f"{stem}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[2:10, 2:10] = 1
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        stems.append(stem)
        groups[stem] = g
    meta = {"name": "toy", "modality": "toy photo", "image_ext": ".png", "image_mode": "RGB",
            "labels": {"1": "ring", "2": "spot"}, "splits": {"train": stems, "test": []}, "groups": groups}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return _write_toy(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def toy_store(toy) -> SupportStore:
    return SupportStore.build([toy], progress=False)


# ------------------------------------------------------------------------------------------ embedders
def test_pixel_embedder_is_normalised_deterministic_and_separates_modalities(demo_dirs):
    emb = get_embedder("pixel")
    assert DEFAULT_EMBEDDER == "pixel" and emb.dim == 336 and emb.id == "pixel-v1-s16"
    ds = [load_dataset(d) for d in demo_dirs]
    imgs = [d.sample(d.stems("train")[i], next(iter(d.labels))).image for d in ds for i in range(2)]
    a, b = emb.embed(imgs), emb.embed(imgs)
    assert a.dtype == np.float32 and a.shape == (6, 336)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    assert get_embedder("pixel:8").dim == 64 + 32 + 48 and get_embedder("pixel:8").id != emb.id
    with pytest.raises(EmbedderError, match="unknown embedder"):
        get_embedder("nonsense")
    with pytest.raises(EmbedderError, match="not found"):
        get_embedder("openclip:/nonexistent/dir")


def test_hog_embedder_matches_shape_and_texture_not_brightness():
    """The classic descriptor: a disc under another brightness and contrast stays nearest to a disc, a
    stripe pattern to stripes; same input, same vector."""
    emb = get_embedder("hog")
    assert emb.id == "hog-v1-s128" and emb.dim == 7 * 7 * 4 * 9 + 10 + 32 + 48
    yy, xx = np.mgrid[:96, :96]
    disc = ((yy - 48) ** 2 + (xx - 48) ** 2 < 30**2).astype(np.float32)
    stripes = ((xx // 6) % 2).astype(np.float32)

    def img(a, lo, hi):
        return Image.fromarray((lo + (hi - lo) * a).astype(np.uint8)).convert("RGB")

    gallery = emb.embed([img(disc, 20, 200), img(stripes, 20, 200)])
    queries = emb.embed([img(disc, 90, 160), img(stripes, 90, 160), img(disc, 90, 160)])
    assert queries.shape == (3, emb.dim) and queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(queries[0], queries[2])  # deterministic
    assert list((queries[:2] @ gallery.T).argmax(1)) == [0, 1]
    assert get_embedder("hog:64").dim == 3 * 3 * 4 * 9 + 10 + 32 + 48
    with pytest.raises(EmbedderError, match="multiple of 16"):
        get_embedder("hog:100")


def test_concatenated_embedder_averages_the_parts_cosines(demo_dirs, tmp_path):
    emb = get_embedder("pixel+hog")
    assert emb.id == "pixel-v1-s16+hog-v1-s128" and emb.dim == 336 + get_embedder("hog").dim
    ds = load_dataset(demo_dirs[0])
    imgs = [ds.sample(s, next(iter(ds.labels))).image for s in ds.stems("train")[:3]]
    both, pix, hog = emb.embed(imgs), get_embedder("pixel").embed(imgs), get_embedder("hog").embed(imgs)
    np.testing.assert_allclose(both @ both.T, (pix @ pix.T + hog @ hog.T) / 2, atol=1e-5)
    store = SupportStore.build([demo_dirs[0]], embedder="pixel+hog", progress=False)
    store.save(tmp_path / "s")
    again = SupportStore.load(tmp_path / "s")  # the spec round-trips and resolves to the same embedder id
    stems = ds.stems("train")
    gallery = emb.embed([ds.sample(s, next(iter(ds.labels))).image for s in stems])
    sims = gallery[1:] @ both[0]  # the query itself is never its own support
    hit = again.search(imgs[0], k=1)[0]
    assert again.embedder.id == emb.id and hit.stem == stems[1 + int(np.argmax(sims))]
    assert hit.score == pytest.approx(float(sims.max()), abs=1e-4)
    with pytest.raises(EmbedderError, match="unknown embedder"):
        get_embedder("pixel+nonsense")


def _tiny_openclip_dir(root: Path) -> Path:
    import torch
    from open_clip.model import CLIP

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = CLIP(**cfg)
    root.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return root


def test_openclip_embedder_from_local_dir(tmp_path, demo_dirs):
    import torch

    torch.set_num_threads(1)
    d = _tiny_openclip_dir(tmp_path / "clip")
    emb = get_embedder(f"openclip:{d}")
    assert emb.dim == 32 and emb.id.startswith("openclip-")
    ds = load_dataset(demo_dirs[0])
    imgs = [ds.sample(s, 255).image for s in ds.stems("train")[:3]]
    v = emb.embed(imgs)
    assert v.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert get_embedder(f"openclip:{d}").id == emb.id  # id = hash of the vision weights, stable
    store = SupportStore.build([demo_dirs[0]], embedder=emb, progress=False)
    assert store.embedder_id == emb.id and len(store.search(imgs[0], k=2)) == 2
    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(EmbedderError, match="no weight file"):
        get_embedder(f"openclip:{d}")


def test_segicl_embedder_when_pipeline_exists(tmp_path, demo_dirs):
    pipeline = pytest.importorskip("segicl.pipeline")
    import torch

    torch.set_num_threads(1)
    from retrieval.embedders import SegICLEmbedder

    pipe = pipeline.SegICLPipeline.from_preset("tiny")
    emb = SegICLEmbedder(pipeline=pipe)
    assert emb.id == pipe.embedder_id and emb.id.startswith("segicl")
    ds = load_dataset(demo_dirs[0])
    v = emb.embed([ds.sample(s, 255).image for s in ds.stems("train")[:2]])
    assert v.shape == (2, emb.dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)


# ------------------------------------------------------------------------------------------ search
def test_exact_search_matches_brute_force(demo_store, demo_dirs):
    emb = get_embedder("pixel")
    vecs = ix.all_vectors(demo_store.index)
    assert vecs.shape == (48, 336)
    for d in demo_dirs:
        ds = load_dataset(d)
        for stem in ds.stems("test"):
            q = emb.embed([ds.sample(stem, 255).image])
            expect = np.argsort(-(vecs @ q[0]), kind="stable")[:5]
            hits = demo_store.search(ds.sample(stem, 255).image, k=5, dedup_threshold=None)
            assert [h.id for h in hits] == expect.tolist()
            np.testing.assert_allclose([h.score for h in hits], (vecs @ q[0])[expect], rtol=1e-5)
            assert all(demo_store.records[h.id].stem == h.stem for h in hits)


def test_eval_suite_call_returns_same_dataset_label_other_group(demo_store, demo_dirs):
    ds = load_dataset(demo_dirs[0])
    q = ds.sample(ds.stems("test")[0], 255)
    hits = demo_store.search(q.image, k=3, dataset=q.dataset, label=q.label_value,
                             exclude_stems=[q.stem], exclude_groups=[q.group])
    assert len(hits) == 3
    assert all(h.dataset == q.dataset and h.label_value == 255 and h.stem != q.stem for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    s = hits[0].sample()
    assert s.stem == hits[0].stem and s.mask.any() and s.image.size == (s.mask.shape[1], s.mask.shape[0])
    batch = demo_store.search([q.image, q.image], k=2, modality="fetal ultrasound")
    assert len(batch) == 2 and all(h.modality == "fetal ultrasound" for hs in batch for h in hs)


def test_query_itself_and_its_group_are_never_returned(toy_store, toy):
    ds = load_dataset(toy)
    img = ds.sample("t00", 1).image
    own = toy_store.search(img, k=3, exclude_identical=False, dedup_threshold=None)
    assert own[0].stem == "t00" and own[0].score > 0.9999  # the leak the guards must stop
    assert "t00" not in [h.stem for h in toy_store.search(img, k=13)]  # identical image dropped by default
    hits = toy_store.search(img, k=13, exclude_stems=["t00"], exclude_groups=["g0"], exclude_identical=False)
    stems = [h.stem for h in hits]
    assert "t00" not in stems and "t01" not in stems  # t01 shares group g0
    assert len(hits) == 11  # 14 - 2 excluded - 1 collapsed duplicate (dupA/dupB)
    assert all(h.group != "g0" for h in hits)


def test_label_filter_requires_label_in_mask(toy_store, toy):
    img = load_dataset(toy).sample("t03", 1).image
    by_value = toy_store.search(img, k=20, label=2, dedup_threshold=None)
    by_name = toy_store.search(img, k=20, label="spot", dedup_threshold=None)
    assert [h.stem for h in by_value] == [h.stem for h in by_name]
    assert sorted(h.stem for h in by_value) == [f"t{i:02d}" for i in range(0, 12, 2)]
    assert all(2 in h.label_values and h.label_value == 2 and h.label == "spot" for h in by_value)
    assert by_value[0].sample().mask.sum() == 150  # the label-2 square
    assert toy_store.search(img, k=3, label=99) == []
    assert toy_store.search(img, k=3, dataset="other") == []


def test_near_duplicates_are_collapsed(toy_store, toy):
    q = np.asarray(load_dataset(toy).sample("dupA", 1).image).astype(int)
    q = Image.fromarray(np.clip(q + 3, 0, 255).astype(np.uint8))  # near, not identical
    raw = [h.stem for h in toy_store.search(q, k=3, dedup_threshold=None)]
    assert raw[:2] in (["dupA", "dupB"], ["dupB", "dupA"])
    dedup = [h.stem for h in toy_store.search(q, k=3)]
    assert len(dedup) == 3 and len({"dupA", "dupB"} & set(dedup)) == 1


def test_widening_finds_k_hits_behind_many_filtered_candidates(toy_store, toy):
    img = load_dataset(toy).sample("t05", 1).image
    # only the 6 even stems carry label 2, the two nearest of which are excluded by group
    hits = toy_store.search(img, k=4, label=2, exclude_groups=["g2", "g3"])
    assert len(hits) == 4 and all(h.stem not in ("t04", "t06") for h in hits)


# ------------------------------------------------------------------------------------------ index
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_index_types_agree_with_exact_search(kind, monkeypatch):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(40, 64))
    x = centers[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[:50] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = ix.build_index(x, kind)
    assert ix.index_type_of(index) == kind
    exact = np.argsort(-(q @ x.T), axis=1)[:, :5]
    _, got = ix.search(index, q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, exact)])
    assert recall >= (1.0 if kind == "flat" else 0.9), recall
    allowed = np.zeros(len(x), bool)
    allowed[::7] = True
    for brute in (ix.BRUTE_FORCE_MAX, 0):  # exact subset search, then the faiss ID-selector path
        monkeypatch.setattr(ix, "BRUTE_FORCE_MAX", brute)
        _, got = ix.search(index, q, 5, allowed)
        assert allowed[got[got >= 0]].all()
        sub = np.flatnonzero(allowed)
        exact_f = sub[np.argsort(-(q @ x[sub].T), axis=1)[:, :5]]
        rec = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, exact_f)])
        assert rec >= (1.0 if kind == "flat" or brute else 0.8), (brute, rec)
    data = ix.serialize(index)
    again = ix.deserialize(data)
    np.testing.assert_array_equal(ix.search(again, q, 5)[1], ix.search(index, q, 5)[1])


def test_choose_index_type_by_size():
    assert [ix.choose_index_type(n) for n in (10, 49_999, 50_000, 5_000_000)] == ["flat", "flat", "ivfpq", "ivfpq"]
    small = ix.build_index(np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32), "ivfpq")
    assert not ix.needs_retraining(small, 2000) and ix.needs_retraining(small, 20_000)
    assert not ix.needs_retraining(ix.build_index(np.zeros((5, 16), np.float32), "flat"), 10**6)


def test_store_index_types_give_the_same_top1(demo_dirs, demo_store):
    queries = []
    for d in demo_dirs:
        ds = load_dataset(d)
        queries += [ds.sample(s, 255).image for s in ds.stems("test")]
    ref = [h[0].stem for h in demo_store.search(queries, k=1)]
    vecs = ix.all_vectors(demo_store.index)
    for kind in ("hnsw", "ivfpq"):
        other = SupportStore(embedder="pixel", index_type=kind)
        other._add_vectors(list(demo_store.records), vecs)
        assert other.index_type == kind
        assert [h[0].stem for h in other.search(queries, k=1)] == ref


# ------------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip(demo_store, demo_dirs, tmp_path):
    path = demo_store.save(tmp_path / "store")
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "manifest.json", "meta.sqlite"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["count"] == 48 and manifest["embedder"]["id"] == "pixel-v1-s16"
    assert manifest["versions"]["faiss"] == faiss.__version__ and manifest["index_type"] == "flat"
    with sqlite3.connect(path / "meta.sqlite") as con:
        row = con.execute("SELECT dataset, label_values, sha256, embedder_id FROM supports WHERE id = 0").fetchone()
    assert row[0] == demo_store.records[0].dataset and json.loads(row[1]) == [255] and len(row[2]) == 64
    loaded = SupportStore.load(path)
    ds = load_dataset(demo_dirs[1])
    q = ds.sample(ds.stems("test")[0], 255).image
    a = [(h.stem, round(h.score, 6)) for h in demo_store.search(q, k=5)]
    assert [(h.stem, round(h.score, 6)) for h in loaded.search(q, k=5)] == a
    demo_store.save(path)  # overwrite in place
    assert SupportStore.load(path).info()["count"] == 48


def test_corrupted_or_mismatched_store_is_detected(demo_store, tmp_path):
    path = demo_store.save(tmp_path / "s")
    data = bytearray((path / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"index\.faiss: sha256 differs"):
        SupportStore.load(path)
    (path / "index.faiss").write_bytes(b"garbage" * 10)
    with pytest.raises(StoreError, match="index.faiss: size"):
        SupportStore.load(path)
    with pytest.raises(StoreError, match="not a readable faiss index"):
        SupportStore.load(path, verify=False)

    path = demo_store.save(tmp_path / "s")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["count"] = 47
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="holds 48 vectors but the manifest says 47"):
        SupportStore.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest\.json: invalid JSON"):
        SupportStore.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json: missing"):
        SupportStore.load(path)
    with pytest.raises(StoreError, match="not found"):
        SupportStore.load(tmp_path / "nope")

    # a metadata table swapped for another store's (checksums updated to match): counts disagree
    path = demo_store.save(tmp_path / "s")
    small = SupportStore.build([find_datasets(DEMO)[0]], progress=False).save(tmp_path / "small")
    (path / "meta.sqlite").write_bytes((small / "meta.sqlite").read_bytes())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["meta.sqlite"] = json.loads((small / "manifest.json").read_text())["files"]["meta.sqlite"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="meta.sqlite: 16 rows but the manifest says 48"):
        SupportStore.load(path)


def test_other_embedder_is_refused(demo_store, tmp_path):
    path = demo_store.save(tmp_path / "s")
    other = get_embedder("pixel:8")
    q = other.embed([Image.new("RGB", (20, 20), (90, 10, 10))])
    with pytest.raises(EmbedderMismatchError, match="pixel-v1-s8.*pixel-v1-s16"):
        demo_store.search(query_embeddings=q, embedder_id=other.id, k=3)
    with pytest.raises(EmbedderMismatchError, match="need embedder_id"):
        demo_store.search(query_embeddings=q, k=3)
    with pytest.raises(EmbedderMismatchError):
        SupportStore.load(path, embedder=other)
    with pytest.raises(EmbedderMismatchError):
        SupportStore.load(path, embedder="pixel:8")
    own = PixelEmbedder().embed([Image.new("RGB", (20, 20), (90, 10, 10))])
    assert len(demo_store.search(query_embeddings=own[0], embedder_id="pixel-v1-s16", k=3)) == 3

    class Renamed(PixelEmbedder):  # same spec, different weights/version -> different id
        id = "pixel-v999"

    loaded = SupportStore.load(path)
    loaded._embedder = None
    loaded.embedder_id = "pixel-v999"
    with pytest.raises(EmbedderMismatchError, match="rebuild the store"):
        loaded.search(Image.new("RGB", (8, 8)), k=1)


def test_incremental_add_equals_full_build(demo_dirs, demo_store, tmp_path):
    part = SupportStore.build(demo_dirs[:1], progress=False)
    part.save(tmp_path / "p")
    part = SupportStore.load(tmp_path / "p")
    assert part.add(demo_dirs[1:], progress=False) == 32
    assert part.add(demo_dirs, progress=False) == 0  # already there
    assert [(r.dataset, r.stem) for r in part.records] == [(r.dataset, r.stem) for r in demo_store.records]
    np.testing.assert_array_equal(ix.all_vectors(part.index), ix.all_vectors(demo_store.index))
    q = load_dataset(demo_dirs[2]).sample(load_dataset(demo_dirs[2]).stems("test")[0], 255).image
    assert [h.id for h in part.search(q, k=6)] == [h.id for h in demo_store.search(q, k=6)]


def test_plain_folder_and_bad_split(tmp_path, toy):
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "masks").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(plain / "images" / f"p{i}.png")
        m = np.zeros((16, 16), np.uint8)
        m[:4, :4] = 255
        Image.fromarray(m).save(plain / "masks" / f"p{i}.png")
    with pytest.warns(UserWarning, match="plain folder"):
        store = SupportStore.build([plain], progress=False)
    assert len(store) == 3
    with pytest.raises(StoreError, match="no split 'val'"):
        SupportStore.build([toy], split="val", progress=False)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_index_build_and_info(demo_dirs, tmp_path, capsys):
    from segicl.cli import main

    out = tmp_path / "store"
    assert main(["index", "build", "--data", str(DEMO), "--out", str(out), "--no-progress"]) == 0
    assert "48 supports" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pixel-v1-s16" in text and "hc18_fetal_head_us" in text and "flat" in text
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 48
    out2 = tmp_path / "store2"
    assert main(["index", "build", "--data", str(demo_dirs[0]), "--out", str(out2), "--index-type", "hnsw",
                 "--no-progress"]) == 0
    assert main(["index", "build", "--add", "--data", str(demo_dirs[1]), "--out", str(out2), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(out2), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 32 and info["index_type"] == "hnsw"
    (out / "index.faiss").write_bytes(b"x")
    assert main(["index", "info", str(out)]) == 1
    assert "index.faiss" in capsys.readouterr().err


class FakePipeline:
    """TEST DOUBLE for segicl.pipeline.SegICLPipeline: returns a fixed mask at half resolution.

    It checks the call contract (one image per call, supports as (PIL, bool HxW) pairs) and records
    what it received; it does no segmentation.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, images, text=None, supports=None, num_inference_steps=None, num_samples=None, generator=None):
        from types import SimpleNamespace

        self.calls.append({"images": images, "text": text, "supports": supports, "steps": num_inference_steps})
        masks, probs = [], []
        for im in images:
            w, h = im.size
            p = np.zeros((h // 2, w // 2), np.float32)  # deliberately not the original size
            p[h // 8: h // 4, w // 8: w // 4] = 0.9
            probs.append(p)
            masks.append(p > 0.5)
        return SimpleNamespace(masks=masks, probabilities=probs, uncertainty=[np.zeros_like(p) for p in probs])


def test_cli_segment_with_store_and_given_supports(demo_dirs, tmp_path, monkeypatch):
    from retrieval import cli as rcli
    from segicl.cli import main

    fake = FakePipeline()
    monkeypatch.setattr(rcli, "load_pipeline", lambda checkpoint: fake)
    store = tmp_path / "store"
    assert main(["index", "build", "--data", str(DEMO), "--out", str(store), "--no-progress"]) == 0
    ds = load_dataset(demo_dirs[0])
    queries = [ds.image_path(s) for s in ds.stems("test")[:2]]
    out = tmp_path / "seg"
    assert main(["segment", "--image", str(queries[0]), "--image", str(queries[1]), "--out", str(out),
                 "--store", str(store), "--k", "3", "--label", "breast tumour", "--dataset", ds.name,
                 "--steps", "2", "--no-progress"]) == 0
    report = json.loads((out / "segment.json").read_text())
    assert len(report["queries"]) == 2
    for q, path in zip(report["queries"], queries):
        img = Image.open(path)
        mask = Image.open(out / f"{path.stem}.png")
        assert mask.size == img.size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / f"{path.stem}_prob.png").size == img.size
        assert Image.open(out / f"{path.stem}_overlay.png").size[1] > img.size[1]  # supports strip below
        assert len(q["supports"]) == 3 and all(s["dataset"] == ds.name and s["score"] > 0 for s in q["supports"])
        assert q["text"] == "Segment the breast tumour in this breast ultrasound image."
    sup = fake.calls[0]["supports"][0]
    assert len(sup) == 3 and all(m.dtype == bool and m.any() and m.shape == (i.size[1], i.size[0]) for i, m in sup)

    s0 = ds.stems("train")[0]
    out2 = tmp_path / "seg2"
    assert main(["segment", "--image", str(queries[0]), "--out", str(out2), "--text", "Segment it.",
                 "--support", f"{ds.image_path(s0)}:{ds.mask_path(s0)}", "--no-progress"]) == 0
    q = json.loads((out2 / "segment.json").read_text())["queries"][0]
    assert q["text"] == "Segment it." and q["supports"][0]["source"] == "given"
    assert main(["segment", "--image", str(queries[0]), "--out", str(tmp_path / "zs")]) == 0  # zero-shot
    assert fake.calls[-1]["supports"] is None and fake.calls[-1]["text"] is None


@pytest.mark.shared_data
def test_cli_on_real_data(shared_data, tmp_path, monkeypatch):
    """index build + segment --store --k 3 on real Kvasir images (tiny random SegICL when available)."""
    from retrieval import cli as rcli
    from segicl.cli import main

    try:
        import segicl.pipeline  # noqa: F401
        real = True
    except ImportError:
        real = False
        monkeypatch.setattr(rcli, "load_pipeline", lambda checkpoint: FakePipeline())
    ckpt = []
    if real:
        import torch

        torch.set_num_threads(1)
        from segicl.pipeline import SegICLPipeline

        SegICLPipeline.from_preset("tiny").save_pretrained(tmp_path / "ckpt")
        ckpt = ["--checkpoint", str(tmp_path / "ckpt"), "--steps", "2", "--samples", "1"]
    data = shared_data / "kvasir_seg"
    store = tmp_path / "store"
    assert main(["index", "build", "--data", str(data), "--split", "val", "--out", str(store), "--no-progress"]) == 0
    ds = load_dataset(data)
    img = ds.image_path(ds.stems("test")[0])
    out = tmp_path / "seg"
    assert main(["segment", "--image", str(img), "--out", str(out), "--store", str(store), "--k", "3", *ckpt]) == 0
    q = json.loads((out / "segment.json").read_text())["queries"][0]
    assert len(q["supports"]) == 3 and all(s["dataset"] == "kvasir_seg" for s in q["supports"])
    assert Image.open(out / f"{img.stem}.png").size == Image.open(img).size


def test_growing_store_switches_to_ivfpq_without_reembedding(demo_dirs, demo_store, monkeypatch):
    monkeypatch.setattr(ix, "FLAT_MAX", 20)  # pretend 20 entries is "large"
    store = SupportStore.build(demo_dirs[:1], progress=False)
    assert store.index_type == "flat"
    store.add(demo_dirs[1:], progress=False)
    assert store.index_type == "ivfpq" and store.index.ntotal == 48
    np.testing.assert_allclose(ix.all_vectors(store.index), ix.all_vectors(demo_store.index), atol=1e-6)
    ds = load_dataset(demo_dirs[2])
    q = ds.sample(ds.stems("test")[1], 255).image
    assert store.search(q, k=1)[0].stem == demo_store.search(q, k=1)[0].stem


def test_cli_segment_fails_fast_on_bad_input_before_loading_anything(demo_dirs, tmp_path, monkeypatch, capsys):
    from retrieval import cli as rcli
    from segicl.cli import main

    def no_model(checkpoint):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(rcli, "load_pipeline", no_model)
    ds = load_dataset(demo_dirs[0])
    good = ds.image_path(ds.stems("test")[0])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    s0 = ds.stems("train")[0]
    for argv, culprit in ((["--image", str(good), "--image", str(empty)], "empty.png"),
                          (["--image", str(text)], "notes.png"),
                          (["--image", str(good), "--support", f"{ds.image_path(s0)}:{empty}"], "empty.png")):
        out = tmp_path / "seg"
        assert main(["segment", *argv, "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("segicl segment:") and culprit in err and len(err.splitlines()) == 1
        assert not out.exists()  # nothing written


def test_cli_segment_records_the_values_it_used(demo_dirs, tmp_path, monkeypatch, capsys):
    from retrieval import cli as rcli
    from segicl.cli import main
    from segicl.config import load_preset

    fake = FakePipeline()
    fake.config = load_preset("tiny")
    monkeypatch.setattr(rcli, "load_pipeline", lambda checkpoint: fake)
    ds = load_dataset(demo_dirs[0])
    s0 = ds.stems("train")[0]
    out = tmp_path / "seg"
    assert main(["segment", "--image", str(ds.image_path(ds.stems("test")[0])), "--out", str(out),
                 "--support", f"{ds.image_path(s0)}:{ds.mask_path(s0)}", "--no-progress"]) == 0
    assert "--support without --text" in capsys.readouterr().err
    report = json.loads((out / "segment.json").read_text())
    sched = fake.config.scheduler
    assert report["steps"] == sched.num_inference_steps and report["samples"] == sched.num_samples
    assert report["checkpoint"] and report["segicl_version"] and report["wall_seconds"] >= 0
    assert (report["fine"], report["postprocess"]) == ("auto", "auto")


def test_overlay_draws_prediction_truth_and_legend_without_touching_the_input():
    from retrieval.cli import overlay

    img = Image.fromarray(np.full((80, 120, 3), 60, np.uint8))
    before = np.asarray(img).copy()
    pred = np.zeros((80, 120), bool)
    pred[30:60, 40:80] = True
    truth = np.zeros((80, 120), bool)
    truth[35:65, 50:90] = True
    out = np.asarray(overlay(img, pred, [], truth=truth, caption="SegICL, k=3, Dice 0.700"))
    np.testing.assert_array_equal(np.asarray(img), before)
    assert (out == (255, 40, 40)).all(-1).sum() > 50 and (out == (40, 220, 255)).all(-1).sum() > 50
    top = out[:25].astype(int)
    yellow = (top[..., 0] > 150) & (top[..., 1] > 150) & (top[..., 2] < 110)  # antialiased text
    assert yellow.sum() > 20  # the caption and legend in the top-left corner
    plain = np.asarray(overlay(img, pred, []))
    assert not (plain == (40, 220, 255)).all(-1).any()  # no ground truth: no cyan
