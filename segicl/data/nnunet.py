"""nnU-Net v2 raw dataset folders: read them, and convert to and from the project's 2D layout.

nnU-Net v2 raw layout (https://github.com/MIC-DKFZ/nnUNet, documentation/dataset_format.md)::

    DatasetXXX_Name/dataset.json     channel_names {"0": "CT"}, labels {"background": 0, "liver": 1},
                                     numTraining, file_ending ".nii.gz" (or ".png" for 2D data)
    DatasetXXX_Name/imagesTr/<case>_0000<file_ending>   one file per channel (_0000, _0001, ...)
    DatasetXXX_Name/labelsTr/<case><file_ending>        integer label map on the image's grid
    DatasetXXX_Name/imagesTs/<case>_0000<file_ending>   test images (labelsTs/ is optional)

:func:`load_nnunet` maps the labels to binary tasks (one per non-background label) and lists cases;
:meth:`NnUNetDataset.case_splits` splits training cases into train / val by case (a case never lands
on both sides). :func:`nnunet_to_2d` slices 3D cases (channel 0, along the lowest-resolution axis,
windowed to 8 bits by :mod:`segicl.volumes`) into the 2D layout of ``../shared/data/README.md``
with ``groups`` = case; :func:`to_nnunet` writes a 2D dataset as a 2D (PNG) nnU-Net raw dataset with
consecutive label values, keeping the original values, splits and groups under a ``"segicl"`` key of
dataset.json (nnU-Net ignores it), so converting back gives the original dataset.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segicl.data.dataset import DataError, Task, _read_json, load_dataset, open_image

IMAGE_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff")


@dataclass
class NnUNetCase:
    """One case: its channel files, its label file (None for unlabelled test cases), its split."""

    name: str
    images: list[Path]  # channel 0, 1, ...
    label: Path | None
    split: str  # "train" (imagesTr) or "test" (imagesTs)


@dataclass
class NnUNetDataset:
    root: Path
    name: str
    modality: str  # channel_names["0"], e.g. "CT"
    labels: dict[int, str]  # non-background label value -> name
    file_ending: str
    cases: list[NnUNetCase] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def is_2d(self) -> bool:
        return self.file_ending.lower() in IMAGE_2D_ENDINGS

    def tasks(self) -> list[Task]:
        """One binary task per non-background label, in value order."""
        return [Task(self.name, v, n, self.modality) for v, n in sorted(self.labels.items())]

    def case_splits(self, val_fraction: float = 0.2, seed: int = 0, test_fraction: float = 0.0) -> dict[str, list[str]]:
        """Case names per split: labelled imagesTr cases shuffled by ``seed`` into train / val
        (at least one val case when there are two or more), labelled imagesTs cases as test.

        ``test_fraction`` > 0 holds that share of the imagesTr cases out as test (at least one
        when there are two or more) when no imagesTs case has labels; val then takes its share
        (``val_fraction`` of all imagesTr cases) from the rest, leaving train at least one case.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        tr = sorted(c.name for c in self.cases if c.split == "train")
        test = sorted(c.name for c in self.cases if c.split == "test" and c.label is not None)
        random.Random(seed).shuffle(tr)
        n_test = 0
        if test_fraction > 0 and not test:
            n_test = round(len(tr) * test_fraction)
            if n_test == 0 and len(tr) >= 2:
                n_test = 1
            test = sorted(tr[:n_test])
        rest = len(tr) - n_test
        n_val = round(len(tr) * val_fraction)
        if val_fraction > 0 and n_val == 0 and rest >= 2:
            n_val = 1
        n_val = max(0, min(n_val, rest - 1))
        return {"train": sorted(tr[n_test + n_val:]), "val": sorted(tr[n_test:n_test + n_val]), "test": test}


def is_nnunet_raw(path: str | Path) -> bool:
    """True for a folder with an nnU-Net dataset.json (``channel_names``) and imagesTr/."""
    p = Path(path)
    if not (p / "dataset.json").is_file() or not (p / "imagesTr").is_dir():
        return False
    try:
        return "channel_names" in json.loads((p / "dataset.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_nnunet(path: str | Path) -> NnUNetDataset:
    """Read an nnU-Net v2 raw dataset folder's dataset.json and file lists (not the voxels).

    Raises:
        DataError: a missing key, region-based labels, a case missing a channel or its label file,
            a label file without an image.
    """
    root = Path(path)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found (not an nnU-Net raw dataset folder)")
    meta = _read_json(meta_path)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DataError(f"{meta_path}: missing key {key!r} (nnU-Net v2 dataset.json)")
    labels: dict[int, str] = {}
    for name, value in meta["labels"].items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{meta_path}: label {name!r} is region-based ({value}); only plain label values are supported")
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{meta_path}: label {name!r} has a non-integer value {value!r}") from None
        if v < 0:
            raise DataError(f"{meta_path}: label {name!r} has a negative value {v}")
        if v:
            labels[v] = str(name)
    if not labels:
        raise DataError(f"{meta_path}: no labels besides background")
    channels = sorted(int(c) for c in meta["channel_names"])
    ending = str(meta["file_ending"])
    ds = NnUNetDataset(root=root, name=str(meta.get("name") or root.name),
                       modality=str(meta["channel_names"].get("0", next(iter(meta["channel_names"].values()), ""))),
                       labels=labels, file_ending=ending, meta=meta)
    for split, images_dir, labels_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        folder = root / images_dir
        if not folder.is_dir():
            if split == "train":
                raise DataError(f"{folder}: missing")
            continue
        first = f"_0000{ending}"
        names = sorted(p.name[: -len(first)] for p in folder.iterdir() if p.name.endswith(first) and not p.name.startswith("."))
        for case in names:
            files = [folder / f"{case}_{c:04d}{ending}" for c in channels]
            if ds.is_2d:  # an RGB PNG is one _0000 file holding channels R, G, B (nnU-Net's NaturalImage2DIO)
                files = [f for f in files if f.is_file()]
            for f in files:
                if not f.is_file():
                    raise DataError(f"{f}: channel file missing for case {case!r} ({len(channels)} channels in dataset.json)")
            label = root / labels_dir / f"{case}{ending}"
            if not label.is_file():
                if split == "train":
                    raise DataError(f"{label}: label file missing for training case {case!r}")
                label = None
            ds.cases.append(NnUNetCase(case, files, label, split))
        labels_folder = root / labels_dir
        if labels_folder.is_dir():
            for p in sorted(labels_folder.iterdir()):
                if p.name.endswith(ending) and p.name[: -len(ending)] not in names:
                    raise DataError(f"{p}: label file without an image in {images_dir}/")
    if not any(c.split == "train" for c in ds.cases):
        raise DataError(f"{root / 'imagesTr'}: no cases ending in _0000{ending}")
    n = meta.get("numTraining")
    n_tr = sum(c.split == "train" for c in ds.cases)
    if n is not None and int(n) != n_tr:
        warnings.warn(f"{meta_path}: numTraining is {n} but imagesTr holds {n_tr} cases", stacklevel=2)
    return ds


# ------------------------------------------------------------------------------------ conversion
def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def nnunet_to_2d(src: str | Path, out: str | Path, axis: int | str | None = None, window: str | None = None,
                 keep_empty: bool = False, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Convert an nnU-Net raw dataset to the project's 2D layout (written atomically).

    3D cases are sliced along ``axis`` (default: each case's lowest-resolution axis) into stems
    ``<case>_s<index>``, channel 0 only, windowed by ``window`` (:func:`segicl.volumes.window_range`);
    slices without any label are left out unless ``keep_empty``. 2D (PNG) datasets are copied.

    Returns:
        ``out``.
    """
    from segicl.io import atomic_directory
    from segicl.volumes import VolumeError, label_slices, read_label_volume, read_volume, volume_slices

    ds = load_nnunet(src)
    seg = ds.meta.get("segicl") or {}
    back = {int(k): int(v) for k, v in (seg.get("label_values") or {}).items()}  # nnU-Net value -> original
    if any(v > 255 for v in ds.labels) and not back:
        raise DataError(f"{ds.root / 'dataset.json'}: label values above 255 do not fit the 8-bit masks of the 2D layout")
    if any(len(c.images) > 1 for c in ds.cases):
        warnings.warn(f"{ds.root}: {len(ds.cases[0].images)} channels per case; the 2D layout keeps channel 0", stacklevel=2)
    case_split = {c: s for s, cases in ds.case_splits(val_fraction, seed).items() for c in cases}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    groups: dict[str, str] = {}
    image_mode = "L"
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for case in ds.cases:
            if case.name not in case_split:
                continue  # an unlabelled test case
            if ds.is_2d:
                img = open_image(case.images[0])
                lab = np.asarray(open_image(case.label))
                if lab.ndim == 3:
                    lab = lab[..., 0]
                unknown = sorted(set(np.unique(lab).tolist()) - {0} - set(ds.labels))
                if unknown:
                    raise DataError(f"{case.label}: label values {unknown} are not in dataset.json labels {sorted(ds.labels)}")
                mapped = np.zeros(lab.shape, np.uint8)
                for v in ds.labels:
                    mapped[lab == v] = back.get(v, v)
                if img.mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                image_mode = img.mode if image_mode == "L" else image_mode
                stem = case.name
                img.save(tmp / "images" / f"{stem}.png", format="PNG")
                _save_png(mapped, tmp / "masks" / f"{stem}.png")
                splits[case_split[case.name]].append(stem)
                groups[stem] = seg.get("groups", {}).get(stem, case.name)
                continue
            try:
                vol = read_volume(case.images[0])
                lab = read_label_volume(case.label, like=vol, labels=ds.labels)
            except VolumeError as exc:
                raise DataError(str(exc), exc.path) from exc
            ax = vol.slice_axis(axis)
            images = volume_slices(vol, ax, window)
            masks = label_slices(lab, ax).astype(np.uint8)
            width = max(3, len(str(len(images) - 1)))
            for i, (img, m) in enumerate(zip(images, masks)):
                if not keep_empty and not m.any():
                    continue
                stem = f"{case.name}_s{i:0{width}d}"
                img.save(tmp / "images" / f"{stem}.png", format="PNG")
                _save_png(m, tmp / "masks" / f"{stem}.png")
                splits[case_split[case.name]].append(stem)
                groups[stem] = case.name
        if ds.is_2d and seg.get("splits"):  # a dataset that came from the 2D layout: its own splits back
            splits = {s: [x for x in stems if x in groups] for s, stems in seg["splits"].items()}
        labels = {str(back.get(v, v)): n for v, n in sorted(ds.labels.items())}
        meta = {"name": seg.get("name", ds.name), "modality": seg.get("modality", ds.modality),
                "description": f"Converted from the nnU-Net raw dataset {ds.root.name}" + (
                    "" if ds.is_2d else f" (slices of channel 0, window {window or 'percentile'}, axis {axis or 'auto'})"),
                "image_mode": seg.get("image_mode", image_mode), "image_ext": ".png", "labels": labels,
                "splits": {s: v for s, v in splits.items() if v or s != "test"}, "groups": groups,
                "source": {"nnunet": str(ds.root)}}
        if not any(splits.values()):
            raise DataError(f"{ds.root}: no labelled slices to write")
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def to_nnunet(src: str | Path, out: str | Path) -> Path:
    """Convert a 2D-layout dataset to a 2D nnU-Net v2 raw dataset (PNG files, written atomically).

    train and val go to imagesTr / labelsTr, test to imagesTs / labelsTs; label values become
    consecutive (nnU-Net requires 0, 1, 2, ...); the original values, splits, groups, modality and
    image mode are kept under dataset.json's ``"segicl"`` key for :func:`nnunet_to_2d`.
    """
    from segicl.io import atomic_directory

    ds = load_dataset(src)
    values = sorted(ds.labels)
    to_consecutive = {v: i + 1 for i, v in enumerate(values)}
    out = Path(out)
    n_train = 0
    rgb = ds.image_mode == "RGB"
    with atomic_directory(out) as tmp:
        for split in ds.splits:
            images_dir, labels_dir = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
            (tmp / images_dir).mkdir(exist_ok=True)
            (tmp / labels_dir).mkdir(exist_ok=True)
            for stem in ds.stems(split):
                label_map = ds.read_label_map(stem)
                img = open_image(ds.image_path(stem), mode=ds.image_mode)
                if img.mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                rgb = rgb or img.mode == "RGB"
                mapped = np.zeros(label_map.shape, np.uint8)
                for v, i in to_consecutive.items():
                    mapped[label_map == v] = i
                img.save(tmp / images_dir / f"{stem}_0000.png", format="PNG")
                _save_png(mapped, tmp / labels_dir / f"{stem}.png")
                n_train += split != "test"
        channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": ds.modality}
        meta = {"name": ds.name, "channel_names": channels,
                "labels": {"background": 0, **{ds.labels[v]: i for v, i in to_consecutive.items()}},
                "numTraining": n_train, "file_ending": ".png",
                "description": f"Converted from the SegICL 2D dataset {ds.root.name}",
                "segicl": {"name": ds.name, "modality": ds.modality, "image_mode": ds.image_mode,
                           "label_values": {str(i): v for v, i in to_consecutive.items()},
                           "splits": ds.splits, "groups": ds.groups}}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out
