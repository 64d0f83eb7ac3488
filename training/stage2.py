"""Stage 2: the multimodal encoder regresses the frozen condition encoder's tokens (paper eq. 5).

``build_stage2_task(config, data_dirs, exclude) -> (task, train_dataset, val_fn)`` for the shared loop
(``segicl train stage2 --config configs/train/tiny_stage2.yaml``). ``model.init`` names the stage-1
checkpoint (a saved pipeline); its condition encoder and decoder are frozen. The LM is trained fully
(tiny / small, random init) or through peft LoRA (``model.lora``, the paper preset) with the
projectors, markers and query slots fully trained.

Each episode gives a text, k supports (0..K_max) and a query from one task's train split; the loss
is MSE(S, C) with S = encoder(text, supports, query) and C = condition_encoder(query mask).

With the dense layout (``lm.support_tokens: dense``, issue 16) the encoder also predicts the query's
mask logits at the mask resolution; the loss adds ``train.mask_weight`` x (BCE + soft Dice) of those
against the true mask, and for the first ``train.teacher_steps`` steps against the label
propagation's mask instead (items with supports: the propagation is a free teacher on any task).
``data.pseudo_prob`` mixes superpixel and synthetic pseudo-tasks (training/pseudo_tasks.py) into the
real episodes; the number of distinct tasks seen is logged at the end.

Validation decodes the predicted S with the frozen decoder and reports Dice per task and mean, at
k = 0 and k = K (supports from the train split), so in-context gain is visible during training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segicl.pipeline import SegICLPipeline
from training.common import PipelineTask, adamw_with_schedule, at_mask_size, batch_dice, seg_loss, val_items


class Stage2Task(PipelineTask):
    def __init__(self, pipe: SegICLPipeline, train_cfg: dict[str, Any]):
        super().__init__()
        self.pipe = pipe
        self.encoder = pipe.encoder
        # frozen teacher parts: kept out of the module tree so the optimizer and DeepSpeed never see them
        self._frozen = (pipe.condition_encoder.requires_grad_(False).eval(), pipe.decoder.requires_grad_(False).eval())
        self.train_cfg = train_cfg
        self.mask_weight = float(train_cfg.get("mask_weight", 1.0))
        self.teacher_steps = int(train_cfg.get("teacher_steps", 0))
        self.steps_seen = 0  # forward calls in training mode (the teacher phase; restarts at 0 on resume)
        self.pseudo_seen, self.real_tasks = 0, set()  # every pseudo-episode is a new task

    def _dense_loss(self, out: dict[str, torch.Tensor], qm: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE + soft Dice) of the mask head against the true mask, or the propagation while teaching."""
        target = qm.float()
        if self.training and self.steps_seen <= self.teacher_steps and "prior" in out:
            has = (torch.as_tensor(ks, device=qm.device) > 0).view(-1, 1, 1, 1)
            target = torch.where(has, (out["prior"] > self.pipe.config.threshold).float(), target)
        logits = out["mask_logits"].float()
        with torch.no_grad():
            d = batch_dice(torch.sigmoid(logits[:, 0]), qm[:, 0])
        return seg_loss(logits, target), torch.tensor(sum(d) / len(d))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ce = self._frozen[0]
        m = self.pipe.config.mask_size
        q, qm = batch["query_image"], at_mask_size(batch["query_mask"], m)
        simg, smask = batch["support_images"], at_mask_size(batch["support_masks"], m)
        ks = batch["num_supports"]
        b, k = simg.shape[:2]
        dense = self.encoder.cfg.lm.support_tokens == "dense"
        with torch.no_grad():
            target = ce(qm)
            scond = ce(smask.flatten(0, 1)).view(b, k, *target.shape[1:]) if k and not dense else None  # dense reads masks
        if self.training:
            self.steps_seen += 1
            for name, label in zip(batch.get("dataset", ()), batch.get("label", ())):  # distinct tasks seen (manifest)
                if name.startswith("pseudo:"):
                    self.pseudo_seen += 1
                else:
                    self.real_tasks.add(f"{name}:{int(label)}")
        pred = self.encoder(list(batch["text"]), q, simg if k else None, scond, ks if k else None,
                            support_masks=smask if k else None, **({"return_dict": True} if dense else {}))
        out = pred if dense else None
        pred = out["cond"] if dense else pred
        loss = F.mse_loss(pred.float(), target.float())
        with torch.no_grad():
            cos = F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
        if not dense:
            return {"loss": loss, "cos": cos}
        mask_loss, head_dice = self._dense_loss(out, qm, ks)
        return {"loss": loss + self.mask_weight * mask_loss, "cos": cos, "mask_loss": mask_loss.detach(),
                "head_dice": head_dice}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return adamw_with_schedule(self.trainable_parameters(), self.train_cfg, default_lr=3e-4)

    def save_pretrained(self, path: str | Path) -> Path:
        enc = self.encoder
        if hasattr(enc.lm, "merge_and_unload"):  # LoRA: save merged weights in the plain architecture
            enc.lm = enc.lm.merge_and_unload()
        tasks = {"real_tasks": len(self.real_tasks), "pseudo_tasks": self.pseudo_seen,
                 "distinct_tasks": len(self.real_tasks) + self.pseudo_seen}
        print(f"stage 2: distinct tasks seen in this run: {tasks}")
        return self.pipe.save_pretrained(path, extra={"stage": 2, "tasks_seen": tasks})


def with_new_encoder(pipe: SegICLPipeline, overrides: dict[str, Any], seed: int = 0) -> SegICLPipeline:
    """The stage-1 pipeline with a freshly initialised encoder built from its config updated by
    ``overrides`` (``{"vision": {...}, "lm": {...}}``): one stage-1 decoder serves several encoder designs."""
    from segicl.config import SegICLConfig, merge_overrides
    from segicl.encoder import MultimodalEncoder

    bad = set(overrides) - {"vision", "lm"}
    if bad:
        raise ValueError(f"model.encoder may only override the 'vision' and 'lm' sections, got {sorted(bad)}")
    cfg = SegICLConfig.from_dict(merge_overrides(pipe.config.to_dict(), {k: dict(v) for k, v in overrides.items()}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = MultimodalEncoder(cfg)
    return SegICLPipeline(encoder, pipe.condition_encoder, pipe.decoder, pipe.scheduler, cfg, route_decoder=pipe.route_decoder)


def apply_lora(pipe: SegICLPipeline, lora: dict[str, Any]) -> None:
    """peft LoRA on the LM (paper preset); projectors, markers and slots stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    enc = pipe.encoder
    enc.vision.requires_grad_(False)  # the pretrained ViT stays frozen; its projector trains
    enc.lm = get_peft_model(enc.lm, LoraConfig(**lora))


def make_val_fn(items_by_k: dict[int, list[dict[str, Any]]], steps: int,
                batch_size: int = 16) -> Callable[[nn.Module], dict[str, float]]:
    def val_fn(task: nn.Module) -> dict[str, float]:
        task = getattr(task, "module", task)
        pipe: SegICLPipeline = task.pipe
        enc_training = pipe.encoder.training
        pipe.encoder.eval()
        out: dict[str, float] = {}
        with torch.no_grad():
            for k, items in items_by_k.items():
                g = torch.Generator().manual_seed(0)
                per: dict[str, list[float]] = {}
                head: dict[str, list[float]] = {}
                mse = []
                for i in range(0, len(items), batch_size):
                    chunk = items[i : i + batch_size]
                    img = torch.stack([c["image"] for c in chunk]).to(pipe.device)
                    msk = torch.stack([c["mask"] for c in chunk]).to(pipe.device)
                    sup = [list(zip(c["support_images"], c["support_masks"])) for c in chunk]
                    texts = [c["text"] for c in chunk]
                    if pipe.config.lm.support_tokens == "dense" and pipe.config.matching.mode == "none":
                        dense = pipe.encode_dense(img, texts, sup)  # one forward for S and the mask head
                        s = pipe.dense_condition(dense)
                        for c, d in zip(chunk, batch_dice(torch.sigmoid(dense["mask_logits"][:, 0]), msk[:, 0])):
                            head.setdefault(c["task"], []).append(d)
                    else:
                        s = pipe.encode(img, texts, sup)
                    mse.append(F.mse_loss(s, pipe.condition_encoder(msk)).item())
                    prob = pipe.decode(img, s, [len(x) for x in sup], steps, 1, None, g)[:, 0]
                    for c, d in zip(chunk, batch_dice(prob, msk[:, 0])):
                        per.setdefault(c["task"], []).append(d)
                for name, v in sorted(per.items()):
                    out[f"dice_k{k}/{name}"] = sum(v) / len(v)
                out[f"dice_k{k}"] = sum(sum(v) / len(v) for v in per.values()) / max(1, len(per))
                out[f"mse_k{k}"] = sum(mse) / max(1, len(mse))
                if head:
                    out[f"head_dice_k{k}"] = sum(sum(v) / len(v) for v in head.values()) / len(head)
        pipe.encoder.train(enc_training)
        ks = sorted(items_by_k)
        out["dice"] = out[f"dice_k{ks[-1]}"]
        return out

    return val_fn


def episode_data(pipe: SegICLPipeline, config: dict[str, Any], data_dirs: Sequence[str | Path],
                 exclude: Sequence[str] = (), seed_offset: int = 0):
    """(train episodes, val_fn or None) of the stages that run on in-context episodes (2 and 3).

    Episodes are drawn with seed ``train.seed + seed_offset``; the val queries and supports always
    use ``train.seed``, so stages validate on the same items.
    """
    from training.episodes import EpisodeDataset, load_split

    train_cfg, data_cfg = config.get("train", {}), config.get("data", {})
    seed = int(train_cfg.get("seed", 0))
    cfg = pipe.config
    k_max = int(data_cfg.get("k_max", cfg.k_max))
    if k_max > cfg.k_max:
        raise ValueError(f"data.k_max {k_max} exceeds the model's k_max {cfg.k_max}")
    datasets, cache = load_split(data_dirs, "train", cfg.image_size, exclude, cache_dir=data_cfg.get("cache_dir"),
                                 progress=bool(train_cfg.get("progress", True)))
    train_ds = EpisodeDataset(cache, datasets, k_max=k_max, k_dist=data_cfg.get("k_dist", "uniform"),
                              task_weighting=data_cfg.get("task_weighting", "uniform"), seed=seed + seed_offset,
                              augment=data_cfg.get("augment", True),
                              alt_prompt_prob=float(data_cfg.get("alt_prompt_prob", 0.5)),
                              text_drop_prob=float(data_cfg.get("text_drop_prob", 0.0)),
                              invert_prob=float(data_cfg.get("invert_prob", 0.0)))
    pseudo_prob = float(data_cfg.get("pseudo_prob", 0.0))
    if pseudo_prob > 0:
        from training.pseudo_tasks import MixedEpisodes, PseudoTaskEpisodes

        pseudo = PseudoTaskEpisodes(cache, k_max=k_max, length=len(train_ds), seed=seed + seed_offset,
                                    kinds=data_cfg.get("pseudo_kinds"), image_size=cfg.image_size)
        train_ds = MixedEpisodes(train_ds, pseudo, pseudo_prob, seed=seed + seed_offset)
    per_task = int(data_cfg.get("val_per_task", 8))
    items_by_k = {k: val_items(list(datasets.values()), per_task, seed, cfg.image_size, cfg.mask_size, k=k)
                  for k in sorted({0, int(data_cfg.get("val_k", k_max))})}
    if not any(items_by_k.values()):
        warnings.warn("no val split with the trained labels: training runs without validation", stacklevel=3)
        return train_ds, None
    return train_ds, make_val_fn(items_by_k, steps=int(train_cfg.get("val_steps", 10)))


def build_stage2_task(config: dict[str, Any], data_dirs: Sequence[str | Path], exclude: Sequence[str] = ()):
    mcfg = config.get("model", {})
    train_cfg = config.get("train", {})
    init = mcfg.get("init")
    if not init:
        raise ValueError("stage 2 needs model.init: the stage-1 checkpoint directory (a saved pipeline)")
    pipe = SegICLPipeline.from_pretrained(init)
    if mcfg.get("encoder"):
        pipe = with_new_encoder(pipe, mcfg["encoder"], seed=int(train_cfg.get("seed", 0)))
    if mcfg.get("lora") or pipe.config.lm.lora:
        apply_lora(pipe, dict(mcfg.get("lora") or pipe.config.lm.lora))
    task = Stage2Task(pipe, train_cfg)
    task.train()
    train_ds, val_fn = episode_data(pipe, config, data_dirs, exclude)
    return task, train_ds, val_fn
