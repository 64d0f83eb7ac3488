"""Stage 1: condition encoder + diffusion decoder on (image, mask) pairs (paper section 4.2, eq. 6).

``build_stage1_task(config, data_dirs, exclude) -> (task, train_dataset, val_fn)`` for the shared loop
(``segicl train stage1 --config configs/train/tiny_stage1.yaml``).

The decoder learns to render the query's mask from its condition tokens C = condition_encoder(mask)
and the query image (ControlNet hint). ``decoder.cond_dropout`` / ``decoder.cond_noise`` of the model
config degrade C during training so that the decoder also reads the image; stage 2 then only has to
get S close to C, not exact.

Validation (``val_fn``) measures what stage 2 will rely on: Dice of masks *sampled from the true C*
on each task's val split (and from the null condition, i.e. the image alone, as a reference).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segicl.config import load_preset
from segicl.pipeline import SegICLPipeline
from training.common import PipelineTask, adamw_with_schedule, at_mask_size, batch_dice, val_items


class Stage1Task(PipelineTask):
    def __init__(self, pipe: SegICLPipeline, train_cfg: dict[str, Any]):
        super().__init__()
        self.pipe = pipe
        self.condition_encoder = pipe.condition_encoder
        self.decoder = pipe.decoder
        self.train_cfg = train_cfg

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, masks = batch["image"], at_mask_size(batch["mask"], self.pipe.config.mask_size)
        d = self.pipe.config.decoder
        cond = self.condition_encoder(masks)
        return self.decoder.loss(images, masks, cond, self.pipe.scheduler, d.cond_dropout, d.cond_noise)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return adamw_with_schedule(self.trainable_parameters(), self.train_cfg, default_lr=3e-4)

    def save_pretrained(self, path: str | Path) -> Path:
        return self.pipe.save_pretrained(path, extra={"stage": 1})


def make_val_fn(items: list[dict[str, Any]], steps: int, batch_size: int = 32) -> Callable[[nn.Module], dict[str, float]]:
    """Dice of masks sampled from the true condition tokens (and from the null condition) per task."""

    def val_fn(task: nn.Module) -> dict[str, float]:
        task = getattr(task, "module", task)
        pipe: SegICLPipeline = task.pipe
        was = [m.training for m in pipe.modules().values()]
        pipe.eval()
        g = torch.Generator().manual_seed(0)
        per: dict[str, list[float]] = {}
        per_null: dict[str, list[float]] = {}
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                img = torch.stack([c["image"] for c in chunk]).to(pipe.device)
                msk = torch.stack([c["mask"] for c in chunk]).to(pipe.device)
                cond = pipe.condition_encoder(msk)
                prob = pipe.decoder.sample(img, cond, pipe.scheduler, steps, 1, pipe.config.scheduler.sampler, g)[:, 0]
                null = pipe.decoder.null_cond.expand(len(chunk), -1, -1)
                prob0 = pipe.decoder.sample(img, null, pipe.scheduler, steps, 1, pipe.config.scheduler.sampler, g)[:, 0]
                for c, d, d0 in zip(chunk, batch_dice(prob, msk[:, 0]), batch_dice(prob0, msk[:, 0])):
                    per.setdefault(c["task"], []).append(d)
                    per_null.setdefault(c["task"], []).append(d0)
        for m, w in zip(pipe.modules().values(), was):
            m.train(w)
        out = {f"dice/{k}": sum(v) / len(v) for k, v in sorted(per.items())}
        out["dice"] = sum(out.values()) / max(1, len(out))
        out["dice_null"] = sum(sum(v) / len(v) for v in per_null.values()) / max(1, len(per_null))
        return out

    return val_fn


def build_stage1_task(config: dict[str, Any], data_dirs: Sequence[str | Path], exclude: Sequence[str] = ()):
    from training.episodes import PairDataset, load_split

    mcfg = config.get("model", {})
    train_cfg = config.get("train", {})
    data_cfg = config.get("data", {})
    seed = int(train_cfg.get("seed", 0))
    cfg = load_preset(mcfg.get("preset", "tiny"), **mcfg.get("overrides", {}))
    pipe = SegICLPipeline.from_config(cfg, seed=seed)
    pipe.encoder.requires_grad_(False)  # stage 1 trains the condition encoder and the decoder only
    task = Stage1Task(pipe, train_cfg)
    task.train()
    datasets, cache = load_split(data_dirs, "train", cfg.image_size, exclude, cache_dir=data_cfg.get("cache_dir"),
                                 progress=bool(train_cfg.get("progress", True)))
    train_ds = PairDataset(cache, datasets, seed=seed, augment=data_cfg.get("augment", True),
                           include_empty=bool(data_cfg.get("include_empty", False)))
    items = val_items(list(datasets.values()), per_task=int(data_cfg.get("val_per_task", 8)), seed=seed,
                      image_size=cfg.image_size, mask_size=cfg.mask_size)
    if not items:
        warnings.warn("no val split with the trained labels: training runs without validation", stacklevel=2)
        return task, train_ds, None
    return task, train_ds, make_val_fn(items, steps=int(train_cfg.get("val_steps", 10)))
