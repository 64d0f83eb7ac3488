"""nnU-Net v2 raw folders: reading, case splits, conversion both ways, bad input, ``segicl data``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segicl import volumes as V
from segicl.data import DataError, load_dataset
from segicl.data.nnunet import is_nnunet_raw, load_nnunet, nnunet_to_2d, to_nnunet
from tests.volume_files import SHAPE, phantom, write_nifti, write_nnunet_raw

DEMO = Path(__file__).resolve().parents[1] / "segicl" / "assets" / "demo" / "fuseg_foot_ulcer"


def test_reader_maps_labels_to_tasks_and_splits_by_case(tmp_path: Path) -> None:
    root = write_nnunet_raw(tmp_path / "Dataset900_Phantom", cases_tr=2, cases_ts=1)
    assert is_nnunet_raw(root) and not is_nnunet_raw(DEMO)
    ds = load_nnunet(root)
    assert ds.modality == "CT" and not ds.is_2d and ds.name == "Phantom"
    assert [(t.label_value, t.label_name) for t in ds.tasks()] == [(1, "body"), (2, "organ")]
    assert [(c.name, c.split, c.label is not None) for c in ds.cases] == [
        ("phantom_000", "train", True), ("phantom_001", "train", True), ("phantom_002", "test", False)]
    splits = ds.case_splits(val_fraction=0.2, seed=0)
    assert sorted(splits["train"] + splits["val"]) == ["phantom_000", "phantom_001"]
    assert len(splits["val"]) == 1 and splits["test"] == []  # the test case has no labels
    with pytest.raises(ValueError, match="val_fraction"):
        ds.case_splits(val_fraction=1.0)


def test_nnunet_volumes_to_2d_slices_with_cases_as_groups(tmp_path: Path) -> None:
    root = write_nnunet_raw(tmp_path / "raw", cases_tr=2, cases_ts=1, labels_ts=True)
    out = nnunet_to_2d(root, tmp_path / "flat", window="abdomen")
    ds = load_dataset(out, verify=True)
    assert ds.labels == {1: "body", 2: "organ"} and ds.modality == "CT"
    by_split = {s: {ds.group(x) for x in ds.stems(s)} for s in ds.splits}
    assert by_split["test"] == {"phantom_002"}
    assert not by_split["train"] & by_split["val"] and by_split["train"] | by_split["val"] == {"phantom_000", "phantom_001"}
    # every slice with a label, none without; pixels are the windowed image slices and the label slices
    vol = V.read_volume(root / "imagesTr" / "phantom_000_0000.nii.gz")
    labels = V.read_label_volume(root / "labelsTr" / "phantom_000.nii.gz", like=vol)
    axis = vol.slice_axis()
    lab = V.label_slices(labels, axis)
    imgs = V.volume_slices(vol, axis, "abdomen")
    stems = sorted(s for s in ds.stems("all") if ds.group(s) == "phantom_000")
    assert stems == [f"phantom_000_s{i:03d}" for i in range(SHAPE[axis]) if lab[i].any()]
    i = int(stems[0][-3:])
    assert np.array_equal(ds.read_label_map(stems[0]), lab[i])
    assert np.array_equal(np.asarray(Image.open(ds.image_path(stems[0]))), np.asarray(imgs[i]))
    kept = nnunet_to_2d(root, tmp_path / "all", keep_empty=True)
    assert len(load_dataset(kept).stems("all")) == 3 * SHAPE[axis]


def test_2d_layout_to_nnunet_and_back_is_exact(tmp_path: Path) -> None:
    raw = to_nnunet(DEMO, tmp_path / "Dataset901_FUSeg")
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "foot ulcer": 1}  # nnU-Net wants consecutive values
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".png"
    src = load_dataset(DEMO)
    n_test = len(src.stems("test"))
    assert meta["numTraining"] == len(src) - n_test
    assert len(list((raw / "imagesTs").iterdir())) == len(list((raw / "labelsTs").iterdir())) == n_test
    stem = src.stems("train")[0]
    assert set(np.unique(np.asarray(Image.open(raw / "labelsTr" / f"{stem}.png"))).tolist()) <= {0, 1}
    ds = load_nnunet(raw)
    assert ds.is_2d and [c.images[0].name for c in ds.cases][:1] == [f"{ds.cases[0].name}_0000.png"]
    back = load_dataset(nnunet_to_2d(raw, tmp_path / "back"))
    assert back.labels == src.labels and back.splits == src.splits and back.modality == src.modality
    for s in src.stems("all"):
        assert np.array_equal(back.read_label_map(s), src.read_label_map(s))
        assert np.array_equal(np.asarray(back.sample(s, 255).image), np.asarray(src.sample(s, 255).image))


def test_multi_label_values_are_remapped_and_restored(tmp_path: Path) -> None:
    src = tmp_path / "wbc"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 12), dtype=np.uint8)).save(src / "images" / f"c{i}.png")
        m = np.zeros((16, 12), np.uint8)
        m[2:8, 2:6], m[9:14, 4:10] = 128, 255
        Image.fromarray(m).save(src / "masks" / f"c{i}.png")
    (src / "dataset.json").write_text(json.dumps({
        "name": "wbc", "modality": "microscopy", "image_mode": "L", "labels": {"128": "cytoplasm", "255": "nucleus"},
        "splits": {"train": ["c0", "c1"], "test": ["c2"]}, "groups": {"c0": "p1", "c1": "p1", "c2": "p2"}}))
    raw = to_nnunet(src, tmp_path / "raw")
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cytoplasm": 1, "nucleus": 2} and meta["channel_names"] == {"0": "microscopy"}
    assert np.unique(np.asarray(Image.open(raw / "labelsTr" / "c0.png"))).tolist() == [0, 1, 2]
    back = load_dataset(nnunet_to_2d(raw, tmp_path / "back"))
    assert back.labels == {128: "cytoplasm", 255: "nucleus"} and back.groups == {"c0": "p1", "c1": "p1", "c2": "p2"}
    assert np.array_equal(back.read_label_map("c0"), np.asarray(Image.open(src / "masks" / "c0.png")))


@pytest.mark.parametrize("case", ["region", "missing_label", "orphan_label", "missing_key", "unknown_value", "grid"])
def test_bad_nnunet_folders_name_the_file_and_write_nothing(case: str, tmp_path: Path) -> None:
    root = write_nnunet_raw(tmp_path / "raw")
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text())
    if case == "region":
        meta["labels"]["whole"] = [1, 2]
        meta_path.write_text(json.dumps(meta))
        culprit = "dataset.json: label 'whole' is region-based"
    elif case == "missing_label":
        (root / "labelsTr" / "phantom_001.nii.gz").unlink()
        culprit = "phantom_001.nii.gz: label file missing for training case 'phantom_001'"
    elif case == "orphan_label":
        write_nifti(root / "labelsTr" / "ghost.nii.gz", phantom()[1], dtype=np.uint8)
        culprit = "ghost.nii.gz: label file without an image in imagesTr/"
    elif case == "missing_key":
        del meta["file_ending"]
        meta_path.write_text(json.dumps(meta))
        culprit = "dataset.json: missing key 'file_ending'"
    elif case == "unknown_value":
        lab = phantom()[1]
        lab[0, 0, 0] = 9
        write_nifti(root / "labelsTr" / "phantom_001.nii.gz", lab, dtype=np.uint8)
        culprit = "phantom_001.nii.gz: label values [9] are not among the known labels [1, 2]"
    else:
        write_nifti(root / "labelsTr" / "phantom_001.nii.gz", phantom()[1][:, :, :5], dtype=np.uint8)
        culprit = "phantom_001.nii.gz: shape (24, 20, 5) differs from image phantom_001_0000.nii.gz"
    out = tmp_path / "flat"
    with pytest.raises(DataError) as exc:
        nnunet_to_2d(root, out)
    assert culprit in str(exc.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary left either


def test_data_cli_convert_both_ways_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segicl.cli import main

    root = write_nnunet_raw(tmp_path / "raw")
    assert main(["data", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "tasks      1: body, 2: organ" in out and "train 1, val 1, test 0, unlabelled test 1" in out
    assert main(["data", "convert", str(root), str(tmp_path / "flat"), "--window", "abdomen", "--axis", "axial"]) == 0
    assert load_dataset(tmp_path / "flat").labels == {1: "body", 2: "organ"}
    assert main(["data", "convert", str(tmp_path / "flat"), str(tmp_path / "again")]) == 0
    assert is_nnunet_raw(tmp_path / "again")
    assert main(["data", "convert", str(tmp_path), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("segicl data convert:") and "neither an nnU-Net raw folder" in err
    assert main(["data", "convert", str(root), str(tmp_path / "y"), "--window", "soft"]) == 1
    assert "window must be one of" in capsys.readouterr().err and not (tmp_path / "y").exists()
