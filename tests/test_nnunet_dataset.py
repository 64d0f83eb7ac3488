"""An nnU-Net v2 raw folder as ``--data``: slices on the fly, splits by case, index / evaluate / train,
and the 3D per-case metrics of ``segicl evaluate`` (volumes.csv)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from eval.methods import Method
from eval.suite import SuiteConfig, run_suite
from segicl import volumes as V
from segicl.cli import main
from segicl.data import Sample, find_datasets, is_dataset_folder, load_dataset
from segicl.data.nnunet import nnunet_to_2d
from segicl.data.nnunet_dataset import NnUNetSliceDataset
from tests.volume_files import SHAPE, write_nnunet_raw

torch.set_num_threads(1)
N = SHAPE[2]  # slices per case: axis 2 has the largest spacing (4 mm) of tests.volume_files.AFFINE


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Three labelled training cases, one unlabelled test case."""
    return write_nnunet_raw(tmp_path / "Dataset900_Phantom", cases_tr=3, cases_ts=1)


def test_raw_folder_loads_as_slices_split_by_case(raw: Path, tmp_path: Path) -> None:
    ds = load_dataset(raw)
    assert isinstance(ds, NnUNetSliceDataset) and ds.is_volume and ds.name == "Phantom" and ds.modality == "CT"
    assert [(t.label_value, t.label_name) for t in ds.tasks()] == [(1, "body"), (2, "organ")]
    assert is_dataset_folder(raw) and find_datasets(tmp_path) == [raw]
    # 3 cases, no labelled test case: one case each for test, val, train; the unlabelled imagesTs case nowhere
    cases = {s: sorted({ds.group(x) for x in ds.stems(s)}) for s in ds.splits}
    assert sorted(cases) == ["test", "train", "val"] and all(len(v) == 1 for v in cases.values())
    assert sorted(sum(cases.values(), [])) == ["phantom_000", "phantom_001", "phantom_002"]
    assert len(ds) == 3 * N and load_dataset(raw).splits == ds.splits  # deterministic
    (case,) = cases["test"]
    assert ds.stems("test") == [f"{case}_s{i:03d}" for i in range(N)]  # every slice, empty ones included
    # the slices are those `segicl data convert --keep-empty` writes with the same defaults
    flat = load_dataset(nnunet_to_2d(raw, tmp_path / "flat", keep_empty=True))
    for stem in (ds.stems("test")[0], ds.stems("test")[4]):
        assert np.array_equal(np.asarray(ds.read_image(stem)), np.asarray(Image.open(flat.image_path(stem))))
        assert np.array_equal(ds.read_label_map(stem), flat.read_label_map(stem))
    s = ds.sample(ds.stems("test")[4], "organ")
    assert s.image.mode == "L" and s.group == case and s.split == "test" and s.label_value == 2
    assert np.array_equal(s.mask, ds.read_label_map(s.stem) == 2)
    assert ds.labels_present(ds.stems("test")[0]) == {1}  # the organ spans the middle slices only
    assert ds.labels_present(ds.stems("test")[4]) == {1, 2}
    # stacking a case's label slices gives back its label volume on its voxel grid, exactly
    lab = np.asarray(nib.load(str(raw / "labelsTr" / f"{case}.nii.gz")).dataobj)
    assert np.array_equal(ds.case_volume(case, [ds.read_label_map(x) for x in ds.case_stems(case)]), lab)
    assert ds.case_spacing(case) == pytest.approx((0.8, 1.5, 4.0))
    hw = ds.read_label_map(ds.stems("test")[0]).shape
    z = ds.case_volume(case, [np.full(hw, i) for i in range(N)])  # slice i is data slice z = i (order kept)
    assert np.array_equal(z, np.broadcast_to(np.arange(N), SHAPE))


def test_labelled_test_cases_are_the_test_split_and_two_cases_split_one_one(tmp_path: Path) -> None:
    ds = load_dataset(write_nnunet_raw(tmp_path / "a", cases_tr=3, cases_ts=1, labels_ts=True))
    assert {ds.group(x) for x in ds.stems("test")} == {"phantom_003"}  # imagesTs + labelsTs
    assert {ds.group(x) for x in ds.stems("train") + ds.stems("val")} == {"phantom_000", "phantom_001", "phantom_002"}
    two = load_dataset(write_nnunet_raw(tmp_path / "b", cases_tr=2, cases_ts=0))
    assert sorted(two.splits) == ["test", "train"] and len(two.stems("train")) == len(two.stems("test")) == N
    assert not {two.group(x) for x in two.stems("train")} & {two.group(x) for x in two.stems("test")}


def test_volumes_are_read_once_per_case_and_kept_lru(raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = V.read_volume

    def counting(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(V, "read_volume", counting)
    ds = load_dataset(raw)
    ds.cache_cases = 1
    a, b = ds.stems("train"), ds.stems("test")
    for stem in a:
        ds.sample(stem, 1)
    assert len(reads) == 2  # image + label volume of one case for its 9 slices
    ds.sample(b[0], 1)
    ds.sample(a[0], 1)  # evicted by b's case: read again
    assert len(reads) == 6 and len(ds._cache) == 1


def test_index_build_and_evaluate_take_the_raw_folder(raw: Path, tmp_path: Path) -> None:
    from retrieval.store import SupportStore

    store = tmp_path / "store"
    assert main(["index", "build", "--data", str(raw), "--out", str(store), "--no-progress"]) == 0
    ds = load_dataset(raw)
    loaded = SupportStore.load(store)
    assert sorted(r.stem for r in loaded.records) == ds.stems("train")  # every train slice, one case
    r = loaded.records[4]
    assert r.group == ds.group(r.stem) and set(r.label_values) == ds.labels_present(r.stem)
    assert r.sha256 == ds.image_sha256(r.stem) and r.image_path.endswith("_0000.nii.gz")
    out = tmp_path / "ev"
    argv = ["evaluate", "--data", str(raw), "--methods", "labelprop", "--k", "1", "--limit", "2", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    rows = _rows(out / "results.csv")
    assert [(r["label"], r["stem"]) for r in rows] == [(lab, s) for lab in ("body", "organ") for s in ds.stems("test")[:2]]
    assert all(not r["error"] and r["support_stems"] in ds.stems("train") for r in rows)
    vols = _rows(out / "volumes.csv")  # --limit 2 cuts the test case: no 3D figures, said so
    assert [(v["label"], v["slices"], v["dice3d"]) for v in vols] == [("body", f"2/{N}", "nan"), ("organ", f"2/{N}", "nan")]
    assert all("3D metrics need every slice" in v["error"] for v in vols)
    md = (out / "summary.md").read_text()
    assert "## 3D per case" in md and "| Phantom | body | labelprop | 1 | random | 0 | – | – | – | 0/0 | 1 | 0 |" in md


class _Oracle(Method):
    """Predicts the query's own mask, except on the slices listed in ``drop`` (predicted empty)."""

    name = "oracle"
    uses_supports = False

    def __init__(self, drop: tuple[int, ...] = ()):
        self.drop = drop

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        empty = int(query.stem.rsplit("_s", 1)[1]) in self.drop
        return np.zeros(query.mask.shape, np.float32) if empty else query.mask.astype(np.float32), None


def test_evaluate_reports_3d_metrics_per_case_in_mm(raw: Path, tmp_path: Path) -> None:
    ds = load_dataset(raw)
    (case,) = {ds.group(x) for x in ds.stems("test")}
    lab = np.asarray(nib.load(str(raw / "labelsTr" / f"{case}.nii.gz")).dataobj)
    cfg = SuiteConfig(data=[raw], out=tmp_path / "ev", methods=["perfect", "drop4"], ks=[0], progress=False)
    paths = run_suite(cfg, methods={"perfect": _Oracle(), "drop4": _Oracle(drop=(4,))})
    vols = {(v["method"], v["label"]): v for v in _rows(paths["volumes"])}
    assert len(vols) == 4 and all(v["case"] == case and v["slices"] == f"{N}/{N}" and not v["error"] for v in vols.values())
    for label in ("body", "organ"):
        v = vols[("perfect", label)]
        assert (float(v["dice3d"]), float(v["hd95_mm"]), float(v["nsd_mm"])) == (1.0, 0.0, 1.0)
    # drop4: slice 4 predicted empty; slice i is data slice z = i (slicing keeps the data's order along the
    # axis), so Dice = 2 |T minus slice 4| / (|T| + |T minus slice 4|)
    for value, label in ((1, "body"), (2, "organ")):
        t, t4 = int((lab == value).sum()), int((lab[:, :, 4] == value).sum())
        assert t4 > 0 and float(vols[("drop4", label)]["dice3d"]) == pytest.approx(2 * (t - t4) / (2 * t - t4))
        assert float(vols[("drop4", label)]["nsd_mm"]) < 1.0
    run = json.loads(paths["run"].read_text())
    assert run["volume_rows"] == 4
    md = paths["summary_md"].read_text()
    assert "| Phantom | organ | perfect | – | none | 1 | 1.000 | 0.00 | 1.000 | 0/0 | 0 | 0 |" in md


def test_train_reads_the_raw_folder(raw: Path, tmp_path: Path) -> None:
    from training.cache import build_cache
    from training.vlsm_task import resolve_datasets

    (ds,) = resolve_datasets([raw])
    cache = build_cache([ds], "train", 16, margin=0.0, workers=2, progress=False)
    assert cache.stems == ds.stems("train") and cache.images.shape == (N, 16, 16, 3)
    stem = ds.stems("train")[4]
    lm = np.asarray(Image.fromarray(ds.read_label_map(stem)).resize((16, 16), Image.NEAREST))
    assert np.array_equal(cache.label_maps[4], lm)
    out = tmp_path / "run"
    argv = ["train", "universeg", "--config", "configs/train/tiny_universeg.yaml", "--data", str(raw), "--max-steps",
            "2", "--out", str(out), "--no-progress", "--set", "train.batch_size=2", "--set", "train.num_workers=0",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.val_per_task=2", "--set", "data.val_k=1",
            "--set", "data.k_max=2"]
    assert main(argv) == 0
    (row,) = _rows(out / "log.csv")  # validated on the val case's slices, per label of dataset.json
    assert row["step"] == "2" and 0 <= float(row["val/dice/Phantom/body"]) <= 1 and "val/dice/Phantom/organ" in row


def test_a_bad_case_stops_index_and_evaluate_naming_the_file(raw: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tests.volume_files import phantom, write_nifti

    bad = raw / "labelsTr" / "phantom_001.nii.gz"
    write_nifti(bad, phantom()[1][:, :, :5], dtype=np.uint8)
    problem = f"{bad}: shape (24, 20, 5) differs from image phantom_001_0000.nii.gz shape (24, 20, 9)"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", str(raw), "--methods", "labelprop", "--k", "1", "--out", str(tmp_path / "ev")])
    assert str(exc.value.code) == f"segicl evaluate: {problem}" and not (tmp_path / "ev").exists()
    assert main(["index", "build", "--data", str(raw), "--out", str(tmp_path / "st"), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().endswith(problem) and not (tmp_path / "st").exists()


def test_window_and_axis_from_dataset_json(raw: Path) -> None:
    meta = json.loads((raw / "dataset.json").read_text())
    meta["segicl"] = {"window": "abdomen", "axis": "0"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(raw)
    stem = ds.stems("train")[3]
    assert len(ds.stems("train")) == SHAPE[0] and stem.endswith("_s003")  # 24 slices along data axis 0
    vol = V.read_volume(raw / "imagesTr" / f"{ds.case_of(stem)}_0000.nii.gz")
    expected = V.volume_slices(vol, 0, "abdomen")[3]  # HU 40 +- 200 -> 0..255
    assert np.array_equal(np.asarray(ds.read_image(stem)), np.asarray(expected))


def test_2d_png_raw_folder_keeps_splits_and_groups(tmp_path: Path) -> None:
    from segicl.data.nnunet import to_nnunet

    demo = Path(__file__).resolve().parents[1] / "segicl" / "assets" / "demo" / "fuseg_foot_ulcer"
    src = load_dataset(demo)
    ds = load_dataset(to_nnunet(demo, tmp_path / "Dataset901_FUSeg"))
    assert isinstance(ds, NnUNetSliceDataset) and not ds.is_volume
    assert ds.labels == {1: "foot ulcer"} and ds.splits == src.splits  # nnU-Net's value 1 for the original 255
    stem = src.stems("test")[0]
    assert ds.group(stem) == src.group(stem) and ds.split_of(stem) == "test"
    a, b = ds.sample(stem, "foot ulcer"), src.sample(stem, 255)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(np.asarray(a.image), np.asarray(b.image))
