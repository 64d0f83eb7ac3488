"""3D medical volumes in and out: NIfTI, DICOM series, MetaImage / NRRD; windowing; slicing.

    vol = read_volume("ct.nii.gz")                  # or a DICOM series folder, .mha, .mhd, .nrrd
    vol.data.shape, vol.spacing                     # (X, Y, Z) float32, mm per voxel along each axis
    axis = vol.slice_axis()                         # default: the lowest-resolution axis
    images = volume_slices(vol, axis, window="abdomen")   # 8-bit PIL slices, display orientation
    labels = read_label_volume("labels.nii.gz", like=vol) # integer map, same grid, checked
    write_like(vol, mask_zyx_stack, "ct_mask.nii.gz")     # label map with the input's affine and header

Geometry. ``data`` is in the file's own voxel order, the one nibabel uses (``X, Y, Z``; DICOM and
ITK files are transposed to it) and ``affine`` maps voxel indices to RAS+ millimetres (nibabel's
convention; DICOM and ITK's LPS is converted). Output label maps are written on exactly the input's
voxel grid with its affine; for NIfTI input the header is copied too (sform/qform codes, pixdim,
units), so a viewer overlays the mask on the input without resampling.

Slices. To show the model slices the way 2D training images look, slicing works on the volume
reoriented to the closest canonical (RAS) axis order (a transpose and flips only, no resampling;
``nibabel.orientations``) and each slice is displayed radiologically: superior / anterior at the
top, the patient's right on the image's left. :func:`stack_slices` inverts both exactly.

Windowing (to 8 bits, one mapping for the whole volume so slices agree): CT presets in Hounsfield
units (:data:`CT_WINDOWS`), an explicit ``"level,width"``, or percentile normalisation
(0.5-99.5 %, the default, suited to MRI and anything without calibrated units).

Every bad input raises :class:`VolumeError` whose message starts with the file and says the problem
(unreadable or truncated, 4D, non-uniform DICOM slice spacing, several DICOM series in one folder,
shape / affine mismatch between an image and its labels, unknown label values).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

NIFTI_EXTS = (".nii", ".nii.gz")
ITK_EXTS = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_EXTS = NIFTI_EXTS + ITK_EXTS
"""File endings read as volumes (a folder is read as a DICOM series)."""

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
"""CT window presets: name -> (level, width) in Hounsfield units."""

PERCENTILES = (0.5, 99.5)
"""Intensity percentiles mapped to 0 and 255 by the ``"percentile"`` window."""

AFFINE_ATOL = 1e-3
"""Largest difference (mm) between two affines' entries that still counts as the same grid."""


class VolumeError(ValueError):
    """A volume file is missing, unreadable or inconsistent. The message starts with the path."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


@dataclass
class Volume:
    """A 3D image on a voxel grid.

    Attributes:
        data: (X, Y, Z) array in the file's voxel order; float32 intensities (scaling applied,
            DICOM rescaled to Hounsfield units for CT) or an integer label map.
        affine: (4, 4) voxel index -> RAS+ mm.
        path: the file or DICOM folder read.
        header: the NIfTI header when read from NIfTI (copied into outputs), else None.
        modality: "CT", "MR", ... from DICOM; "" when the file does not say.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    header: Any = None
    modality: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each data axis (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def stem(self) -> str:
        return volume_stem(self.path)

    def slice_axis(self, axis: int | str | None = None) -> int:
        """The data axis to slice along: ``None`` -> the largest spacing (lowest resolution; ties go
        to the last such axis), an int 0-2, or "axial" / "coronal" / "sagittal" (by orientation)."""
        return slice_axis(self.affine, axis)


# ----------------------------------------------------------------------------------------- names
def volume_stem(path: str | Path) -> str:
    """``ct.nii.gz`` -> ``ct``; ``case_0000.nii.gz`` -> ``case_0000``; a DICOM folder -> its name."""
    name = Path(path).name
    for ext in VOLUME_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def is_volume_path(path: str | Path) -> bool:
    """True for a volume file ending (:data:`VOLUME_EXTS`) or a folder (read as a DICOM series)."""
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(VOLUME_EXTS)


# --------------------------------------------------------------------------------------- reading
def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI file, a DICOM series folder, or a MetaImage / NRRD file (needs SimpleITK).

    Raises:
        VolumeError: missing, unreadable or truncated, not 3D, or (DICOM) several series, mixed
            slice sizes or non-uniform slice spacing.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(p, "file not found")
    if p.is_dir():
        return _read_dicom_series(p)
    name = p.name.lower()
    if name.endswith(NIFTI_EXTS):
        return _read_nifti(p)
    if name.endswith(ITK_EXTS):
        return _read_itk(p)
    raise VolumeError(p, f"unknown volume format (expected {', '.join(VOLUME_EXTS)} or a DICOM folder)")


def read_geometry(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of a volume as :func:`read_volume` would give them; NIfTI from the header
    alone (no voxels decoded), other formats by reading the volume.

    Raises:
        VolumeError: missing, unreadable, or not 3D.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file() or not p.name.lower().endswith(NIFTI_EXTS):
        vol = read_volume(p)
        return vol.shape, vol.affine
    try:
        img = nib.load(str(p))
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel's ImageFileError, EOFError, OSError ...
        raise VolumeError(p, f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from exc
    if len(shape) == 2:
        shape = (*shape, 1)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(p, f"{len(shape)}D image of shape {shape}; only 3D volumes are supported "
                             "(split a 4D series into 3D files first)")
    if 0 in shape:
        raise VolumeError(p, f"empty volume of shape {shape}")
    return shape, affine  # type: ignore[return-value]


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 2:
        data = data[..., None]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(path, f"{data.ndim}D image of shape {data.shape}; only 3D volumes are supported "
                                "(split a 4D series into 3D files first)")
    if 0 in data.shape:
        raise VolumeError(path, f"empty volume of shape {data.shape}")
    return data


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) > 3 and any(n != 1 for n in shape[3:]):
            raise VolumeError(path, f"{len(shape)}D image of shape {shape}; only 3D volumes are supported "
                                    "(split a 4D series into 3D files first)")
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except VolumeError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib.error, OSError, ValueError ...
        raise VolumeError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    data = _as_3d(data, path)
    if not np.isfinite(data).all():
        raise VolumeError(path, "contains NaN or infinite values")
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), path=path, header=img.header)


def _read_itk(path: Path) -> Volume:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise VolumeError(path, "reading .mha/.mhd/.nrrd needs SimpleITK (pip install SimpleITK)") from exc
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)  # (Z, Y, X)
    except Exception as exc:  # SimpleITK raises RuntimeError on bad files
        raise VolumeError(path, f"unreadable image ({type(exc).__name__}: {str(exc).strip().splitlines()[-1]})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(path, f"{img.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume")
    if img.GetDimension() not in (2, 3):
        raise VolumeError(path, f"{img.GetDimension()}D image; only 3D volumes are supported")
    data = _as_3d(np.asarray(arr, dtype=np.float32).T, path)  # -> (X, Y, Z)
    ndim = img.GetDimension()
    lps = np.eye(4)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    lps[:ndim, :ndim] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)[None, :]
    lps[:ndim, 3] = img.GetOrigin()
    return Volume(data=data, affine=_lps_to_ras(lps), path=path)


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_dicom_series(folder: Path) -> Volume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    series: dict[str, list[Any]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM (a readme, a DICOMDIR's companion files)
        except Exception as exc:
            raise VolumeError(f, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
        if "ImagePositionPatient" not in ds or "PixelSpacing" not in ds:
            continue  # DICOMDIR, presentation states, reports: no image geometry
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if not series:
        raise VolumeError(folder, "no DICOM images with geometry (ImagePositionPatient, PixelSpacing) found")
    if len(series) > 1:
        desc = ", ".join(f"{uid or '?'} ({len(v)} files)" for uid, v in sorted(series.items()))
        raise VolumeError(folder, f"holds {len(series)} DICOM series ({desc}); put each series in its own folder")
    (items,) = series.values()
    ds0 = items[0][1]
    orient = np.asarray(ds0.ImageOrientationPatient, dtype=np.float64) if "ImageOrientationPatient" in ds0 \
        else np.array([1.0, 0, 0, 0, 1, 0])
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    for f, ds in items:
        if "ImageOrientationPatient" in ds and not np.allclose(np.asarray(ds.ImageOrientationPatient, float), orient, atol=1e-4):
            raise VolumeError(f, "image orientation differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != (int(ds0.Rows), int(ds0.Columns)):
            raise VolumeError(f, f"slice size {ds.Columns}x{ds.Rows} differs from {ds0.Columns}x{ds0.Rows} of {items[0][0].name}")
    items.sort(key=lambda it: float(np.dot(np.asarray(it[1].ImagePositionPatient, float), normal)))
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in items])
    depth = pos @ normal
    if len(items) > 1:
        gaps = np.diff(depth)
        if np.any(gaps < 1e-6):
            f = items[int(np.argmin(gaps)) + 1][0]
            raise VolumeError(f, "two slices share one position (a duplicate file or a second acquisition)")
        if gaps.max() - gaps.min() > max(0.01 * gaps.mean(), 1e-3):
            raise VolumeError(folder, f"non-uniform slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm): "
                                      "missing slices or a partial series")
        step = (pos[-1] - pos[0]) / (len(items) - 1)
    else:
        step = normal * float(ds0.get("SliceThickness", 1.0) or 1.0)
    d_row, d_col = (float(x) for x in ds0.PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_dir * d_col  # data axis 0: along a row (column index)
    lps[:3, 1] = col_dir * d_row  # data axis 1: down a column (row index)
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    slices = []
    for f, _ in items:
        try:
            ds = pydicom.dcmread(f)
            arr = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise VolumeError(f, f"unreadable or truncated DICOM pixel data ({type(exc).__name__}: {exc})") from exc
        if arr.ndim != 2:
            raise VolumeError(f, f"pixel data of shape {arr.shape}; expected one grayscale slice per file")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(arr * slope + intercept)
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, Z) -> (X=cols, Y=rows, Z)
    return Volume(data=np.ascontiguousarray(data), affine=_lps_to_ras(lps), path=folder,
                  modality=str(ds0.get("Modality", "")), meta={"series_uid": str(ds0.get("SeriesInstanceUID", ""))})


def read_label_volume(path: str | Path, like: Volume | None = None, labels: Iterable[int] | None = None) -> Volume:
    """Read an integer label map; check it against its image and the allowed label values.

    Args:
        path: label file (any format :func:`read_volume` reads).
        like: the image it labels: shapes must match and affines agree within :data:`AFFINE_ATOL`.
        labels: allowed non-zero values (e.g. from a dataset.json); any other value is an error.

    Returns:
        The label volume with ``data`` as int16 (X, Y, Z).
    """
    vol = read_volume(path)
    data = vol.data
    if not np.array_equal(data, np.round(data)) or data.min() < 0:
        raise VolumeError(vol.path, "not a label map: values must be non-negative integers")
    if data.max() > np.iinfo(np.int16).max:
        raise VolumeError(vol.path, f"label value {int(data.max())} is too large")
    vol.data = data.astype(np.int16)
    if like is not None:
        check_same_grid(like, vol)
    if labels is not None:
        unknown = sorted(set(np.unique(vol.data).tolist()) - {0} - {int(v) for v in labels})
        if unknown:
            raise VolumeError(vol.path, f"label values {unknown} are not among the known labels {sorted(int(v) for v in labels)}")
    return vol


def check_same_grid(image: Volume, labels: Volume) -> None:
    """Raise :class:`VolumeError` (naming the label file) unless both volumes share one voxel grid."""
    if image.shape != labels.shape:
        raise VolumeError(labels.path, f"shape {labels.shape} differs from image {image.path.name} shape {image.shape}")
    diff = float(np.abs(image.affine - labels.affine).max())
    if diff > AFFINE_ATOL:
        raise VolumeError(labels.path, f"affine differs from image {image.path.name} by up to {diff:.4g} mm "
                                       "(different orientation, origin or spacing)")


# --------------------------------------------------------------------------------------- slicing
_AXIS_NAMES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS axis each plane is normal to


def slice_axis(affine: np.ndarray, axis: int | str | None = None) -> int:
    """Data axis to slice along (see :meth:`Volume.slice_axis`)."""
    import nibabel as nib

    if axis is None or axis == "auto":
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        return int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))[-1])
    if isinstance(axis, str) and axis.isdigit():
        axis = int(axis)
    if isinstance(axis, int):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        return axis
    if axis not in _AXIS_NAMES:
        raise ValueError(f"axis must be 0, 1, 2, auto, axial, coronal or sagittal, got {axis!r}")
    ornt = nib.orientations.io_orientation(affine)  # per data axis: (RAS axis, flip)
    return int(np.flatnonzero(ornt[:, 0] == _AXIS_NAMES[axis])[0])


def _to_canonical(affine: np.ndarray) -> np.ndarray:
    """The ``nibabel.orientations`` transform from the data's axis order to the closest RAS one."""
    import nibabel as nib

    return nib.orientations.io_orientation(affine)


def _display_axis(affine: np.ndarray, axis: int) -> int:
    return int(_to_canonical(affine)[axis, 0])


def canonical_slices(data: np.ndarray, affine: np.ndarray, axis: int) -> np.ndarray:
    """Slices along data ``axis`` in display orientation.

    Args:
        data: (X, Y, Z) array.
        affine: its (4, 4) voxel -> RAS affine.
        axis: data axis to slice along.

    Returns:
        (N, H, W) array, N = ``data.shape[axis]`` in the data's own slice order; each slice with
        superior (or anterior, for axial slices) at the top and the patient's right on the left.
    """
    import nibabel as nib

    ornt = _to_canonical(affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    c = int(ornt[axis, 0])
    ras = np.moveaxis(ras, c, 0)  # (N, a, b), a < b in RAS order
    if ornt[axis, 1] < 0:
        ras = ras[::-1]  # back to the data's slice order
    return np.ascontiguousarray(ras.transpose(0, 2, 1)[:, ::-1, ::-1])


def stack_slices(slices: np.ndarray | Sequence[np.ndarray], affine: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`canonical_slices`: (N, H, W) display slices -> the (X, Y, Z) data grid."""
    import nibabel as nib

    ornt = _to_canonical(affine)
    arr = np.asarray(slices)[:, ::-1, ::-1].transpose(0, 2, 1)
    c = int(ornt[axis, 0])
    if ornt[axis, 1] < 0:
        arr = arr[::-1]
    ras = np.moveaxis(arr, 0, c)
    inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, inverse))


# ------------------------------------------------------------------------------------- windowing
def window_range(data: np.ndarray, window: str | tuple[float, float] | None = None) -> tuple[float, float]:
    """Intensity range ``(low, high)`` mapped to 0 and 255.

    Args:
        data: the whole volume (one range for all its slices).
        window: a :data:`CT_WINDOWS` name (Hounsfield units), ``"level,width"``, a (level, width)
            tuple, or ``None`` / ``"percentile"`` for the :data:`PERCENTILES` of the volume.
    """
    if window is None or window in ("percentile", "auto"):
        lo, hi = (float(v) for v in np.percentile(data, PERCENTILES))
    else:
        if isinstance(window, str):
            if window.lower() in CT_WINDOWS:
                level, width = CT_WINDOWS[window.lower()]
            else:
                try:
                    level, width = (float(x) for x in window.split(","))
                except ValueError:
                    raise ValueError(f"window must be one of {sorted(CT_WINDOWS)}, percentile or LEVEL,WIDTH; "
                                     f"got {window!r}") from None
        else:
            level, width = (float(x) for x in window)
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        lo, hi = level - width / 2, level + width / 2
    if hi <= lo:
        hi = lo + 1.0  # constant volume: everything maps to 0
    return lo, hi


def to_uint8(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``[low, high]`` to ``[0, 255]``, clipped, rounded to uint8."""
    scaled = (np.asarray(data, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def volume_slices(vol: Volume, axis: int | None = None, window: str | tuple[float, float] | None = None) -> list[Image.Image]:
    """The volume as 8-bit grayscale PIL slices (display orientation, see :func:`canonical_slices`)."""
    axis = vol.slice_axis(axis)
    lo, hi = window_range(vol.data, window)
    return [Image.fromarray(s) for s in canonical_slices(to_uint8(vol.data, lo, hi), vol.affine, axis)]


def label_slices(labels: Volume, axis: int) -> np.ndarray:
    """(N, H, W) integer label slices matching :func:`volume_slices` of the image on the same grid."""
    return canonical_slices(labels.data, labels.affine, axis)


def support_slices(image: Volume, labels: Volume, label: int, k: int, axis: int | None = None,
                   window: str | tuple[float, float] | None = None) -> list[tuple[Image.Image, np.ndarray, int]]:
    """``k`` support pairs from a labelled volume: slices where ``label`` is present, spread evenly
    over its extent (the first and last such slice included when ``k >= 2``).

    Returns:
        ``[(image, mask, index)]``: 8-bit PIL slice, (H, W) bool mask, slice index along ``axis``.

    Raises:
        VolumeError: ``label`` does not occur in the label volume.
    """
    axis = image.slice_axis(axis)
    lab = label_slices(labels, axis) == int(label)
    present = np.flatnonzero(lab.reshape(len(lab), -1).any(1))
    if present.size == 0:
        found = sorted(set(np.unique(labels.data).tolist()) - {0})
        raise VolumeError(labels.path, f"label {label} does not occur (values present: {found})")
    if k <= 0:
        return []
    picks = present[np.unique(np.round(np.linspace(0, present.size - 1, min(k, present.size))).astype(int))]
    lo, hi = window_range(image.data, window)
    imgs = canonical_slices(to_uint8(image.data, lo, hi), image.affine, axis)
    return [(Image.fromarray(imgs[i]), lab[i], int(i)) for i in picks]


# --------------------------------------------------------------------------------------- writing
def write_like(ref: Volume, data: np.ndarray, path: str | Path, dtype: Any = np.uint8) -> Path:
    """Write ``data`` on ``ref``'s voxel grid as NIfTI, atomically (temporary file + ``os.replace``).

    Args:
        ref: the volume whose grid ``data`` lies on; its affine is written, and for NIfTI input a copy
            of its header (sform / qform and their codes, units, pixdim) with the data type changed.
        data: (X, Y, Z) array of ``ref.shape``.
        path: ``.nii.gz`` or ``.nii`` output.
        dtype: stored data type (uint8 for label maps, float32 for uncertainty).
    """
    import nibabel as nib

    from segicl.io import atomic_file

    path = Path(path)
    data = np.asarray(data)
    if data.shape != ref.shape:
        raise ValueError(f"{path}: data of shape {data.shape} is not on the grid of {ref.path} {ref.shape}")
    if not path.name.lower().endswith(NIFTI_EXTS):
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    if ref.header is not None and isinstance(ref.header, nib.Nifti1Header):
        header = ref.header.copy()
        img = nib.Nifti1Image(data.astype(dtype), ref.affine, header=header)
        img.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
        img.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
        if header.get_data_shape() != data.shape:  # a squeezed 4D / 2D input
            img.header.set_data_shape(data.shape)
    else:
        img = nib.Nifti1Image(data.astype(dtype), ref.affine)
        img.set_sform(ref.affine, code=1)  # scanner coordinates
        img.set_qform(ref.affine, code=1)
        img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))
    return path
