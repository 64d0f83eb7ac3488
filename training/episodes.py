"""In-context episodes over many datasets (stage 2) and augmented (image, mask) pairs (stage 1).

An *episode* is one binary task (dataset, label), ``k`` support pairs and one query, all from the
task's split (train), all different stems, every mask holding the label at the model resolution,
plus an instruction text. Item ``i`` of epoch ``e`` is a fixed function of ``(seed, e, i)``
(``numpy.random.default_rng([seed, e, i])``), so data are reproducible in any DataLoader worker and
after a resume. Images come from a :class:`training.cache.PairCache` (decoded and resized once).

Item format (:class:`EpisodeDataset`)::

    query_image    (3, S, S) float in [-1, 1]
    query_mask     (1, S, S) float in {0, 1}
    support_images (K_max, 3, S, S)   zeros beyond num_supports
    support_masks  (K_max, 1, S, S)   zeros beyond num_supports
    num_supports   int k in [0, K_max]
    text           str   the default instruction or a prompts.json alternative
    dataset        str
    label          int   the label's mask value
    stems          list[str]  query first, then the supports

:func:`collate` stacks the tensors and keeps strings (and stem lists) as lists. Typical use::

    datasets, train_cache = load_split(["../shared/data"], split="train", size=64, exclude=["kvasir_seg"])
    episodes = EpisodeDataset(train_cache, datasets, k_max=5, seed=0)
    loader = DataLoader(episodes, batch_size=8, collate_fn=collate)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from segicl.data import SegDataset
from training.augment import AugmentConfig, PairAugment, plain
from training.cache import PairCache, build_cache

WEIGHTINGS = ("uniform", "size", "sqrt")


def load_split(
    data_dirs: Sequence[str | Path],
    split: str = "train",
    size: int = 64,
    exclude: Sequence[str] = (),
    names: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    margin: float = 0.125,
    workers: int = 2,
    progress: bool = True,
) -> tuple[dict[str, SegDataset], PairCache]:
    """Datasets under ``data_dirs`` (folders or roots; minus ``exclude``, restricted to ``names``)
    and the cache of their ``split`` at ``size`` (+ ``margin``). ``cache_dir`` None = in memory."""
    from training.vlsm_task import resolve_datasets

    datasets = resolve_datasets(data_dirs, exclude, names)
    cache = build_cache(datasets, split, size, cache_dir, margin=margin, workers=workers, progress=progress)
    return {ds.name: ds for ds in datasets}, cache


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and numbers; keep strings and lists (stems) as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], (str, list, tuple)):
            out[key] = list(values)
        else:
            out[key] = default_collate(values)
    return out


def _k_probs(k_max: int, k_dist: str | Sequence[float]) -> np.ndarray:
    if isinstance(k_dist, str):
        if k_dist == "uniform":
            p = np.ones(k_max + 1)
        elif k_dist == "max":
            p = np.zeros(k_max + 1)
            p[-1] = 1
        else:
            raise ValueError(f"k_dist must be 'uniform', 'max' or a list of {k_max + 1} weights, got {k_dist!r}")
    else:
        p = np.asarray(k_dist, dtype=np.float64)
        if p.shape != (k_max + 1,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"k_dist needs {k_max + 1} non-negative weights for k = 0..{k_max}, got {list(k_dist)}")
    return p / p.sum()


class _CacheItems(Dataset):
    """Shared pieces: the cache, the datasets, the epoch, the augmentation."""

    def __init__(self, cache: PairCache, datasets: dict[str, SegDataset] | Sequence[SegDataset], image_size: int | None,
                 augment: AugmentConfig | dict | bool | None, seed: int):
        self.cache = cache
        self.datasets = datasets if isinstance(datasets, dict) else {ds.name: ds for ds in datasets}
        missing = set(cache.datasets) - set(self.datasets)
        if missing:
            raise ValueError(f"the cache holds datasets {sorted(missing)} that were not passed")
        self.size = int(image_size or cache.size)
        if self.size > cache.stored:
            raise ValueError(f"image_size {self.size} exceeds the cache's stored size {cache.stored}: rebuild the cache")
        self.augment = PairAugment(self.size, augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _pair(self, cache: PairCache, row: int, value: int, seed: int, flips: bool, augment: bool = True):
        mask = cache.label_maps[row] == value
        if augment:
            return self.augment(cache.images[row], mask, seed, flips=flips)
        return plain(cache.images[row], mask, self.size)


class EpisodeDataset(_CacheItems):
    """In-context episodes (see the module docstring).

    Args:
        cache: pairs of the split queries (and, without ``support_cache``, supports) come from.
        datasets: the SegDatasets of the cache (instructions, prompts.json).
        k_max: most supports; items always carry ``k_max`` support slots.
        k_dist: "uniform" over 0..k_max, "max" (always k_max), or k_max + 1 weights.
        task_weighting: "uniform" over (dataset, label) tasks (small datasets are not drowned),
            "size" (proportional to the task's number of images) or "sqrt".
        length: episodes per epoch (default: the number of (image, label) pairs in the cache).
        seed: base seed.
        augment: AugmentConfig / dict / bool (False for validation).
        alt_prompt_prob: probability of a prompts.json alternative instead of the default
            instruction where the query stem has one; such episodes are not flipped (the
            alternatives name locations).
        image_size: model resolution (default: the cache's).
        support_cache: draw supports from this cache instead (validation: queries from val,
            supports from train).
        fixed_k: always this many supports (validation at k = 0 and k = K).
        text_drop_prob: probability of an empty instruction (the task must come from the supports
            or the image).
        invert_prob: probability, for episodes with k >= 1, of a label-flip task (UniverSeg's "flip
            labels" task augmentation, Butoi et al. 2023): query and support masks are inverted
            and the instruction is empty, so only the supports say what to segment.
    """

    def __init__(
        self,
        cache: PairCache,
        datasets: dict[str, SegDataset] | Sequence[SegDataset],
        k_max: int = 5,
        k_dist: str | Sequence[float] = "uniform",
        task_weighting: str = "uniform",
        length: int | None = None,
        seed: int = 0,
        augment: AugmentConfig | dict | bool | None = True,
        alt_prompt_prob: float = 0.5,
        image_size: int | None = None,
        support_cache: PairCache | None = None,
        fixed_k: int | None = None,
        text_drop_prob: float = 0.0,
        invert_prob: float = 0.0,
    ):
        super().__init__(cache, datasets, image_size, augment, seed)
        for name, p in (("text_drop_prob", text_drop_prob), ("invert_prob", invert_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.text_drop_prob, self.invert_prob = float(text_drop_prob), float(invert_prob)
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        if task_weighting not in WEIGHTINGS:
            raise ValueError(f"task_weighting must be one of {WEIGHTINGS}, got {task_weighting!r}")
        if fixed_k is not None and not 0 <= fixed_k <= k_max:
            raise ValueError(f"fixed_k must be in 0..{k_max}, got {fixed_k}")
        self.k_max, self.fixed_k = int(k_max), fixed_k
        self.k_probs = _k_probs(self.k_max, k_dist)
        self.alt_prompt_prob = float(alt_prompt_prob)
        self.support_cache = support_cache
        sup = support_cache or cache
        # tasks: (dataset, label value, query rows, support rows); a task needs one query and,
        # when supports come from the same cache, k <= rows - 1.
        self.tasks: list[tuple[str, int, np.ndarray, np.ndarray]] = []
        for name in cache.datasets:
            ds = self.datasets[name]
            for task in ds.tasks():
                q = cache.rows_with(name, task.label_value)
                s = sup.rows_with(name, task.label_value) if name in sup.datasets else np.zeros(0, dtype=np.int64)
                if len(q) and (support_cache is None or len(s) or self.k_max == 0):
                    self.tasks.append((name, task.label_value, q, s))
        if not self.tasks:
            raise ValueError(f"no task with a non-empty mask in the {cache.split} cache of {cache.datasets}")
        sizes = np.array([len(t[2]) for t in self.tasks], dtype=np.float64)
        w = {"uniform": np.ones_like(sizes), "size": sizes, "sqrt": np.sqrt(sizes)}[task_weighting]
        self.task_probs = w / w.sum()
        self.length = int(length) if length is not None else int(sizes.sum())

    collate_fn = staticmethod(collate)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        name, value, q_rows, s_rows = self.tasks[rng.choice(len(self.tasks), p=self.task_probs)]
        ds = self.datasets[name]
        k = self.fixed_k if self.fixed_k is not None else int(rng.choice(self.k_max + 1, p=self.k_probs))
        if self.support_cache is None:
            k = min(k, len(q_rows) - 1)
            rows = rng.choice(q_rows, size=k + 1, replace=False)
            query, supports = int(rows[0]), [int(r) for r in rows[1:]]
            sup_cache = self.cache
        else:
            query = int(rng.choice(q_rows))
            qstem = self.cache.stems[query]
            pool = np.array([r for r in s_rows if self.support_cache.stems[r] != qstem], dtype=np.int64)
            k = min(k, len(pool))
            supports = [int(r) for r in rng.choice(pool, size=k, replace=False)] if k else []
            sup_cache = self.support_cache
        qstem = self.cache.stems[query]
        text = ds.instruction(value)
        alts = ds.instructions(qstem, value)[1:]
        alt = bool(alts) and rng.random() < self.alt_prompt_prob
        if alt:
            text = alts[int(rng.integers(len(alts)))]
        seeds = rng.integers(0, 2**62, size=k + 1)
        # drawn for every item (same draws whatever the probabilities), so seeds stay comparable
        drop_text, invert = rng.random() < self.text_drop_prob, rng.random() < self.invert_prob and k > 0
        q_img, q_mask = self._pair(self.cache, query, value, int(seeds[0]), flips=not alt)
        s_imgs = torch.zeros(self.k_max, 3, self.size, self.size)
        s_masks = torch.zeros(self.k_max, 1, self.size, self.size)
        for j, r in enumerate(supports):
            s_imgs[j], s_masks[j] = self._pair(sup_cache, r, value, int(seeds[j + 1]), flips=True)
        if invert:
            q_mask = 1 - q_mask
            s_masks[:k] = 1 - s_masks[:k]
        if drop_text or invert:
            text = ""
        return {
            "query_image": q_img,
            "query_mask": q_mask,
            "support_images": s_imgs,
            "support_masks": s_masks,
            "num_supports": k,
            "text": text,
            "dataset": name,
            "label": int(value),
            "stems": [qstem] + [sup_cache.stems[r] for r in supports],
            "inverted": bool(invert),
        }


class PairDataset(_CacheItems):
    """Augmented (image, mask) pairs for stage 1: one item per (row, label) of the cache.

    Item: ``image`` (3, S, S) in [-1, 1], ``mask`` (1, S, S) in {0, 1}, ``text`` (default
    instruction), ``dataset``, ``label`` (mask value), ``stem``. ``include_empty`` keeps
    (image, label) pairs whose mask is empty (the model must also render "nothing").
    """

    def __init__(
        self,
        cache: PairCache,
        datasets: dict[str, SegDataset] | Sequence[SegDataset],
        seed: int = 0,
        augment: AugmentConfig | dict | bool | None = True,
        include_empty: bool = False,
        image_size: int | None = None,
    ):
        super().__init__(cache, datasets, image_size, augment, seed)
        items = []
        for name in cache.datasets:
            for task in self.datasets[name].tasks():
                rows = cache.rows(name) if include_empty else cache.rows_with(name, task.label_value)
                items += [(int(r), name, task.label_value) for r in rows]
        if not items:
            raise ValueError(f"no (image, label) pairs in the {cache.split} cache of {cache.datasets}")
        self.items = items

    collate_fn = staticmethod(collate)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, name, value = self.items[index]
        seed = int(self._rng(index).integers(0, 2**62))
        image, mask = self._pair(self.cache, row, value, seed, flips=True, augment=True)
        return {"image": image, "mask": mask, "text": self.datasets[name].instruction(value), "dataset": name,
                "label": int(value), "stem": self.cache.stems[row]}
