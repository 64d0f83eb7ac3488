"""A resized, in-memory copy of every (image, label map) of some datasets' split, stored once on disk.

Decoding ~4,000 JPEG/PNG files per epoch dominates a tiny model's step time on a CPU. The cache
decodes each image and label map of the chosen split once, resizes them to the model resolution
plus a margin for augmentation crops (``stored = round(size * (1 + margin))``; images bicubic as
:func:`segicl.data.transforms.image_to_tensor`, label maps nearest), and writes one uint8
safetensors file::

    <cache_dir>/<names>-<split>-<stored>px-<hash>.safetensors
        images      (N, stored, stored, 3) uint8   RGB (grayscale replicated)
        label_maps  (N, stored, stored)    uint8   the stored label values (0 = background)
        metadata    datasets, stems, rows per dataset (JSON)

The hash covers the dataset names, split, size, margin and the file list (paths, sizes and
modification times), so a changed or added file rebuilds the cache. Writes are atomic (temp file +
``os.replace``). A second run (or another worker process) just reloads the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segicl.data import SegDataset

FORMAT_VERSION = 1


def stems_for(ds: SegDataset, split: str) -> list[str]:
    """Stems of ``split``; a plain folder (only the split "all") serves every split."""
    if split in ds.splits:
        return ds.stems(split)
    if list(ds.splits) == ["all"]:
        return ds.stems("all")
    return []


def stored_size(size: int, margin: float) -> int:
    return int(round(size * (1.0 + float(margin))))


@dataclass
class PairCache:
    """Images and label maps of one split of several datasets, resized to ``stored`` pixels."""

    images: np.ndarray  # (N, s, s, 3) uint8
    label_maps: np.ndarray  # (N, s, s) uint8
    datasets: list[str]  # dataset names, in row order
    stems: list[str]  # stem of each row
    dataset_of: np.ndarray  # (N,) index into ``datasets``
    split: str
    size: int  # model resolution the cache was built for
    stored: int  # stored side (size + margin)
    path: Path | None = None
    _present: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.stems)

    def rows(self, dataset: str) -> np.ndarray:
        """Row indices of one dataset."""
        return np.flatnonzero(self.dataset_of == self.datasets.index(dataset))

    def rows_with(self, dataset: str, label_value: int) -> np.ndarray:
        """Rows of ``dataset`` whose mask of ``label_value`` is non-empty *at the model resolution*
        (after the plain resize to ``size``), so a sampled mask is never empty."""
        key = (dataset, int(label_value))
        if key not in self._present:
            rows = self.rows(dataset)
            present = np.zeros(len(rows), dtype=bool)
            for start in range(0, len(rows), 512):
                chunk = torch.from_numpy(self.label_maps[rows[start : start + 512]] == label_value)[:, None].to(torch.uint8)
                small = resize_mask(chunk, self.size)
                present[start : start + 512] = small.flatten(1).any(1).numpy()
            self._present[key] = rows[present]
        return self._present[key]

    def stem_row(self, dataset: str, stem: str) -> int:
        rows = self.rows(dataset)
        for r in rows:
            if self.stems[r] == stem:
                return int(r)
        raise KeyError(f"{stem!r} not in the {self.split} cache of {dataset}")


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) uint8 masks -> (..., size, size), nearest, exactly as the augmentation's resize."""
    from torchvision.transforms.v2 import functional as TF

    return TF.resize_mask(mask, [size, size])


def _key(datasets: Sequence[SegDataset], split: str, size: int, margin: float) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"v": FORMAT_VERSION, "split": split, "size": size, "margin": round(float(margin), 6)}).encode())
    for ds in datasets:
        h.update(ds.name.encode())
        for stem in stems_for(ds, split):
            for p in (ds.image_path(stem), ds.mask_path(stem)):
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_pair(ds: SegDataset, stem: str, stored: int) -> tuple[np.ndarray, np.ndarray]:
    img = ds.read_image(stem)
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    image = np.asarray(rgb.resize((stored, stored), Image.BICUBIC), dtype=np.uint8)
    label_map = ds.read_label_map(stem)
    lm = np.asarray(Image.fromarray(label_map.astype(np.uint8)).resize((stored, stored), Image.NEAREST), dtype=np.uint8)
    return image, lm


def cache_path(datasets: Sequence[SegDataset], split: str, size: int, cache_dir: str | Path, margin: float = 0.125) -> Path:
    stored = stored_size(size, margin)
    names = "+".join(ds.name for ds in datasets)
    if len(names) > 80:
        names = f"{len(datasets)}datasets"
    return Path(cache_dir) / f"{names}-{split}-{stored}px-{_key(datasets, split, size, margin)[:16]}.safetensors"


def build_cache(
    datasets: Sequence[SegDataset],
    split: str,
    size: int,
    cache_dir: str | Path | None = None,
    margin: float = 0.125,
    workers: int = 2,
    progress: bool = True,
) -> PairCache:
    """Load the cache file for (datasets, split, size) from ``cache_dir``, or build and save it.

    Args:
        datasets: the datasets (their order fixes the row order).
        split: "train", "val", ...; a plain folder's "all" serves any split; datasets without the
            split contribute nothing (with a warning).
        size: model resolution.
        cache_dir: where cache files live; None = build in memory only.
        margin: extra resolution stored for augmentation crops (0.125 -> 72 px for 64).
        workers: decoding threads.
        progress: tqdm bar while building.
    """
    if not datasets:
        raise ValueError("build_cache needs at least one dataset")
    stored = stored_size(size, margin)
    entries = []
    for ds in datasets:
        stems = stems_for(ds, split)
        if not stems:
            warnings.warn(f"{ds.root}: no split {split!r} (splits {sorted(ds.splits)}); left out of the {split} cache", stacklevel=2)
        entries += [(ds, s) for s in stems]
    if not entries:
        raise ValueError(f"no {split!r} pairs in {[ds.name for ds in datasets]}")
    names = [ds.name for ds in datasets]
    path = cache_path(datasets, split, size, cache_dir, margin) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return load_cache(path)
        except Exception as exc:  # a corrupt file (disk full...) is rebuilt, not fatal
            warnings.warn(f"{path}: unreadable cache ({exc}); rebuilding", stacklevel=2)

    images = np.empty((len(entries), stored, stored, 3), dtype=np.uint8)
    label_maps = np.empty((len(entries), stored, stored), dtype=np.uint8)

    def work(i: int) -> int:
        images[i], label_maps[i] = _load_pair(entries[i][0], entries[i][1], stored)
        return i

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for _ in tqdm(pool.map(work, range(len(entries))), total=len(entries), desc=f"caching {split} {stored}px",
                      disable=not progress, leave=False):
            pass
    dataset_of = np.array([names.index(ds.name) for ds, _ in entries], dtype=np.int32)
    cache = PairCache(images, label_maps, names, [s for _, s in entries], dataset_of, split, int(size), stored, path)
    if path is not None:
        save_cache(cache, path)
    return cache


def save_cache(cache: PairCache, path: str | Path) -> Path:
    """Write atomically (temp file in the same folder + ``os.replace``)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": str(FORMAT_VERSION),
        "datasets": json.dumps(cache.datasets),
        "stems": json.dumps(cache.stems),
        "split": cache.split,
        "size": str(cache.size),
        "stored": str(cache.stored),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"images": cache.images, "label_maps": cache.label_maps, "dataset_of": cache.dataset_of}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    cache.path = path
    return path


def load_cache(path: str | Path) -> PairCache:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != str(FORMAT_VERSION):
            raise ValueError(f"{path}: cache format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        arrays = {k: f.get_tensor(k) for k in ("images", "label_maps", "dataset_of")}
    return PairCache(
        arrays["images"], arrays["label_maps"], json.loads(meta["datasets"]), json.loads(meta["stems"]),
        arrays["dataset_of"], meta["split"], int(meta["size"]), int(meta["stored"]), path,
    )
