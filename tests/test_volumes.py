"""segicl.volumes: reading NIfTI / DICOM / ITK files, geometry round trips, slicing, windowing, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segicl import volumes as V
from tests.volume_files import AFFINE, SHAPE, phantom, write_dicom_series, write_nifti


@pytest.fixture()
def ct(tmp_path: Path) -> tuple[Path, Path]:
    image, labels = phantom()
    return write_nifti(tmp_path / "ct.nii.gz", image), write_nifti(tmp_path / "ct_labels.nii.gz", labels, dtype=np.uint8)


# ----------------------------------------------------------------------------------------- NIfTI
def test_nifti_read_keeps_data_affine_and_spacing(ct: tuple[Path, Path]) -> None:
    vol = V.read_volume(ct[0])
    assert vol.shape == SHAPE
    np.testing.assert_allclose(vol.data, phantom()[0], atol=1e-3)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)  # stored as float32 in the header
    np.testing.assert_allclose(vol.spacing, (0.8, 1.5, 4.0), atol=1e-5)
    assert vol.stem == "ct"
    assert vol.slice_axis() == 2  # 4 mm: the lowest resolution
    # by orientation: data axis 1 runs superior, 2 left-right, 0 anterior-posterior (see AFFINE)
    assert (vol.slice_axis("axial"), vol.slice_axis("sagittal"), vol.slice_axis("coronal")) == (1, 2, 0)


def test_label_map_written_like_the_input_round_trips_geometry_exactly(ct: tuple[Path, Path], tmp_path: Path) -> None:
    vol = V.read_volume(ct[0])
    labels = V.read_label_volume(ct[1], like=vol, labels=[1, 2])
    out = V.write_like(vol, labels.data, tmp_path / "out" / "ct_mask.nii.gz")
    back = nib.load(str(out))
    src = nib.load(str(ct[0]))
    assert np.array_equal(back.affine, src.affine)
    assert np.array_equal(back.header.get_sform(), src.header.get_sform())
    assert np.array_equal(back.header.get_qform(), src.header.get_qform())
    assert (int(back.header["sform_code"]), int(back.header["qform_code"])) == (2, 1)
    assert back.header.get_xyzt_units() == src.header.get_xyzt_units()
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(back.dataobj), labels.data)
    unc = V.write_like(vol, np.full(SHAPE, 0.25, np.float32), tmp_path / "u.nii.gz", dtype=np.float32)
    assert np.asarray(nib.load(str(unc)).dataobj).dtype == np.float32
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ct_mask.nii.gz"]  # no temporary left


def test_a_failed_write_leaves_nothing(ct: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = V.read_volume(ct[0])
    target = tmp_path / "out" / "mask.nii.gz"
    with pytest.raises(ValueError, match="not on the grid"):
        V.write_like(vol, np.zeros((2, 2, 2)), target)

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        V.write_like(vol, np.zeros(SHAPE), target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_stack_back_exactly(axis: int) -> None:
    data = np.random.default_rng(axis).integers(0, 100, SHAPE)
    slices = V.canonical_slices(data, AFFINE, axis)
    assert len(slices) == SHAPE[axis]
    assert np.array_equal(V.stack_slices(slices, AFFINE, axis), data)


def test_axial_slices_are_shown_radiologically() -> None:
    data = np.zeros((4, 5, 3))
    data[3, 4, 1] = 1  # most right-anterior voxel (RAS identity affine): x = right, y = anterior
    data[0, 0, 1] = 2  # most left-posterior
    s = V.canonical_slices(data, np.eye(4), axis=2)
    assert s.shape == (3, 5, 4)  # (N, rows = A->P, cols = R->L)
    assert s[1, 0, 0] == 1 and s[1, -1, -1] == 2


def test_slice_axis_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="axis must be"):
        V.slice_axis(AFFINE, "oblique")
    with pytest.raises(ValueError, match="axis must be"):
        V.slice_axis(AFFINE, 3)


# ------------------------------------------------------------------------------------- windowing
def test_ct_window_preset_maps_hounsfield_units() -> None:
    lo, hi = V.window_range(np.zeros(3), "abdomen")  # level 40, width 400
    assert (lo, hi) == (-160.0, 240.0)
    out = V.to_uint8(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), lo, hi)
    assert out.tolist() == [0, 0, 128, 255, 255]
    assert V.window_range(np.zeros(3), "50,100") == (0.0, 100.0)


def test_percentile_window_uses_the_whole_volume() -> None:
    data = np.arange(1001, dtype=np.float32)
    lo, hi = V.window_range(data, None)
    assert (lo, hi) == pytest.approx((5.0, 995.0))
    with pytest.raises(ValueError, match="window must be one of"):
        V.window_range(data, "soft")


def test_support_slices_come_from_slices_with_the_label(ct: tuple[Path, Path]) -> None:
    vol = V.read_volume(ct[0])
    labels = V.read_label_volume(ct[1], like=vol)
    pairs = V.support_slices(vol, labels, label=2, k=3, window="abdomen")
    present = [i for i in range(SHAPE[2]) if (labels.data[:, :, i] == 2).any()]
    idx = [i for _, _, i in pairs]
    assert idx[0] == present[0] and idx[-1] == present[-1] and len(idx) == 3
    for img, mask, i in pairs:
        assert img.mode == "L" and img.size == (mask.shape[1], mask.shape[0])
        assert mask.sum() == (labels.data[:, :, i] == 2).sum()
    with pytest.raises(V.VolumeError, match=r"ct_labels.nii.gz: label 5 does not occur \(values present: \[1, 2\]\)"):
        V.support_slices(vol, labels, label=5, k=3)


# ----------------------------------------------------------------------------------------- DICOM
def test_dicom_series_reads_hounsfield_units_and_geometry(tmp_path: Path) -> None:
    hu = np.round(phantom((12, 10, 5))[0])  # (rows, cols, slices)
    write_dicom_series(tmp_path / "series", hu, spacing=(0.7, 0.9), thickness=2.5, origin=(-100.0, -120.0, 50.0))
    vol = V.read_volume(tmp_path / "series")
    assert vol.modality == "CT" and vol.stem == "series"
    assert np.array_equal(vol.data, hu.transpose(1, 0, 2))  # (X = columns, Y = rows, Z)
    np.testing.assert_allclose(vol.spacing, (0.9, 0.7, 2.5))
    # LPS (-100, -120, 50) is RAS (100, 120, 50); columns run to patient left (-x in RAS), rows posterior
    expected = np.array([[-0.9, 0, 0, 100.0], [0, -0.7, 0, 120.0], [0, 0, 2.5, 50.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-9)
    out = V.write_like(vol, (vol.data > 0).astype(np.uint8), tmp_path / "mask.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, expected, atol=1e-4)
    assert int(back.header["sform_code"]) == 1


def test_dicom_folder_with_two_series_is_refused(tmp_path: Path) -> None:
    hu = np.zeros((4, 4, 2))
    write_dicom_series(tmp_path / "mixed", hu)
    write_dicom_series(tmp_path / "mixed", hu, start=10)
    with pytest.raises(V.VolumeError, match=r"mixed: holds 2 DICOM series .*put each series in its own folder"):
        V.read_volume(tmp_path / "mixed")


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path) -> None:
    paths = write_dicom_series(tmp_path / "gap", np.zeros((4, 4, 5)))
    paths[2].unlink()
    with pytest.raises(V.VolumeError, match="gap: non-uniform slice spacing .*missing slices"):
        V.read_volume(tmp_path / "gap")


def test_dicom_with_truncated_pixel_data_is_refused(tmp_path: Path) -> None:
    paths = write_dicom_series(tmp_path / "cut", np.zeros((8, 8, 3)))
    paths[1].write_bytes(paths[1].read_bytes()[:-50])
    with pytest.raises(V.VolumeError, match=rf"{paths[1].name}: unreadable or truncated DICOM pixel data"):
        V.read_volume(tmp_path / "cut")


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(V.VolumeError, match="notes: no DICOM images"):
        V.read_volume(tmp_path / "notes")


# ------------------------------------------------------------------------------------ bad inputs
def test_truncated_nifti_is_refused(ct: tuple[Path, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(ct[0].read_bytes()[:600])
    with pytest.raises(V.VolumeError, match=r"cut.nii.gz: unreadable or truncated NIfTI"):
        V.read_volume(cut)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti file at all")
    with pytest.raises(V.VolumeError, match=r"junk.nii: unreadable or truncated NIfTI"):
        V.read_volume(junk)


def test_4d_nifti_is_refused_but_a_trailing_singleton_is_squeezed(tmp_path: Path) -> None:
    with pytest.raises(V.VolumeError, match=r"4d.nii.gz: 4D image of shape \(4, 4, 3, 2\)"):
        V.read_volume(write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 3, 2), np.float32)))
    assert V.read_volume(write_nifti(tmp_path / "3d1.nii.gz", np.zeros((4, 4, 3, 1), np.float32))).shape == (4, 4, 3)


def test_label_volume_checks(ct: tuple[Path, Path], tmp_path: Path) -> None:
    vol = V.read_volume(ct[0])
    labels = phantom()[1]
    small = write_nifti(tmp_path / "small.nii.gz", labels[:-1], dtype=np.uint8)
    with pytest.raises(V.VolumeError, match=r"small.nii.gz: shape \(23, 20, 9\) differs from image ct.nii.gz shape \(24, 20, 9\)"):
        V.read_label_volume(small, like=vol)
    moved = AFFINE.copy()
    moved[0, 3] += 2.0
    shifted = write_nifti(tmp_path / "shifted.nii.gz", labels, affine=moved, dtype=np.uint8)
    with pytest.raises(V.VolumeError, match=r"shifted.nii.gz: affine differs from image ct.nii.gz by up to 2 mm"):
        V.read_label_volume(shifted, like=vol)
    with pytest.raises(V.VolumeError, match=r"ct_labels.nii.gz: label values \[2\] are not among the known labels \[1\]"):
        V.read_label_volume(ct[1], like=vol, labels=[1])
    with pytest.raises(V.VolumeError, match=r"ct.nii.gz: not a label map"):
        V.read_label_volume(ct[0])


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(V.VolumeError, match=r"nothere.nii.gz: file not found"):
        V.read_volume(tmp_path / "nothere.nii.gz")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(V.VolumeError, match=r"a.png: unknown volume format"):
        V.read_volume(tmp_path / "a.png")


def test_gzip_member_cut_mid_data(ct: tuple[Path, Path], tmp_path: Path) -> None:
    raw = gzip.decompress(ct[0].read_bytes())
    part = tmp_path / "part.nii.gz"
    part.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a valid gzip of half the voxels
    with pytest.raises(V.VolumeError, match=r"part.nii.gz: unreadable or truncated NIfTI"):
        V.read_volume(part)


# ---------------------------------------------------------------------------------- MetaImage / NRRD
@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_itk_formats_agree_with_nifti_geometry(tmp_path: Path, ext: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(phantom()[0].transpose(2, 1, 0))  # SimpleITK arrays are (Z, Y, X)
    image.SetSpacing((0.8, 1.5, 4.0))
    image.SetOrigin((12.5, -30.0, 7.25))
    image.SetDirection((0.0, -1.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / f"v{ext}"))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))  # ITK converts LPS to the NIfTI's RAS itself
    itk_vol, nii_vol = V.read_volume(tmp_path / f"v{ext}"), V.read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(itk_vol.affine, nii_vol.affine, atol=1e-4)
    assert np.array_equal(itk_vol.data, nii_vol.data)
