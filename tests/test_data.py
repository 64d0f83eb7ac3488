"""Data layer: real datasets, plain folders, bad input, transforms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segicl.data import (
    DataError,
    find_datasets,
    image_to_tensor,
    load_dataset,
    mask_to_tensor,
    resize_prob,
)
from segicl.data import dataset as dataset_mod
from tests.conftest import DATASETS

# ----------------------------------------------------------------------------- real datasets


def test_all_shared_datasets_match_their_dataset_json(shared_data: Path) -> None:
    found = [p.name for p in find_datasets(shared_data)]
    assert sorted(found) == sorted(DATASETS)
    total = 0
    for name in DATASETS:
        meta = json.loads((shared_data / name / "dataset.json").read_text())
        ds = load_dataset(shared_data / name)
        for split, stems in meta["splits"].items():
            assert ds.stems(split) == stems, (name, split)
        assert len(ds) == sum(len(v) for v in meta["splits"].values())
        assert ds.labels == {int(k): v for k, v in meta["labels"].items()}
        total += len(ds)
    assert total == 6311


def test_multiclass_datasets_yield_one_task_per_label(shared_data: Path) -> None:
    acdc = load_dataset(shared_data / "acdc_cardiac_mri")
    assert [t.label_value for t in acdc.tasks()] == [1, 2, 3]
    assert [t.label_name for t in acdc.tasks()] == ["right ventricle cavity", "left ventricle myocardium", "left ventricle cavity"]
    wbc = load_dataset(shared_data / "wbc_blood_smear")
    assert [t.label_name for t in wbc.tasks()] == ["cytoplasm", "nucleus"]
    stem = wbc.stems("train")[0]
    cyto, nucleus = wbc.sample(stem, "cytoplasm"), wbc.sample(stem, 255)
    label_map = np.asarray(Image.open(wbc.mask_path(stem)))
    np.testing.assert_array_equal(cyto.mask, label_map == 128)
    np.testing.assert_array_equal(nucleus.mask, label_map == 255)
    assert not (cyto.mask & nucleus.mask).any()


def test_sample_fields(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "acdc_cardiac_mri")
    stem = ds.stems("test")[0]
    s = ds.sample(stem, 3)
    assert s.image.mode == "L" and s.mask.dtype == bool
    assert s.mask.shape == (s.image.height, s.image.width)
    assert (s.dataset, s.label, s.label_value, s.modality, s.split) == ("acdc_cardiac_mri", "left ventricle cavity", 3, "cardiac MRI", "test")
    assert s.group == stem.split("_")[0]  # patient id
    assert s.instruction == "Segment the left ventricle cavity in this cardiac MRI image."
    rgb = load_dataset(shared_data / "kvasir_seg")
    assert rgb.sample(rgb.stems("train")[0], 255).image.mode == "RGB"


def test_thin_structure_dataset_keeps_native_size(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "rossa_octa_vessel")
    assert ds.labels == {255: "retinal vessel (OCTA)"}
    assert [len(ds.stems(s)) for s in ("train", "val", "test")] == [210, 30, 60]
    s = ds.sample(ds.stems("test")[0], 255)
    assert s.image.size == (320, 320) and s.image.mode == "L"  # not downscaled to 256
    assert 0.03 < s.mask.mean() < 0.3  # thin vessels: a small share of the pixels


def test_prompts_json_alternatives(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "kvasir_seg")
    stem = ds.stems("train")[0]
    texts = ds.instructions(stem, 255)
    assert texts[0] == "Segment the polyp in this endoscopy image."
    assert "polyp" in texts and len(texts) > 5 and "" not in texts
    assert load_dataset(shared_data / "busbra_breast_us").prompts("bus_0002-l") is None


# ----------------------------------------------------------------------------- synthetic folders


def _write_pair(root: Path, stem: str, size=(20, 16), value=255, image_ext=".png") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(stem)) % 2**32)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{stem}{image_ext}")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[4:10, 5:12] = value
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def _documented(root: Path, stems: list[str], labels=None) -> Path:
    for s in stems:
        _write_pair(root, s)
    meta = {"name": "toy", "modality": "toy modality", "image_mode": "RGB", "image_ext": ".png",
            "labels": labels or {"255": "blob"}, "splits": {"train": stems[:-1], "test": stems[-1:]}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_plain_folder_pair(tmp_path: Path) -> None:
    for s in ("a", "b", "c"):
        _write_pair(tmp_path, s, value=255 if s != "c" else 7)
    ds = load_dataset(tmp_path)
    assert ds.splits == {"all": ["a", "b", "c"]}
    assert ds.labels == {7: "label_7", 255: "label_255"}
    assert ds.labels_present("a") == {255} and ds.labels_present("c") == {7}
    assert ds.sample("a", 255).mask.sum() == 6 * 7
    assert ds.sample("c", 255).mask.sum() == 0  # label absent in that image: empty mask


def test_missing_mask_names_the_file(tmp_path: Path) -> None:
    _documented(tmp_path, ["a", "b", "c"])
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png.*mask file not found"):
        load_dataset(tmp_path)
    with pytest.warns(UserWarning, match="b.png"):
        ds = load_dataset(tmp_path, strict=False)
    assert ds.stems("train") == ["a"] and [p.name for p, _ in ds.skipped] == ["b.png"]


def test_size_mismatch(tmp_path: Path) -> None:
    _documented(tmp_path, ["a", "b"])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: mask size 5x5 differs from image a\.png size 20x16"):
        load_dataset(tmp_path)


def test_truncated_image(tmp_path: Path) -> None:
    _documented(tmp_path, ["a", "b", "c"])
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "a.jpg", quality=95)
    data = (tmp_path / "images" / "a.jpg").read_bytes()
    (tmp_path / "images" / "a.png").write_bytes(data[: len(data) // 2])  # truncated JPEG content
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: unreadable or truncated"):
        load_dataset(tmp_path, verify=True)
    ds = load_dataset(tmp_path)  # header-only load succeeds, the read fails with the file named
    with pytest.raises(DataError, match=r"images/a\.png"):
        ds.sample("a", 255)
    with pytest.warns(UserWarning):
        ds = load_dataset(tmp_path, strict=False, verify=True)
    assert "a" not in ds.stems("train") and len(ds.skipped) == 1


def test_unreadable_image(tmp_path: Path) -> None:
    _documented(tmp_path, ["a", "b"])
    (tmp_path / "images" / "b.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"b\.png: unreadable"):
        load_dataset(tmp_path)


def test_mask_values_not_in_labels(tmp_path: Path) -> None:
    _documented(tmp_path, ["a", "b"])
    m = np.zeros((16, 20), np.uint8)
    m[0, 0] = 42
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    ds = load_dataset(tmp_path)
    with pytest.raises(DataError, match=r"a\.png: mask values \[42\] are not in labels \[255\]"):
        ds.sample("a", 255)
    with pytest.raises(DataError, match="42"):
        load_dataset(tmp_path, verify=True)


@pytest.mark.parametrize("stem", ["../evil", "sub/x", "a\\b", ".."])
def test_stem_with_path_separator(tmp_path: Path, stem: str) -> None:
    _documented(tmp_path, ["a", "b"])
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["splits"]["train"].append(stem)
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="invalid stem"):
        load_dataset(tmp_path)


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _documented(tmp_path, ["a", "b"])
    monkeypatch.setattr(dataset_mod, "MAX_PIXELS", 100)  # 20x16 = 320 pixels > 100
    with pytest.raises(DataError, match="decompression bomb"):
        load_dataset(tmp_path)


def test_bad_dataset_json(tmp_path: Path) -> None:
    _documented(tmp_path, ["a", "b"])
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: invalid JSON"):
        load_dataset(tmp_path)
    shutil.rmtree(tmp_path / "masks")
    with pytest.raises(DataError, match="missing masks/"):
        load_dataset(tmp_path)


# ----------------------------------------------------------------------------- transforms


def test_transforms_round_trip() -> None:
    mask = np.zeros((37, 50), bool)
    mask[10:30, 5:40] = True
    img = Image.fromarray((mask * 200).astype(np.uint8), mode="L")
    t = image_to_tensor(img, 32)
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1
    torch.testing.assert_close(t[0], t[1])  # grayscale replicated
    m = mask_to_tensor(mask, 32)
    assert m.shape == (1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    back = resize_prob(m[0].numpy(), mask.shape) > 0.5
    assert back.shape == mask.shape
    assert (back == mask).mean() > 0.97
    with pytest.raises(ValueError, match="zero size"):
        image_to_tensor(Image.new("RGB", (0, 5)), 32)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_tensor(np.zeros((0, 4)), 32)
