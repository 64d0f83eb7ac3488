"""``segicl train universeg``: the UniverSeg-style comparator (segicl/universeg.py) on the same tasks.

The same episodes as the dense matcher (``configs/train/tiny_universeg.yaml``): real (dataset, label)
episodes of the training datasets, mixed with superpixel and synthetic pseudo-tasks
(``data.pseudo_prob``, training/pseudo_tasks.py), k = 1..k_max supports (UniverSeg needs one), the
same augmentation; loss BCE + soft Dice on the query's mask. Validation: Dice of the val queries with
k = ``data.val_k`` train-split supports, per task and mean. The model is saved with
``UniverSeg.save_pretrained`` and evaluated as ``--methods universeg:<dir>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segicl.universeg import UniverSeg, UniverSegConfig
from training.common import SingleModelTask, batch_dice, seg_loss, small_model_from_config, val_items


class UniverSegTask(SingleModelTask):

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["query_image"], batch["support_images"], batch["support_masks"], batch["num_supports"])
        return {"loss": seg_loss(logits, batch["query_mask"].float())}


def build_universeg_task(config: dict[str, Any], data_dirs: Sequence[str | Path], exclude: Sequence[str] = ()):
    from training.episodes import EpisodeDataset, load_split
    from training.pseudo_tasks import MixedEpisodes, PseudoTaskEpisodes

    train_cfg, data_cfg, seed, cfg, model = small_model_from_config(config, UniverSeg, UniverSegConfig)
    k_max = int(data_cfg.get("k_max", 5))
    datasets, cache = load_split(data_dirs, "train", cfg.size, exclude, cache_dir=data_cfg.get("cache_dir"),
                                 progress=bool(train_cfg.get("progress", True)))
    real = EpisodeDataset(cache, datasets, k_max=k_max, k_dist=[0.0] + [1.0] * k_max, seed=seed,
                          augment=data_cfg.get("augment", True), invert_prob=float(data_cfg.get("invert_prob", 0.0)))
    train_ds = real
    if float(data_cfg.get("pseudo_prob", 0.0)) > 0:
        pseudo = PseudoTaskEpisodes(cache, k_max=k_max, length=len(real), seed=seed, kinds=data_cfg.get("pseudo_kinds"),
                                    image_size=cfg.size, min_k=1)
        train_ds = MixedEpisodes(real, pseudo, float(data_cfg["pseudo_prob"]), seed=seed)
    items = val_items(list(datasets.values()), int(data_cfg.get("val_per_task", 8)), seed, cfg.size, cfg.size,
                      k=int(data_cfg.get("val_k", k_max)))

    def val_fn(task: nn.Module) -> dict[str, float]:
        m = getattr(task, "module", task).model
        was = m.training
        m.eval()
        per: dict[str, list[float]] = {}
        with torch.no_grad():
            for it in items:
                if not it["support_images"]:
                    continue
                logits = m(it["image"][None], torch.stack(it["support_images"])[None], torch.stack(it["support_masks"])[None])
                per.setdefault(it["task"], []).extend(batch_dice(torch.sigmoid(logits[:, 0]), it["mask"]))
        m.train(was)
        out = {f"dice/{k}": sum(v) / len(v) for k, v in per.items()}
        out["dice"] = sum(sum(v) / len(v) for v in per.values()) / max(1, len(per))
        return out

    return UniverSegTask(model, train_cfg), train_ds, (val_fn if items else None)
