"""Pieces shared by the SegICL stage tasks: their device-following base, LR schedule, batch Dice,
fixed validation items."""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from torch import nn

from segicl.data import SegDataset
from segicl.data.transforms import image_to_tensor, mask_to_tensor
from segicl.pipeline import SegICLPipeline


class PipelineTask(nn.Module):
    """Base of the stage tasks, which train some parts of ``self.pipe`` and keep the frozen ones out of
    the module tree (so the optimizer and DeepSpeed never see them). ``.to()`` / ``.cuda()`` (what
    accelerate's ``prepare`` calls) move the frozen parts as well, and ``pipe.device`` follows the
    trainable ones, so validation and the frozen teachers run where the batches are."""

    pipe: SegICLPipeline

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        in_tree = {id(m) for m in self.modules()}
        for m in self.pipe.modules().values():
            if id(m) not in in_tree:
                m._apply(fn, *args, **kwargs)
        first = next(iter(self.parameters()), None)
        if first is not None:
            self.pipe.device = first.device
        return self


def lr_schedule(opt: torch.optim.Optimizer, train_cfg: dict[str, Any]):
    """diffusers' LR schedule (``lr_schedule``: constant_with_warmup / cosine / linear) over ``steps``."""
    return get_scheduler(
        train_cfg.get("lr_schedule", "cosine"), opt,
        num_warmup_steps=int(train_cfg.get("warmup_steps", 100)),
        num_training_steps=int(train_cfg.get("max_steps") or train_cfg.get("steps") or 1000),
    )


def adamw_with_schedule(params, train_cfg: dict[str, Any], default_lr: float):
    """AdamW (``train.lr``, ``train.weight_decay``) and its :func:`lr_schedule` (the stage tasks)."""
    opt = torch.optim.AdamW(params, lr=float(train_cfg.get("lr", default_lr)),
                            weight_decay=float(train_cfg.get("weight_decay", 0.01)))
    return opt, lr_schedule(opt, train_cfg)


def at_mask_size(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Masks (..., 1, H, W) at the model's mask_size. The training datasets give pairs at image_size;
    presets whose masks are larger (paper: 448 px images, 512 px masks) get them resized (nearest)."""
    if masks.shape[-2:] == (size, size) or masks.numel() == 0:
        return masks
    flat = masks.reshape(-1, *masks.shape[-3:]).float()
    out = F.interpolate(flat, size=(size, size), mode="nearest-exact").to(masks.dtype)
    return out.reshape(*masks.shape[:-2], size, size)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per item, then the mean) of mask logits against a binary target: the mask loss
    of the learned in-context paths (the dense matcher's mask head, the UniverSeg-style comparator)."""
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    dice = (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


def batch_dice(prob: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> list[float]:
    """Per-item Dice of ``prob > threshold`` vs binary ``target`` ((B, H, W) each); empty vs empty = 1."""
    pred = prob > threshold
    tgt = target > 0.5
    inter = (pred & tgt).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + tgt.flatten(1).sum(1).float()
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return dice.tolist()


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def task_name(ds: SegDataset, label_value: int) -> str:
    return f"{ds.name}/{ds.labels[label_value]}"


def val_items(datasets: Sequence[SegDataset], per_task: int, seed: int, image_size: int, mask_size: int,
              split: str = "val", k: int = 0) -> list[dict[str, Any]]:
    """A fixed set of validation queries per (dataset, label), with ``k`` supports from the train split.

    Queries come from ``split`` (the val split; never test) and contain the label; supports come from
    the same task's train split, outside the query's group. Deterministic under ``seed``.
    """
    items = []
    for ds in datasets:
        if split not in ds.splits:
            continue
        for t in ds.tasks():
            v = t.label_value
            rng = random.Random(_seed(seed, ds.name, v, split))
            stems = [s for s in ds.stems(split) if v in ds.labels_present(s)]  # masks cached per dataset
            if not stems:
                continue
            for stem in sorted(rng.sample(stems, min(per_task, len(stems)))):
                q = ds.sample(stem, v)
                pool = [s for s in ds.stems("train") if ds.group(s) != q.group]
                rng.shuffle(pool)
                sup = []
                for s in pool:  # reads masks lazily: only until k supports with the label are found
                    if len(sup) == k:
                        break
                    if v in ds.labels_present(s):
                        sup.append(ds.sample(s, v))
                items.append({
                    "task": task_name(ds, v),
                    "text": ds.instruction(v),
                    "image": image_to_tensor(q.image, image_size),
                    "mask": mask_to_tensor(q.mask, mask_size),
                    "support_images": [image_to_tensor(s.image, image_size) for s in sup],
                    "support_masks": [mask_to_tensor(s.mask, mask_size) for s in sup],
                })
    return items


def small_model_from_config(config: dict[str, Any], model_cls, cfg_cls):
    """(train block, data block, seed, model config, model) of a config for a small one-network task
    (the UniverSeg-style comparator, the click network): the model built from ``model`` (lists as
    tuples) under the run's seed, without touching the global RNG."""
    train_cfg, data_cfg, mcfg = config.get("train", {}), config.get("data", {}), dict(config.get("model") or {})
    seed = int(train_cfg.get("seed", 0))
    cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in mcfg.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    return train_cfg, data_cfg, seed, cfg, model


class SingleModelTask(nn.Module):
    """A task that trains one whole network (``self.model``) with AdamW (default lr 1e-3) and saves it
    with the network's own ``save_pretrained``; subclasses define ``forward(batch) -> {"loss": ...}``."""

    def __init__(self, model: nn.Module, train_cfg: dict[str, Any]):
        super().__init__()
        self.model, self.train_cfg = model, train_cfg

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def configure_optimizers(self):
        return adamw_with_schedule(self.trainable_parameters(), self.train_cfg, default_lr=1e-3)

    def save_pretrained(self, path):
        return self.model.save_pretrained(path)
