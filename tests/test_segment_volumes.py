"""``segicl segment`` on volumes: NIfTI / DICOM queries, supports from a labelled volume, batch, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from segicl import volumes as V
from tests.volume_files import SHAPE, phantom, write_dicom_series, write_nifti


class BrightPipeline:
    """TEST DOUBLE for SegICLPipeline: the mask is the slice's pixels above 200 (of 255), uncertainty
    0.1 there. So the CLI's output must equal that threshold of the windowed volume on the input grid;
    it records the calls (images, supports) and does no segmentation of its own."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, text=None, supports=None, num_inference_steps=None, num_samples=None, generator=None):
        self.calls.append({"images": images, "supports": supports, "text": text})
        masks = [np.asarray(im) > 200 for im in images]
        return SimpleNamespace(masks=masks, probabilities=[m.astype(np.float32) for m in masks],
                               uncertainty=[m.astype(np.float32) * 0.1 for m in masks])


@pytest.fixture()
def vols(tmp_path: Path) -> dict[str, Path]:
    q_img, _ = phantom(seed=1)
    s_img, s_lab = phantom(seed=2)
    return {"query": write_nifti(tmp_path / "in" / "query.nii.gz", q_img),
            "atlas": write_nifti(tmp_path / "in" / "atlas.nii.gz", s_img),
            "labels": write_nifti(tmp_path / "in" / "atlas_labels.nii.gz", s_lab, dtype=np.uint8)}


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> BrightPipeline:
    from retrieval import cli as rcli

    pipe = BrightPipeline()
    monkeypatch.setattr(rcli, "load_pipeline", lambda checkpoint: pipe)
    return pipe


def test_volume_with_supports_from_a_labelled_volume(vols, fake, tmp_path: Path) -> None:
    from segicl.cli import main

    out = tmp_path / "seg"
    assert main(["segment", "--image", str(vols["query"]), "--support", f"{vols['atlas']}:{vols['labels']}",
                 "--label", "2", "--k", "3", "--window", "abdomen", "--out", str(out), "--no-progress"]) == 0
    mask_img = nib.load(str(out / "query_mask.nii.gz"))
    src = nib.load(str(vols["query"]))
    assert np.array_equal(mask_img.affine, src.affine) and mask_img.shape == SHAPE
    vol = V.read_volume(vols["query"])
    lo, hi = V.window_range(vol.data, "abdomen")
    expected = (V.to_uint8(vol.data, lo, hi) > 200).astype(np.uint8) * 2  # the label value asked for
    assert np.asarray(mask_img.dataobj).any() and np.array_equal(np.asarray(mask_img.dataobj), expected)
    unc = np.asarray(nib.load(str(out / "query_uncertainty.nii.gz")).dataobj)
    assert unc.dtype == np.float32 and np.allclose(unc, expected.astype(bool) * 0.1)
    # slices along the 4 mm axis (9 of them), every one with the same 3 supports carrying label 2
    n_slices = sum(len(c["images"]) for c in fake.calls)
    assert n_slices == SHAPE[2]
    sup = fake.calls[0]["supports"][0]
    assert len(sup) == 3 and all(m.dtype == bool and m.any() for _, m in sup)
    report = json.loads((out / "segment.json").read_text())
    q = report["queries"][0]
    assert q["axis"] == 2 and q["slices"] == 9 and report["label_value"] == 2 and report["window"] == "abdomen"
    assert [s["source"] for s in q["supports"]] == ["volume"] * 3 and len({s["slice"] for s in q["supports"]}) == 3
    rows = list(csv.DictReader(open(out / "volumes.csv")))
    assert rows[0]["status"] == "done" and rows[0]["mask"] == "query_mask.nii.gz"
    voxel_ml = 0.8 * 1.5 * 4.0 / 1000
    assert float(rows[0]["foreground_ml"]) == pytest.approx(expected.astype(bool).sum() * voxel_ml, rel=1e-3)
    assert (out / "query_overlay.png").is_file()


def test_dicom_series_query_writes_nifti_on_its_grid(tmp_path: Path, fake) -> None:
    from segicl.cli import main

    hu = np.round(phantom((12, 10, 5))[0])
    write_dicom_series(tmp_path / "ct_series", hu)
    out = tmp_path / "seg"
    assert main(["segment", "--image", str(tmp_path / "ct_series"), "--window", "abdomen", "--axis", "axial",
                 "--out", str(out), "--no-progress"]) == 0
    vol = V.read_volume(tmp_path / "ct_series")
    back = nib.load(str(out / "ct_series_mask.nii.gz"))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    lo, hi = V.window_range(vol.data, "abdomen")
    assert np.array_equal(np.asarray(back.dataobj), (V.to_uint8(vol.data, lo, hi) > 200).astype(np.uint8))
    assert fake.calls[0]["supports"] is None  # zero-shot


def test_batch_over_a_glob_records_errors_and_resumes(vols, fake, tmp_path: Path, capsys) -> None:
    from segicl.cli import main

    broken = vols["query"].with_name("broken.nii.gz")
    broken.write_bytes(vols["query"].read_bytes()[:500])
    second = write_nifti(vols["query"].with_name("second.nii.gz"), phantom(seed=3)[0])
    out = tmp_path / "seg"
    argv = ["segment", "--images", str(tmp_path / "in" / "[bqs]*.nii.gz"),
            "--support", f"{vols['atlas']}:{vols['labels']}", "--label", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 1  # one input failed
    assert "broken.nii.gz: unreadable or truncated NIfTI" in capsys.readouterr().err
    rows = {r["stem"]: r for r in csv.DictReader(open(out / "volumes.csv"))}
    assert rows["broken"]["status"] == "error" and "truncated" in rows["broken"]["error"]
    assert rows["query"]["status"] == rows["second"]["status"] == "done"
    assert not (out / "broken_mask.nii.gz").exists()
    calls = len(fake.calls)
    broken.write_bytes(second.read_bytes())  # fixed
    assert main([*argv, "--resume"]) == 0
    rows = {r["stem"]: r for r in csv.DictReader(open(out / "volumes.csv"))}
    assert rows["query"]["status"] == rows["second"]["status"] == "skipped (done)"
    assert rows["broken"]["status"] == "done" and (out / "broken_mask.nii.gz").is_file()
    assert sum(len(c["images"]) for c in fake.calls[calls:]) == SHAPE[2]  # only the fixed one ran


@pytest.mark.parametrize("case", ["label_shape", "unknown_label", "multi_series", "truncated", "4d", "mixed_2d"])
def test_bad_volume_input_fails_fast_with_one_line(case, vols, tmp_path: Path, monkeypatch, capsys) -> None:
    from retrieval import cli as rcli
    from segicl.cli import main

    def no_model(checkpoint):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(rcli, "load_pipeline", no_model)
    query, support = str(vols["query"]), f"{vols['atlas']}:{vols['labels']}"
    extra: list[str] = ["--label", "2"]
    if case == "label_shape":
        bad = write_nifti(tmp_path / "short_labels.nii.gz", phantom()[1][:, :, :-1], dtype=np.uint8)
        support, culprit = f"{vols['atlas']}:{bad}", "short_labels.nii.gz: shape (24, 20, 8) differs from image"
    elif case == "unknown_label":
        extra, culprit = ["--label", "7"], "atlas_labels.nii.gz: label 7 does not occur"
    elif case == "multi_series":
        write_dicom_series(tmp_path / "two", np.zeros((4, 4, 2)))
        write_dicom_series(tmp_path / "two", np.zeros((4, 4, 2)), start=5)
        query, culprit = str(tmp_path / "two"), "two: holds 2 DICOM series"
    elif case == "truncated":
        (tmp_path / "cut.nii.gz").write_bytes(vols["query"].read_bytes()[:700])
        query, culprit = str(tmp_path / "cut.nii.gz"), "cut.nii.gz: unreadable or truncated NIfTI"
    elif case == "4d":
        query = str(write_nifti(tmp_path / "cine.nii.gz", np.zeros((4, 4, 3, 5), np.float32)))
        culprit = "cine.nii.gz: 4D image"
    else:
        png = tmp_path / "slice.png"
        from PIL import Image

        Image.new("L", (8, 8)).save(png)
        extra, culprit = ["--label", "2", "--image", str(png)], "slice.png: a 2D image among volume queries"
    out = tmp_path / "seg"
    assert main(["segment", "--image", query, "--support", support, *extra, "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("segicl segment:") and culprit in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_shipped_checkpoint_segments_a_small_volume(vols, tmp_path: Path) -> None:
    """End to end with the real (tiny) model: the outputs exist on the input grid; no model quality is claimed."""
    import torch

    from segicl.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "seg"
    assert main(["segment", "--image", str(vols["query"]), "--support", f"{vols['atlas']}:{vols['labels']}",
                 "--label", "2", "--k", "2", "--steps", "1", "--samples", "2", "--out", str(out), "--no-progress"]) == 0
    mask = nib.load(str(out / "query_mask.nii.gz"))
    unc = nib.load(str(out / "query_uncertainty.nii.gz"))
    src = nib.load(str(vols["query"]))
    assert np.array_equal(mask.affine, src.affine) and np.array_equal(unc.affine, src.affine)
    assert mask.shape == unc.shape == SHAPE
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 2}
    assert np.isfinite(np.asarray(unc.dataobj)).all()
