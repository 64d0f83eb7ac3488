"""Small real-format volume files written by the tests themselves (NIfTI, DICOM series, nnU-Net raw)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# A non-identity affine: axes permuted and flipped (data axis 0 runs posterior, 1 runs superior,
# 2 runs left), anisotropic spacing (0.8, 1.5, 4.0 mm), a small rotation and an origin shift.
_THETA = np.deg2rad(10.0)
_ROT = np.array([[np.cos(_THETA), -np.sin(_THETA), 0.0], [np.sin(_THETA), np.cos(_THETA), 0.0], [0.0, 0.0, 1.0]])
_PERM = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT @ _PERM @ np.diag([0.8, 1.5, 4.0])
AFFINE[:3, 3] = [12.5, -30.0, 7.25]
SHAPE = (24, 20, 9)


def phantom(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like image in HU (background -1000, body 40, 'organ' 200) and its label map (1 body, 2 organ)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = x**2 + y**2 < 0.7
    organ = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.12) & (np.abs(z) < 0.6)
    image = np.where(body, 40.0, -1000.0) + np.where(organ, 160.0, 0.0) + rng.normal(0, 5, shape)
    labels = body.astype(np.int16) + organ.astype(np.int16)
    return image.astype(np.float32), labels


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, dtype=None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype or np.asarray(data).dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_dicom_series(folder: Path, hu: np.ndarray, spacing=(0.7, 0.9), thickness: float = 2.5,
                       origin=(-100.0, -120.0, 50.0), series_uid: str | None = None, modality: str = "CT",
                       start: int = 0) -> list[Path]:
    """Write ``hu`` (rows, cols, slices) as an axial CT series (one file per slice, HU via rescale).

    ``spacing`` is DICOM's PixelSpacing (between rows, between columns); slices go +z (superior).
    Files are written in reverse order so readers must sort by position.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    paths = []
    for k in reversed(range(hu.shape[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{start + k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "0"
        ds.InstanceNumber = start + k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + (start + k) * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = hu.shape[0], hu.shape[1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = (np.round(hu[:, :, k]) + 1024).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_nnunet_raw(root: Path, cases_tr: int = 2, cases_ts: int = 1, labels_ts: bool = False) -> Path:
    """A two-case nnU-Net v2 raw dataset: dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/, imagesTs/."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(cases_tr + cases_ts):
        image, labels = phantom(seed=i)
        train = i < cases_tr
        case = f"phantom_{i:03d}"
        write_nifti(root / ("imagesTr" if train else "imagesTs") / f"{case}_0000.nii.gz", image)
        if train or labels_ts:
            write_nifti(root / ("labelsTr" if train else "labelsTs") / f"{case}.nii.gz", labels, dtype=np.uint8)
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "body": 1, "organ": 2},
            "numTraining": cases_tr, "file_ending": ".nii.gz", "name": "Phantom"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
