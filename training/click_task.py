"""``segicl train click``: the interactive network (segicl/click_net.py) trained with simulated users.

Items (``ClickItems``): an (image, mask) pair at ``model.size`` px, a real label of a training
dataset (the stage-1 augmentation) with probability ``1 - data.pseudo_prob``, else a pseudo-task
of training/pseudo_tasks.py (a Felzenszwalb segment of a training image, or a synthetic shape on a
texture), so the network learns "the region the marks point at" rather than the look of ten labels.
Each item carries:

- a **context prior** with probability ``data.prior_prob`` (else none): the true mask moved and
  scaled, eroded or dilated, with false-positive blobs added and parts cut, blurred, its confidence
  scaled down and noise added; one in ten is unrelated to the mask. It stands in for the in-context
  probability the network reads at inference (a propagation vote or the learned path), whose errors
  it has to learn to overrule where the marks say so;
- the **first interactions**, in the robot user's and a person's manner: a positive click at the
  centre of the mask (half the time; else a point drawn by its distance to the border), 0-2 more
  positive and 0-2 negative clicks (negatives near the object), or a jittered box (15 %), or a
  positive scribble along the mask's skeleton (15 %); on half the items with a prior, instead the
  robot's correction of the prior's own mask (a negative click where the prior's largest error is a
  false positive: at inference the first click on a proposal is often negative).

In the step (``ClickTask.forward``), 0..``data.max_rounds`` correction rounds are run without
gradients: the network predicts and the robot of eval/robot_user.py adds a click (or, for a
scribble item, a scribble) at the centre of the largest error region, as RITM / SimpleClick train;
then the loss (BCE + soft Dice) is taken on the final prediction. Validation: Dice after 1 and
3 robot clicks with no prior, per task and mean (``dice`` = after 1 click).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import Dataset

from segicl.click_net import ClickNet, ClickNetConfig, encode, rasterise
from segicl.interactive import Interactions
from training.common import SingleModelTask, batch_dice, seg_loss, small_model_from_config


def _ellipses(rng: np.random.Generator, size: int, n: int, rmin: float = 0.05, rmax: float = 0.25) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(rmin, rmax, 2) * size
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
        out |= (u / ry) ** 2 + (v / rx) ** 2 <= 1
    return out


def simulated_prior(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible in-context probability (size, size) float32 in [0, 1] for the true ``mask``."""
    size = mask.shape[0]
    if rng.random() < 0.1:
        base = _ellipses(rng, size, int(rng.integers(1, 4)))
    else:
        zoom = rng.uniform(0.85, 1.15)
        shift = rng.uniform(-0.1, 0.1, 2) * size
        centre = np.array([size / 2, size / 2])
        base = ndimage.affine_transform(mask.astype(np.float32), np.full(2, 1 / zoom), offset=centre - (centre + shift) / zoom,
                                        order=0) > 0.5
        r = int(rng.integers(-4, 5))
        if r > 0:
            base = ndimage.binary_dilation(base, iterations=r)
        elif r < 0:
            base = ndimage.binary_erosion(base, iterations=-r)
        if rng.random() < 0.5:
            base |= _ellipses(rng, size, int(rng.integers(1, 4)), 0.03, 0.2)
        if rng.random() < 0.3:
            base &= ~_ellipses(rng, size, 1, 0.05, 0.25)
    soft = ndimage.gaussian_filter(base.astype(np.float32), rng.uniform(0.5, 4.0))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), 4.0)
    noise *= rng.uniform(0, 0.3) / max(float(noise.std()), 1e-6)
    return np.clip(0.5 + rng.uniform(0.2, 1.0) * (soft - 0.5) + noise, 0, 1).astype(np.float32)


def _point(weights: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    w = weights.ravel().astype(np.float64)
    i = int(rng.choice(len(w), p=w / w.sum()))
    return divmod(i, weights.shape[1])


def first_interactions(mask: np.ndarray, rng: np.random.Generator) -> tuple[Interactions, str]:
    """(the first interactions on a non-empty ``mask``, the kind of the later corrections)."""
    from eval.robot_user import jittered_box, next_scribble

    inside = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    u = rng.random()
    if u < 0.15:
        box = jittered_box(mask, rng, 0.1)
        return Interactions(boxes=[box]), "clicks"
    if u < 0.3:
        found = next_scribble(np.zeros_like(mask), mask)
        lines = max(found[1], key=len)
        n = len(lines)
        a = int(rng.integers(0, max(1, n // 2)))
        b = min(n, a + max(2, int(n * rng.uniform(0.3, 1.0))))
        return Interactions(pos_scribbles=[lines[a:b]]), "scribbles"
    first = np.unravel_index(int(inside.argmax()), mask.shape) if rng.random() < 0.5 else _point(inside, rng)
    ints = Interactions(pos_points=[(int(first[0]), int(first[1]))])
    for _ in range(int(rng.integers(0, 3))):
        ints.pos_points.append(_point(inside, rng))
    n_neg = int(rng.integers(0, 3))
    if n_neg and (~mask).any():
        outside = ndimage.distance_transform_edt(~mask)
        w = np.where(mask, 0, np.exp(-outside / (0.15 * mask.shape[0])))
        for _ in range(n_neg):
            ints.neg_points.append(_point(w, rng))
    return ints, "clicks"


class ClickItems(Dataset):
    """(image, mask, prior, first interactions) items; see the module docstring."""

    def __init__(self, pairs: Dataset, pseudo=None, pseudo_prob: float = 0.0, prior_prob: float = 0.5, seed: int = 0,
                 length: int | None = None):
        self.pairs, self.pseudo, self.pseudo_prob, self.prior_prob = pairs, pseudo, float(pseudo_prob), float(prior_prob)
        self.seed, self.length, self.epoch = int(seed), int(length or len(pairs)), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in (self.pairs, self.pseudo):
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 11])
        for _ in range(10):
            if self.pseudo is not None and rng.random() < self.pseudo_prob:
                kind = self.pseudo.kinds[int(rng.choice(len(self.pseudo.kinds), p=self.pseudo.kind_probs))]
                x, m = self.pseudo._pairs(kind, rng, 1)[0]
                source = f"pseudo:{kind}"
            else:
                it = self.pairs[int(rng.integers(len(self.pairs)))]
                x, m, source = it["image"], it["mask"], it["dataset"]
            mask = m[0].numpy() > 0.5
            if 0 < mask.sum() < mask.size:
                break
        has_prior = rng.random() < self.prior_prob
        prior = simulated_prior(mask, rng) if has_prior else np.full(mask.shape, np.nan, np.float32)
        ints, kind = first_interactions(mask, rng)
        if has_prior and rng.random() < 0.5:  # the user corrects the proposal: the first mark may be negative
            from eval.robot_user import add_correction

            kind = "scribbles" if rng.random() < 0.15 else "clicks"
            first = Interactions()
            if add_correction(first, prior > 0.5, mask, kind):
                ints = first
        return {"image": x, "mask": m, "prior": torch.from_numpy(prior)[None], "interactions": ints.to_dict(),
                "kind": kind, "dataset": source}


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "prior")}
    for k in ("interactions", "kind", "dataset"):
        out[k] = [it[k] for it in items]
    return out


ClickItems.collate_fn = staticmethod(collate_items)


def marks_of(ints: Sequence[Interactions], shape: tuple[int, int], radius: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([rasterise(i, shape, (1.0, 1.0), radius) for i in ints]))


class ClickTask(SingleModelTask):
    def __init__(self, model: ClickNet, train_cfg: dict[str, Any], max_rounds: int = 3, seed: int = 0):
        super().__init__(model, train_cfg)
        self.max_rounds = int(max_rounds)
        self.rng = np.random.default_rng(seed)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from eval.robot_user import add_correction

        x, gt, prior = batch["image"], batch["mask"], batch["prior"]
        ints = [Interactions.from_dict(d) for d in batch["interactions"]]
        shape, r = tuple(x.shape[-2:]), self.model.cfg.click_radius
        truth = gt[:, 0].numpy() > 0.5
        for _ in range(int(self.rng.integers(0, self.max_rounds + 1))):
            with torch.no_grad():
                pred = self.model(encode(x, marks_of(ints, shape, r), prior))[:, 0].numpy() > 0
            for i, k, p, t in zip(ints, batch["kind"], pred, truth):
                add_correction(i, p, t, k)
        logits = self.model(encode(x, marks_of(ints, shape, r), prior))
        return {"loss": seg_loss(logits, gt.float())}


def robot_dice(model: ClickNet, image: torch.Tensor, mask: torch.Tensor, clicks: int, prior: torch.Tensor | None = None
               ) -> list[float]:
    """Dice after each of ``clicks`` robot clicks (the first at the mask's centre) on one (3, S, S) image."""
    from eval.robot_user import add_correction

    truth = mask[0].numpy() > 0.5
    ints, pred, out = Interactions(), np.zeros_like(truth), []
    for _ in range(clicks):
        if not add_correction(ints, pred, truth, "clicks"):
            out.append(out[-1] if out else 1.0)
            continue
        with torch.no_grad():
            logits = model(encode(image[None], marks_of([ints], truth.shape, model.cfg.click_radius),
                                  None if prior is None else prior[None]))
        pred = logits[0, 0].numpy() > 0
        out.extend(batch_dice(torch.from_numpy(pred[None].astype(np.float32)), torch.from_numpy(truth[None].astype(np.float32))))
    return out


def build_click_task(config: dict[str, Any], data_dirs: Sequence[str | Path], exclude: Sequence[str] = ()):
    from training.common import val_items
    from training.episodes import PairDataset, load_split
    from training.pseudo_tasks import PseudoTaskEpisodes

    train_cfg, data_cfg, seed, cfg, model = small_model_from_config(config, ClickNet, ClickNetConfig)
    datasets, cache = load_split(data_dirs, "train", cfg.size, exclude, cache_dir=data_cfg.get("cache_dir"),
                                 progress=bool(train_cfg.get("progress", True)))
    pairs = PairDataset(cache, datasets, seed=seed, augment=data_cfg.get("augment", True), image_size=cfg.size)
    pseudo = None
    if float(data_cfg.get("pseudo_prob", 0.0)) > 0:
        pseudo = PseudoTaskEpisodes(cache, k_max=0, length=1, seed=seed, kinds=data_cfg.get("pseudo_kinds"), image_size=cfg.size)
    train_ds = ClickItems(pairs, pseudo, float(data_cfg.get("pseudo_prob", 0.0)), float(data_cfg.get("prior_prob", 0.5)),
                          seed=seed, length=int(data_cfg.get("length", len(pairs))))
    items = val_items(list(datasets.values()), int(data_cfg.get("val_per_task", 8)), seed, cfg.size, cfg.size, k=0)

    def val_fn(task: nn.Module) -> dict[str, float]:
        m = getattr(task, "module", task).model
        was = m.training
        m.eval()
        one: dict[str, list[float]] = {}
        three: dict[str, list[float]] = {}
        for it in items:
            if not it["mask"].any():
                continue
            d = robot_dice(m, it["image"], it["mask"][None] if it["mask"].dim() == 2 else it["mask"], 3)
            one.setdefault(it["task"], []).append(d[0])
            three.setdefault(it["task"], []).append(d[2])
        m.train(was)
        out = {f"dice/{k}": sum(v) / len(v) for k, v in one.items()}
        out["dice"] = sum(sum(v) / len(v) for v in one.values()) / max(1, len(one))
        out["dice_3"] = sum(sum(v) / len(v) for v in three.values()) / max(1, len(three))
        return out

    return ClickTask(model, train_cfg, int(data_cfg.get("max_rounds", 3)), seed), train_ds, (val_fn if items else None)
