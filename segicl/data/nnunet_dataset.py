"""An nnU-Net v2 raw dataset folder read as a :class:`~segicl.data.dataset.SegDataset`: 2D slices on the fly.

    ds = load_dataset("~/nnUNet_raw/Dataset003_Liver")    # recognised by dataset.json + imagesTr/
    ds.tasks()                    # one binary task per non-background label of dataset.json
    ds.stems("test")              # "<case>_s<index>" for every slice of every test case
    ds.sample("liver_7_s042", "liver")     # 8-bit slice + binary mask; group = the case

So ``--data`` of ``segicl index build``, ``segicl evaluate`` and ``segicl train`` takes such a folder
as it is. Nothing is written: 3D cases are read when a slice of theirs is first needed (channel 0,
sliced along the lowest-resolution axis, windowed to 8 bits once per volume, exactly as
``segicl data convert`` does with its defaults), and the last :data:`CACHE_CASES` cases are kept in
memory, so reading the slices of a case one after another decodes the volume once.

Stems. 3D: ``<case>_s<index>`` for *every* slice along the axis (index in display order, see
:func:`segicl.volumes.canonical_slices`), slices without foreground included, as a 2D dataset keeps
images whose mask of a label is empty; a support is only drawn from slices that carry its label.
2D (PNG) nnU-Net data: one stem per case, the case name.

Splits, by case (a case never lands on both sides): labelled imagesTs cases (labelsTs/) are the test
split; the imagesTr cases are shuffled with seed 0 into val (20 %) and train, and, when there is no
labelled test case, 20 % of them (at least one) are held out as test first
(:meth:`~segicl.data.nnunet.NnUNetDataset.case_splits`). Empty splits are left out. A 2D dataset
converted by ``segicl data convert`` keeps the splits and groups recorded under dataset.json's
``"segicl"`` key. The same key may set ``"window"`` (a CT preset, ``"LEVEL,WIDTH"``, ``"percentile"``)
and ``"axis"`` for 3D data; nnU-Net ignores it.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segicl.data.dataset import DataError, Sample, SegDataset, open_image
from segicl.data.nnunet import NnUNetDataset, load_nnunet

CACHE_CASES = 4
"""Cases (decoded volumes as 8-bit slices) kept in memory per dataset."""

VAL_FRACTION = 0.2
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class _Case:
    images: list[Image.Image] | np.ndarray  # (N, H, W) uint8 slices, or one PIL image for 2D data
    labels: np.ndarray  # (N, H, W) uint8


@dataclass
class NnUNetSliceDataset(SegDataset):
    """An nnU-Net raw folder as a :class:`SegDataset` whose samples are slices (module docstring)."""

    source: NnUNetDataset | None = None
    axis: int | str | None = None  # slicing axis of 3D cases (None: each case's lowest-resolution axis)
    window: str | None = None  # 3D intensity window (None: percentile)
    cache_cases: int = CACHE_CASES
    slice_of: dict[str, tuple[str, int]] = field(default_factory=dict)  # stem -> (case, slice index)
    _case_stems: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _geometry: dict[str, tuple[tuple[int, int, int], np.ndarray, int]] = field(default_factory=dict, repr=False)
    _split_of: dict[str, str] = field(default_factory=dict, repr=False)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------------------ cases
    @property
    def is_volume(self) -> bool:
        """True for 3D cases (3D metrics apply); False for 2D (PNG) nnU-Net data."""
        return self.source is not None and not self.source.is_2d

    def case_of(self, stem: str) -> str:
        return self.slice_of[stem][0]

    def case_stems(self, case: str) -> list[str]:
        """All stems of ``case`` in slice order."""
        return list(self._case_stems[case])

    def case_spacing(self, case: str) -> tuple[float, float, float]:
        """Voxel size in mm along the data axes of a 3D case."""
        _, affine, _ = self._geometry[case]
        return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]

    def case_volume(self, case: str, slices: Sequence[np.ndarray]) -> np.ndarray:
        """Per-slice (H, W) arrays of a 3D case, in slice order, put back on its (X, Y, Z) voxel grid."""
        from segicl.volumes import stack_slices

        shape, affine, axis = self._geometry[case]
        if len(slices) != shape[axis]:
            raise ValueError(f"{case}: {len(slices)} slices given, the case has {shape[axis]}")
        return stack_slices(np.stack(slices), affine, axis)

    def _load_case(self, case: str) -> _Case:
        with self._lock:
            if case in self._cache:
                self._cache.move_to_end(case)
                return self._cache[case]
            c = self._read_case(case)
            self._cache[case] = c
            while len(self._cache) > max(1, int(self.cache_cases)):
                self._cache.popitem(last=False)
            for i, stem in enumerate(self._case_stems[case]):
                self._present[stem] = frozenset(int(v) for v in np.unique(c.labels[i]).tolist()) - {0}
            return c

    def _read_case(self, name: str) -> _Case:
        assert self.source is not None
        case = next(c for c in self.source.cases if c.name == name)
        if self.source.is_2d:
            img = open_image(case.images[0], mode=self.image_mode)
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            lab = np.asarray(open_image(case.label))
            if lab.ndim == 3:
                lab = lab[..., 0]
            if (lab.shape[1], lab.shape[0]) != img.size:
                raise DataError(f"{case.label}: label size {lab.shape[1]}x{lab.shape[0]} differs from image "
                                f"{case.images[0].name} size {img.size[0]}x{img.size[1]}")
            self._check_values(lab, case.label)
            return _Case([img], lab[None].astype(np.uint8))
        from segicl.volumes import (
            VolumeError,
            canonical_slices,
            label_slices,
            read_label_volume,
            read_volume,
            to_uint8,
            window_range,
        )

        try:
            vol = read_volume(case.images[0])
            lab = read_label_volume(case.label, like=vol, labels=self.labels)
        except VolumeError as exc:
            raise DataError(str(exc), exc.path) from exc
        shape, _, axis = self._geometry[name]
        if vol.shape != shape:
            raise DataError(f"{case.images[0]}: shape {vol.shape} differs from its header's {shape} (file changed?)")
        lo, hi = window_range(vol.data, self.window)
        images = canonical_slices(to_uint8(vol.data, lo, hi), vol.affine, axis)
        return _Case(images, label_slices(lab, axis).astype(np.uint8))

    def _check_values(self, lab: np.ndarray, path: Path | None) -> None:
        unknown = sorted(set(np.unique(lab).tolist()) - {0} - set(self.labels))
        if unknown:
            raise DataError(f"{path}: label values {unknown} are not in dataset.json labels {sorted(self.labels)}")

    # --------------------------------------------------------------------- SegDataset interface
    def split_of(self, stem: str) -> str:
        if stem not in self._split_of:
            raise KeyError(f"{self.root}: unknown stem {stem!r}")
        return self._split_of[stem]

    def read_label_map(self, stem: str) -> np.ndarray:
        case, i = self.slice_of[stem]
        return self._load_case(case).labels[i]

    def read_image(self, stem: str) -> Image.Image:
        case, i = self.slice_of[stem]
        images = self._load_case(case).images
        return images[i] if isinstance(images, list) else Image.fromarray(images[i])

    def image_sha256(self, stem: str) -> str:
        """SHA-256 of the slice as shown to the model (shape, mode and 8-bit pixels), not of the volume file."""
        img = self.read_image(stem)
        h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
        h.update(np.ascontiguousarray(np.asarray(img)).tobytes())
        return h.hexdigest()

    def sample(self, stem: str, label_value: int | str) -> Sample:
        value = self.label_value(label_value)
        if stem not in self.slice_of:
            raise KeyError(f"{self.root}: unknown stem {stem!r}")
        image = self.read_image(stem)
        mask = self.read_label_map(stem) == value
        return Sample(image=image, mask=mask, dataset=self.name, label=self.labels[value], label_value=value,
                      modality=self.modality, stem=stem, group=self.group(stem), split=self.split_of(stem),
                      image_path=self.image_paths[stem], mask_path=self.mask_paths[stem],
                      instruction=self.instruction(value))

    def verify(self, strict: bool = True) -> None:
        """Read every case (files, grids, label values); drop a bad case's slices unless ``strict``."""
        for case in list(self._case_stems):
            try:
                self._load_case(case)
            except DataError as exc:
                if strict:
                    raise
                for stem in self._case_stems.pop(case):
                    self._drop(stem, exc.path, str(exc))
                    self.slice_of.pop(stem, None)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no lock, no decoded volumes
        state = dict(self.__dict__)
        state["_lock"], state["_cache"] = None, OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def load_nnunet_slices(path: str | Path, axis: int | str | None = None, window: str | None = None,
                       cache_cases: int = CACHE_CASES) -> NnUNetSliceDataset:
    """Read an nnU-Net v2 raw folder as a slice dataset (module docstring). Voxels are read lazily;
    NIfTI headers are read now to count each case's slices.

    Args:
        path: the raw dataset folder.
        axis: slicing axis of 3D cases; None: dataset.json's ``segicl.axis``, else each case's
            lowest-resolution axis.
        window: 3D intensity window; None: dataset.json's ``segicl.window``, else percentile.
        cache_cases: decoded cases kept in memory.

    Raises:
        DataError: what :func:`~segicl.data.nnunet.load_nnunet` refuses, label values above 255,
            an unreadable header.
    """
    from segicl.volumes import VolumeError, read_geometry, slice_axis

    src = load_nnunet(path)
    meta_path = src.root / "dataset.json"
    seg = src.meta.get("segicl") or {}
    if any(v > 255 for v in src.labels):
        raise DataError(f"{meta_path}: label values above 255 do not fit 8-bit label maps")
    axis = axis if axis is not None else seg.get("axis")
    window = window if window is not None else seg.get("window")
    if not src.is_2d and any(len(c.images) > 1 for c in src.cases):
        warnings.warn(f"{src.root}: {len(src.cases[0].images)} channels per case; slices show channel 0", stacklevel=2)
    if src.is_2d and seg.get("splits"):
        splits = {str(s): [str(x) for x in v] for s, v in seg["splits"].items()}
    else:
        splits = src.case_splits(VAL_FRACTION, SPLIT_SEED, test_fraction=TEST_FRACTION)
    splits = {s: v for s, v in splits.items() if v}
    cases = {c.name: c for c in src.cases}
    ds = NnUNetSliceDataset(root=src.root, name=src.name, modality=src.modality, labels=dict(src.labels), splits={},
                            image_mode="L" if not src.is_2d else seg.get("image_mode"),
                            description=str(src.meta.get("description", "")), source=src, axis=axis, window=window,
                            cache_cases=cache_cases)
    for split, names in splits.items():
        ds.splits[split] = []
        for name in names:
            if name not in cases or cases[name].label is None:
                raise DataError(f"{meta_path}: split {split!r} names {name!r}, not a labelled case")
            case = cases[name]
            if src.is_2d:
                stems = [name]
                group = str((seg.get("groups") or {}).get(name, name))
            else:
                try:
                    shape, affine = read_geometry(case.images[0])
                    ax = slice_axis(affine, axis)
                except VolumeError as exc:
                    raise DataError(str(exc), exc.path) from exc
                except ValueError as exc:  # a bad axis
                    raise DataError(f"{meta_path}: {exc}") from exc
                ds._geometry[name] = (shape, affine, ax)
                width = max(3, len(str(shape[ax] - 1)))
                stems = [f"{name}_s{i:0{width}d}" for i in range(shape[ax])]
                group = name
            ds._case_stems[name] = stems
            for i, stem in enumerate(stems):
                ds.slice_of[stem] = (name, i)
                ds.groups[stem] = group
                ds.image_paths[stem] = case.images[0]
                ds.mask_paths[stem] = case.label
                ds._split_of[stem] = split
            ds.splits[split] += stems
    if not ds.slice_of:
        raise DataError(f"{src.root}: no labelled cases")
    return ds
