"""Read segmentation datasets: the documented layout of ../shared/data, plain image/mask folders and
nnU-Net v2 raw folders (sliced on the fly, :mod:`segicl.data.nnunet_dataset`).

Documented layout (see ``../shared/data/README.md``)::

    <name>/dataset.json   name, modality, image_mode, image_ext, labels {"255": "polyp"}, splits, groups
    <name>/images/<stem>.jpg|.png
    <name>/masks/<stem>.png        8-bit label map, same size as the image
    <name>/prompts.json            optional, per-stem text prompts p0..p9

Plain layout: a folder with ``images/`` and ``masks/`` matched by file stem and no dataset.json.
Labels are then the non-zero mask values found, the split is ``"all"`` and the modality ``"unknown"``.

A multi-class dataset yields one binary task per label value (ACDC: 3 tasks, WBC: 2). Every bad
input raises :class:`DataError` naming the file; ``strict=False`` skips bad pairs and records each in
``dataset.skipped``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 40_000_000
"""Images with more pixels than this are refused as decompression bombs (PIL's own limit is ~89M)."""


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent. The message names the file.

    The message always starts with the offending path; ``err.path`` holds it.
    """

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else Path(message.split(": ", 1)[0])


@dataclass(frozen=True)
class Task:
    """One binary segmentation task: a (dataset, label value) pair."""

    dataset: str
    label_value: int
    label_name: str
    modality: str

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.label_name}"


@dataclass
class Sample:
    """One image with the binary mask of one label, at the stored (original) resolution."""

    image: Image.Image  # RGB or L, original size (W, H)
    mask: np.ndarray  # (H, W) bool, True where the pixel carries ``label_value``
    dataset: str
    label: str  # label name, e.g. "polyp"
    label_value: int  # value in the stored label map, e.g. 255
    modality: str
    stem: str
    group: str  # patient / case / sequence id; the stem itself where none is known
    split: str
    image_path: Path
    mask_path: Path
    instruction: str = ""

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]


def _check_stem(stem: str, where: Path) -> None:
    if not stem or "/" in stem or "\\" in stem or ".." in stem or stem.startswith("."):
        raise DataError(f"{where}: invalid stem {stem!r} (path separators, '..' and hidden names are not allowed)")


def open_image(path: Path, mode: str | None = None, decode: bool = True) -> Image.Image:
    """Open an image file safely.

    Args:
        path: file to read.
        mode: convert to this PIL mode ("RGB", "L") when given.
        decode: fully decode (catches truncated files); otherwise only the header is read.

    Raises:
        DataError: missing, unreadable, truncated, or larger than :data:`MAX_PIXELS`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise DataError(f"{path}: image has zero size {w}x{h}")
            if w * h > MAX_PIXELS:
                raise DataError(f"{path}: image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS} (decompression bomb?)")
            if decode:
                img.load()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: unreadable image (not a format PIL recognises)") from exc
    except OSError as exc:  # truncated files raise OSError on load
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from exc
    if decode and img.mode == "F":  # float TIFFs: NaN / inf would turn into arbitrary grey levels
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(img))))
        if bad:
            raise DataError(f"{path}: float image with {bad} NaN or inf pixel(s)")
    if decode and mode is not None and img.mode != mode:
        img = img.convert(mode)
    return img


@dataclass
class SegDataset:
    """A dataset folder. Cheap to construct; images are decoded on access."""

    root: Path
    name: str
    modality: str
    labels: dict[int, str]  # mask value -> class name
    splits: dict[str, list[str]]  # split -> stems
    image_mode: str | None = None  # "RGB" / "L" / None (as stored)
    description: str = ""
    groups: dict[str, str] = field(default_factory=dict)
    image_paths: dict[str, Path] = field(default_factory=dict)
    mask_paths: dict[str, Path] = field(default_factory=dict)
    prompts_by_stem: dict[str, dict] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason) of pairs left out
    _present: dict[str, frozenset[int]] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------------------------- queries
    def tasks(self) -> list[Task]:
        """One binary task per label value, in label order."""
        return [Task(self.name, v, n, self.modality) for v, n in sorted(self.labels.items())]

    def stems(self, split: str = "train") -> list[str]:
        if split == "all":
            return [s for stems in self.splits.values() for s in stems]
        if split not in self.splits:
            raise ValueError(f"{self.root}: no split {split!r}; splits are {sorted(self.splits)}")
        return list(self.splits[split])

    def split_of(self, stem: str) -> str:
        for split, stems in self.splits.items():
            if stem in stems:
                return split
        raise KeyError(f"{self.root}: unknown stem {stem!r}")

    def group(self, stem: str) -> str:
        return self.groups.get(stem, stem)

    def image_path(self, stem: str) -> Path:
        return self.image_paths[stem]

    def mask_path(self, stem: str) -> Path:
        return self.mask_paths[stem]

    def label_value(self, label: int | str) -> int:
        """Resolve a label given by value or by name to its mask value."""
        if isinstance(label, (int, np.integer)) and int(label) in self.labels:
            return int(label)
        for v, n in self.labels.items():
            if str(label) in (n, str(v)):
                return v
        raise ValueError(f"{self.root}: unknown label {label!r}; labels are {self.labels}")

    # ----------------------------------------------------------------------------------- text
    def instruction(self, label_value: int) -> str:
        """Default text instruction, e.g. "Segment the polyp in this endoscopy image."."""
        return f"Segment the {self.labels[label_value]} in this {self.modality} image."

    def prompts(self, stem: str) -> dict[str, list[str]] | None:
        """prompts.json entries (p0..p9, each a list of alternatives) for a stem, or None."""
        if not self.prompts_by_stem or stem not in self.prompts_by_stem:
            return None
        out = {}
        for key, value in self.prompts_by_stem[stem].items():
            out[key] = [value] if isinstance(value, str) else [str(v) for v in value]
        return out

    def instructions(self, stem: str, label_value: int) -> list[str]:
        """The default instruction followed by the non-empty prompts.json alternatives (if any)."""
        texts = [self.instruction(label_value)]
        prompts = self.prompts(stem) if len(self.labels) == 1 else None
        for key in sorted(prompts or {}):
            texts += [t for t in prompts[key] if t.strip() and t not in texts]
        return texts

    # ----------------------------------------------------------------------------------- pixels
    def read_label_map(self, stem: str) -> np.ndarray:
        """Stored label map (H, W) uint8, validated against ``labels`` and the image size."""
        mpath = self.mask_paths[stem]
        mask_img = open_image(mpath)
        if mask_img.mode not in ("L", "P", "1", "I", "I;16"):
            mask_img = mask_img.convert("L")
        label_map = np.asarray(mask_img)
        if label_map.ndim != 2:
            raise DataError(f"{mpath}: mask must be a single-channel label map, got shape {label_map.shape}")
        img_size = open_image(self.image_paths[stem], decode=False).size
        if (label_map.shape[1], label_map.shape[0]) != img_size:
            raise DataError(
                f"{mpath}: mask size {label_map.shape[1]}x{label_map.shape[0]} differs from image "
                f"{self.image_paths[stem].name} size {img_size[0]}x{img_size[1]}"
            )
        values = set(np.unique(label_map).tolist()) - {0}
        unknown = values - set(self.labels)
        if unknown:
            raise DataError(f"{mpath}: mask values {sorted(unknown)} are not in labels {sorted(self.labels)}")
        self._present[stem] = frozenset(values)
        return label_map

    def read_image(self, stem: str) -> Image.Image:
        """The stored image of ``stem`` (converted to ``image_mode`` when set), as the support store embeds it."""
        return open_image(self.image_paths[stem], mode=self.image_mode)

    def image_sha256(self, stem: str) -> str:
        """SHA-256 of the image file of ``stem`` (recorded by the support store)."""
        h = hashlib.sha256()
        with open(self.image_paths[stem], "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def labels_present(self, stem: str) -> set[int]:
        """Label values with a non-empty mask in this stem (reads the mask once, then cached)."""
        if stem not in self._present:
            self.read_label_map(stem)
        return set(self._present[stem])

    def sample(self, stem: str, label_value: int | str) -> Sample:
        """Load one image and the binary mask of one label at the stored resolution."""
        value = self.label_value(label_value)
        if stem not in self.image_paths:
            raise KeyError(f"{self.root}: unknown stem {stem!r}")
        label_map = self.read_label_map(stem)
        image = open_image(self.image_paths[stem], mode=self.image_mode)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        return Sample(
            image=image,
            mask=label_map == value,
            dataset=self.name,
            label=self.labels[value],
            label_value=value,
            modality=self.modality,
            stem=stem,
            group=self.group(stem),
            split=self.split_of(stem),
            image_path=self.image_paths[stem],
            mask_path=self.mask_paths[stem],
            instruction=self.instruction(value),
        )

    def samples(self, split: str, label_value: int | str) -> Iterator[Sample]:
        for stem in self.stems(split):
            yield self.sample(stem, label_value)

    def __len__(self) -> int:
        return len(self.image_paths)

    def verify(self, strict: bool = True) -> None:
        """Decode every pair (truncated files, mask values, sizes); drop bad ones unless ``strict``."""
        for stem in list(self.image_paths):
            try:
                self.read_label_map(stem)
                open_image(self.image_paths[stem])
            except DataError as exc:
                if strict:
                    raise
                self._drop(stem, exc.path, str(exc))

    def _drop(self, stem: str, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        warnings.warn(f"skipping {path}: {reason}", stacklevel=3)
        self.image_paths.pop(stem, None)
        self.mask_paths.pop(stem, None)
        for split in self.splits:
            self.splits[split] = [s for s in self.splits[split] if s != stem]


# --------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _find_image(folder: Path, stem: str, ext: str | None) -> Path | None:
    if ext:
        p = folder / f"{stem}{ext}"
        return p if p.is_file() else None
    for e in IMAGE_EXTS:
        p = folder / f"{stem}{e}"
        if p.is_file():
            return p
    return None


def load_dataset(path: str | Path, strict: bool = True, verify: bool = False, modality: str | None = None) -> SegDataset:
    """Read a dataset folder (documented layout, a plain images/ + masks/ pair, or an nnU-Net v2 raw
    folder, returned as :class:`segicl.data.nnunet_dataset.NnUNetSliceDataset`).

    Args:
        path: the dataset folder.
        strict: raise :class:`DataError` on the first bad pair; otherwise skip and record each in
            ``dataset.skipped`` (and warn).
        verify: decode every image and mask now (truncated files, mask values). Without it, file
            existence, stems, sizes and decompression bombs are checked from headers at load, and
            the rest when a sample is read.
        modality: modality name for a plain folder (default "unknown").

    Returns:
        The :class:`SegDataset`.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    from segicl.data.nnunet import is_nnunet_raw

    if is_nnunet_raw(root):  # an nnU-Net v2 raw folder: slices made on the fly (segicl/data/nnunet_dataset.py)
        from segicl.data.nnunet_dataset import load_nnunet_slices

        nn = load_nnunet_slices(root)
        if verify:
            nn.verify(strict)
        return nn
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DataError(f"{root}: missing {sub}/ folder")
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        ds = _load_documented(root, meta_path)
    else:
        ds = _load_plain(root, modality or "unknown")
    _check_pairs(ds, strict)
    if verify:
        ds.verify(strict)
    if not ds.image_paths:
        raise DataError(f"{root}: no valid image/mask pairs")
    return ds


def _load_documented(root: Path, meta_path: Path) -> SegDataset:
    meta = _read_json(meta_path)
    for key in ("labels", "splits"):
        if key not in meta:
            raise DataError(f"{meta_path}: missing key {key!r}")
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{meta_path}: labels must map integer mask values to names ({exc})") from exc
    if not labels or any(not 0 < v < 256 for v in labels):
        raise DataError(f"{meta_path}: labels must be non-empty with values in 1..255, got {sorted(labels)}")
    splits = {str(s): [str(x) for x in stems] for s, stems in meta["splits"].items()}
    ext = meta.get("image_ext")
    image_paths, mask_paths = {}, {}
    for stems in splits.values():
        for stem in stems:
            _check_stem(stem, meta_path)
            image_paths[stem] = root / "images" / f"{stem}{ext}" if ext else (_find_image(root / "images", stem, None) or root / "images" / f"{stem}.png")
            mask_paths[stem] = root / "masks" / f"{stem}.png"
    prompts = None
    if (root / "prompts.json").is_file():
        prompts = _read_json(root / "prompts.json")
    return SegDataset(
        root=root,
        name=str(meta.get("name", root.name)),
        modality=str(meta.get("modality", "unknown")),
        labels=labels,
        splits=splits,
        image_mode=meta.get("image_mode"),
        description=str(meta.get("description", "")),
        groups={str(k): str(v) for k, v in (meta.get("groups") or {}).items()},
        image_paths=image_paths,
        mask_paths=mask_paths,
        prompts_by_stem=prompts,
    )


def _load_plain(root: Path, modality: str) -> SegDataset:
    image_paths, mask_paths = {}, {}
    for p in sorted((root / "images").iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS or p.name.startswith("."):
            continue
        _check_stem(p.stem, p)
        if p.stem in image_paths:
            raise DataError(f"{p}: two images share the stem {p.stem!r} ({image_paths[p.stem].name})")
        image_paths[p.stem] = p
        mask_paths[p.stem] = _find_image(root / "masks", p.stem, None) or root / "masks" / f"{p.stem}.png"
    ds = SegDataset(root=root, name=root.name, modality=modality, labels={}, splits={"all": list(image_paths)},
                    image_paths=image_paths, mask_paths=mask_paths)
    # Labels are the non-zero values of the masks: read them now (plain folders are small).
    values: set[int] = set()
    for stem in list(image_paths):
        mpath = mask_paths[stem]
        if not mpath.is_file():
            continue  # reported by _check_pairs
        arr = np.asarray(open_image(mpath, mode="L"))
        present = set(np.unique(arr).tolist()) - {0}
        ds._present[stem] = frozenset(present)
        values |= present
    if not values:
        raise DataError(f"{root}: all masks are empty; cannot infer labels")
    ds.labels = {v: ("foreground" if len(values) == 1 else f"label_{v}") for v in sorted(values)}
    return ds


def _check_pairs(ds: SegDataset, strict: bool) -> None:
    """Header-level checks of every pair: files exist, image and mask sizes agree, no bombs."""
    for stem in list(ds.image_paths):
        ipath, mpath = ds.image_paths[stem], ds.mask_paths[stem]
        try:
            if not ipath.is_file():
                raise DataError(f"{ipath}: image file not found")
            if not mpath.is_file():
                raise DataError(f"{mpath}: mask file not found for image {ipath.name}")
            isize = open_image(ipath, decode=False).size
            msize = open_image(mpath, decode=False).size
            if isize != msize:
                raise DataError(f"{mpath}: mask size {msize[0]}x{msize[1]} differs from image {ipath.name} size {isize[0]}x{isize[1]}")
        except DataError as exc:
            if strict:
                raise
            ds._drop(stem, exc.path, str(exc))


def is_dataset_folder(path: str | Path) -> bool:
    """True for a dataset folder :func:`load_dataset` reads: images/ + masks/, or an nnU-Net v2 raw folder."""
    from segicl.data.nnunet import is_nnunet_raw

    p = Path(path)
    return ((p / "images").is_dir() and (p / "masks").is_dir()) or is_nnunet_raw(p)


def find_datasets(root: str | Path, exclude: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Dataset folders directly under ``root`` (:func:`is_dataset_folder`: images/ and masks/, or an
    nnU-Net v2 raw folder), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    unknown = set(exclude) - {p.name for p in root.iterdir()}
    if unknown:
        raise ValueError(f"{root}: cannot exclude unknown datasets {sorted(unknown)}")
    return sorted(p for p in root.iterdir() if p.is_dir() and is_dataset_folder(p) and p.name not in exclude)
