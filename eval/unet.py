"""Supervised U-Net references: MONAI's ``UNet`` trained from scratch (no pretrained weights).

Two references bracket the in-context methods in the evaluation suite:

- the *ceiling*: one U-Net per (dataset, label) trained on the dataset's train split;
- the *few-shot floor*: a U-Net trained on exactly the k supports an in-context method sees.

Both train under a small, fixed CPU budget read from the eval config (``configs/eval/*.yaml``,
blocks ``unet_supervised`` and ``unet_fewshot``). Images are resized to ``size x size`` for the
network (:func:`segicl.data.transforms.image_to_tensor`) and the probability is resized back to
the stored resolution, so metrics are taken at the mask's own resolution like every other method.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from PIL import Image

from segicl.data import Sample
from segicl.data.transforms import image_to_tensor, mask_to_tensor, resize_prob


@dataclass
class UNetConfig:
    """Architecture and training budget of a reference U-Net."""

    size: int = 96  # network input side, pixels (images are resized to size x size)
    channels: tuple[int, ...] = (16, 32, 64, 128)  # feature maps per level (MONAI UNet `channels`)
    strides: tuple[int, ...] = (2, 2, 2)  # down-sampling per level, len(channels) - 1 entries
    num_res_units: int = 1  # residual units per block
    steps: int = 300  # optimiser steps (the CPU budget)
    batch_size: int = 8
    lr: float = 2e-3  # AdamW learning rate, cosine-decayed to 0
    weight_decay: float = 1e-4
    hflip: bool = True  # random horizontal flips as augmentation
    max_train_items: int | None = None  # cap on training images (None: all given)
    threads: int | None = 1  # torch intra-op threads while training/predicting (None: leave as is)
    # Early stopping (off by default: the fixed ``steps`` budget). With ``val_every`` > 0 and validation
    # samples given, the Dice on them is measured every ``val_every`` steps; training stops after
    # ``patience`` measurements without a better one, once past ``min_steps`` and better than an
    # all-empty prediction (or at ``steps`` / ``max_seconds``), and the best weights are kept.
    val_every: int = 0
    patience: int = 5
    min_steps: int = 0  # no early stop before this step (a net that still predicts empty everywhere plateaus first)
    max_val_items: int | None = 64  # cap on validation images (None: all given)
    max_seconds: float | None = None  # wall-clock cap of the training loop (None: none)

    @classmethod
    def from_dict(cls, cfg: dict | None) -> UNetConfig:
        """Build from a config block, rejecting unknown keys (typos must not pass silently)."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown U-Net config keys {unknown}; known: {sorted(known)}")
        for key in ("channels", "strides"):
            if key in cfg:
                cfg[key] = tuple(int(v) for v in cfg[key])
        out = cls(**cfg)
        if len(out.strides) != len(out.channels) - 1:
            raise ValueError(f"strides {out.strides} must have len(channels) - 1 = {len(out.channels) - 1} entries")
        if out.size <= 0 or out.steps < 0 or out.batch_size <= 0:
            raise ValueError(f"size and batch_size must be positive and steps >= 0, got {out}")
        if out.val_every < 0 or out.patience < 1:
            raise ValueError(f"val_every must be >= 0 and patience >= 1, got {out}")
        return out


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous number.

    Small U-Nets are much faster on one thread: with several, each tiny op pays for thread
    synchronisation, and on a busy shared CPU that cost dominates (measured 3.5 ms vs 270 ms per
    step of the tiny test U-Net on 2 loaded cores).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_unet(cfg: UNetConfig) -> torch.nn.Module:
    """MONAI 2-D UNet, 3 input channels (RGB, gray replicated), 1 output logit per pixel."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=1,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
    )


@dataclass
class UNetSegmenter:
    """A trained U-Net: PIL image in, probability map at the image's own size out."""

    net: torch.nn.Module
    size: int
    threads: int | None = 1
    train_items: int = 0
    losses: list[float] = field(default_factory=list)
    steps_run: int = 0  # optimiser steps taken
    best_step: int | None = None  # step of the kept weights under early stopping (None: the last)
    best_val_dice: float | None = None  # validation Dice of the kept weights (None: no validation)
    seconds: float = 0.0  # training wall time

    @torch.no_grad()
    def predict(self, image: Image.Image) -> np.ndarray:
        """Foreground probability (H, W) float32 in [0, 1] at the stored resolution of ``image``."""
        self.net.eval()
        x = image_to_tensor(image, self.size)[None]  # (1, 3, S, S)
        with torch_threads(self.threads):
            prob = torch.sigmoid(self.net(x))[0, 0]  # (S, S)
        return np.clip(resize_prob(prob, (image.height, image.width)), 0.0, 1.0)


def _tensors(samples: Sequence[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([image_to_tensor(s.image, size) for s in samples])  # (N, 3, S, S)
    y = torch.stack([mask_to_tensor(s.mask, size) for s in samples])  # (N, 1, S, S)
    return x, y


def train_unet(samples: Sequence[Sample], cfg: UNetConfig, seed: int,
               val_samples: Sequence[Sample] | None = None) -> UNetSegmenter:
    """Train a U-Net from scratch on (image, binary mask) samples under ``cfg``'s budget.

    Deterministic for a given ``seed`` and sample order: initialisation, batch sampling and flips
    use generators seeded from it, and the global torch RNG is left as it was.

    Args:
        samples: training samples (image + mask of the task's label); at least one.
        cfg: architecture and budget.
        seed: seed of initialisation and batch order.
        val_samples: validation samples for early stopping (used when ``cfg.val_every`` > 0).

    Returns:
        The trained :class:`UNetSegmenter` (in eval mode), with the per-step losses and the
        early-stopping record.
    """
    if not samples:
        raise ValueError("a U-Net needs at least one training sample")
    samples = list(samples)
    gen = torch.Generator().manual_seed(int(seed))
    if cfg.max_train_items is not None and len(samples) > cfg.max_train_items:
        keep = torch.randperm(len(samples), generator=gen)[: cfg.max_train_items].sort().values
        samples = [samples[int(i)] for i in keep]
    x_all, y_all = _tensors(samples, cfg.size)
    val = None
    if cfg.val_every > 0 and val_samples:
        val_samples = list(val_samples)
        if cfg.max_val_items is not None and len(val_samples) > cfg.max_val_items:
            keep = torch.randperm(len(val_samples), generator=torch.Generator().manual_seed(int(seed)))
            val_samples = [val_samples[int(i)] for i in keep[: cfg.max_val_items].sort().values]
        val = _tensors(val_samples, cfg.size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_unet(cfg)
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        losses, best = _fit(net, x_all, y_all, cfg, gen, val)
    return UNetSegmenter(net=net, size=cfg.size, threads=cfg.threads, train_items=len(samples), losses=losses,
                         steps_run=len(losses), best_step=best[0], best_val_dice=best[1],
                         seconds=time.perf_counter() - t0)


@torch.no_grad()
def _val_dice(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Mean per-image Dice (threshold 0.5, empty prediction on an empty mask = 1) at the network's size."""
    net.eval()
    scores = []
    for i in range(0, len(x), batch_size):
        pred = (net(x[i : i + batch_size]) > 0).float().flatten(1)
        target = y[i : i + batch_size].flatten(1)
        inter, denom = (pred * target).sum(1), pred.sum(1) + target.sum(1)
        scores.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)))
    net.train()
    return float(torch.cat(scores).mean())


def _fit(net: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, cfg: UNetConfig,
         gen: torch.Generator, val: tuple[torch.Tensor, torch.Tensor] | None = None,
         ) -> tuple[list[float], tuple[int | None, float | None]]:
    """The training loop: AdamW + cosine decay on Dice + BCE (MONAI DiceCELoss, batch Dice).

    With ``val`` (early stopping), returns the losses and (best step, best validation Dice), the net
    holding the best weights; without, (None, None) and the last weights."""
    from monai.losses import DiceCELoss

    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    losses: list[float] = []
    net.train()
    n = len(x_all)
    best_step, best_dice, best_state, bad = None, None, None, 0
    # no early stop while the net is no better than predicting nothing (the Dice of an all-empty mask)
    empty_dice = float((val[1].flatten(1).sum(1) == 0).float().mean()) if val is not None else 0.0
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)  # with replacement: k=1 works too
        x, y = x_all[idx], y_all[idx]
        if cfg.hflip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds
        if val is not None and (step % cfg.val_every == 0 or step == cfg.steps or out_of_time):
            dice = _val_dice(net, *val, cfg.batch_size)
            if best_dice is None or dice > best_dice:
                best_step, best_dice, bad = step, dice, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                bad += 1
            if bad >= cfg.patience and step >= cfg.min_steps and best_dice > empty_dice:
                break
        if out_of_time:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return losses, (best_step, best_dice)
