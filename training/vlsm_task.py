"""The VLSM baseline training task for the shared loop (``segicl train vlsm``).

``build_vlsm_task(config, data_dirs, exclude) -> (task, train_dataset, val_fn)``:

* ``task`` (:class:`VLSMTask`, an ``nn.Module``): ``forward(batch) -> {"loss", "dice"}`` with the
  Dice + BCE loss of seed 003 (weights from ``train.loss``), ``trainable_parameters()``,
  ``configure_optimizers() -> (AdamW, ReduceLROnPlateau)`` (seeds 002/003: AdamW, LR x 0.3 after
  ``patience`` epochs without a better validation Dice), ``early_stopping()`` (stop after
  ``train.early_stopping.patience`` epochs without improvement) and ``save_pretrained(dir)`` which
  writes the model the eval suite loads with ``segicl.vlsm.load_vlsm``.
* ``train_dataset``: one item per (image, label) of the train splits, a dict of tensors
  ``pixel_values`` (3, S, S) in [-1, 1], ``mask`` (1, S, S) in {0, 1}, ``input_ids`` and
  ``attention_mask`` (L,); the prompt is drawn from ``data.prompt_levels`` (P0-P9 of seed 000,
  prompts.json alternatives where shipped), deterministic under ``seed`` and the epoch
  (``train_dataset.set_epoch(e)``). Light photometric jitter only: flips or crops would falsify the
  location words of P6/P9.
* ``val_fn(model) -> {"dice", "loss", "dice/<dataset>/<label>"}``: mean Dice (threshold 0.5, at the
  model's resolution, empty-on-empty = 1) over up to ``data.max_val_samples`` items per task of
  the validation splits, with the fixed prompt level ``data.val_prompt_level``.

``config`` is a configs/vlsm/*.yaml dict with ``model`` and ``mode`` set (the CLI's ``--model`` and
``--mode`` override the file). ``data_dirs`` are dataset folders or roots holding them (such as
../shared/data); ``exclude`` names datasets to leave out (leave-one-dataset-out).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from segicl.data import SegDataset, find_datasets, is_dataset_folder, load_dataset
from segicl.data.transforms import image_to_tensor, mask_to_tensor
from segicl.losses import dice_bce_loss
from segicl.vlsm import VLSMModel, build_vlsm
from segicl.vlsm.prompts import PromptSampler
from segicl.vlsm.tokenizers import tokenize


def _seed_of(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def resolve_datasets(data_dirs: Sequence[str | Path], exclude: Sequence[str] = (), names: Sequence[str] | None = None) -> list[SegDataset]:
    """Datasets from folders or roots, minus ``exclude`` (by name), restricted to ``names`` if given."""
    folders: list[Path] = []
    for d in data_dirs:
        d = Path(d)
        if is_dataset_folder(d):
            folders.append(d)
        else:
            folders += find_datasets(d)
    datasets = [load_dataset(f) for f in folders]
    known = {ds.name for ds in datasets}
    for name in list(exclude) + list(names or []):
        if name not in known:
            raise ValueError(f"unknown dataset {name!r}; found {sorted(known)}")
    datasets = [ds for ds in datasets if ds.name not in set(exclude) and (names is None or ds.name in names)]
    if not datasets:
        raise ValueError(f"no datasets left in {list(map(str, data_dirs))} after excluding {list(exclude)}")
    return datasets


def _items(datasets: list[SegDataset], split: str, limit: int | None, seed: int) -> list[tuple[SegDataset, str, int]]:
    """(dataset, stem, label value) for every binary task of ``split``; at most ``limit`` per task."""
    items = []
    for ds in datasets:
        if split not in ds.splits:
            continue
        for task in ds.tasks():
            stems = ds.stems(split)
            if limit is not None and len(stems) > limit:
                stems = sorted(random.Random(_seed_of(seed, ds.name, task.label_value, split)).sample(stems, limit))
            items += [(ds, s, task.label_value) for s in stems]
    return items


class VLSMTrainDataset(Dataset):
    """Image, mask and tokenised prompt per (stem, label) of the train splits.

    Args:
        items: (dataset, stem, label value) triples.
        model: the VLSM (its image size and tokenizer).
        sampler: picks the prompt.
        augment: brightness/contrast jitter of +-10 %, deterministic per (seed, epoch, index).
        seed: base seed.
    """

    def __init__(self, items, model: VLSMModel, sampler: PromptSampler, augment: bool = True, seed: int = 0):
        self.items, self.sampler, self.augment, self.seed = items, sampler, augment, seed
        self.size = model.image_size
        self.tokenizer, self.text_length = model.tokenizer, model.text_length  # not the model: workers pickle this
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new prompt alternatives and jitter for this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ds, stem, value = self.items[index]
        sample = ds.sample(stem, value)
        text = self.sampler(sample, ds, self.epoch)
        pixels = image_to_tensor(sample.image, self.size)
        if self.augment:
            rng = random.Random(_seed_of(self.seed, self.epoch, index))
            contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
            pixels = ((pixels - pixels.mean()) * contrast + pixels.mean() + 2 * brightness).clamp(-1.0, 1.0)
        tok = tokenize(self.tokenizer, [text], self.text_length)
        return {
            "pixel_values": pixels,
            "mask": mask_to_tensor(sample.mask, self.size),
            "input_ids": tok["input_ids"][0],
            "attention_mask": tok["attention_mask"][0],
        }


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations without improving ``best`` by more than ``min_delta``."""

    patience: int = 20
    mode: str = "max"
    min_delta: float = 0.0
    best: float | None = None
    bad_epochs: int = 0

    def step(self, value: float) -> bool:
        """Record one validation value; True when training should stop."""
        better = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        )
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


class VLSMTask(nn.Module):
    """A VLSM and its loss: ``forward(batch) -> {"loss": scalar, "dice": batch soft Dice (detached)}``."""

    def __init__(self, model: VLSMModel, train_config: dict):
        super().__init__()
        self.model = model
        self.train_config = train_config
        loss = train_config.get("loss") or {}
        self.dice_weight = float(loss.get("dice_weight", 1.5))
        self.bce_weight = float(loss.get("bce_weight", 1.0))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        target = batch["mask"].to(logits.dtype)
        loss = dice_bce_loss(logits, target, self.dice_weight, self.bce_weight)
        with torch.no_grad():
            pred = (logits > 0).float()
            inter = (pred * target).flatten(1).sum(1)
            denom = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
            dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).mean()
        return {"loss": loss, "dice": dice}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    @property
    def lr(self) -> float:
        by_mode = self.train_config.get("lr_by_mode") or {}
        return float(by_mode.get(self.model.mode, self.train_config.get("lr", 1e-3)))

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau]:
        """AdamW on the trainable parameters + ReduceLROnPlateau on the validation Dice (step it with val dice)."""
        sch = self.train_config.get("scheduler") or {}
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=float(self.train_config.get("weight_decay", 1e-3)))
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=sch.get("mode", "max"), factor=float(sch.get("factor", 0.3)), patience=int(sch.get("patience", 5))
        )
        return opt, plateau

    def early_stopping(self) -> EarlyStopping:
        es = self.train_config.get("early_stopping") or {}
        return EarlyStopping(patience=int(es.get("patience", 20)), mode=es.get("mode", "max"))

    def save_pretrained(self, path: str | Path) -> Path:
        """Save the model for the eval suite (``segicl.vlsm.load_vlsm``)."""
        return self.model.save_pretrained(path)


def _unwrap(model: nn.Module) -> VLSMModel:
    """The VLSMModel inside a task, an accelerate/DDP wrapper, or itself."""
    seen = 0
    while not isinstance(model, VLSMModel) and seen < 4:
        model = getattr(model, "module", None) or getattr(model, "model", None)
        if model is None:
            raise TypeError("val_fn needs a VLSMTask, a VLSMModel or a wrapper of one")
        seen += 1
    return model


def make_val_fn(items, level: str, batch_size: int, loss_weights: tuple[float, float]) -> Callable[[nn.Module], dict[str, float]]:
    """Validation closure over fixed (dataset, stem, label) items with prompt level ``level``."""
    from eval import metrics

    sampler = PromptSampler(level, seed=0)

    @torch.no_grad()
    def val_fn(model: nn.Module) -> dict[str, float]:
        vlsm = _unwrap(model)
        was_training = vlsm.training
        vlsm.eval()
        device = next(vlsm.parameters()).device
        per_task: dict[str, list[float]] = {}
        losses: list[float] = []
        try:
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                samples = [(ds, ds.sample(stem, value)) for ds, stem, value in chunk]
                px = torch.stack([image_to_tensor(s.image, vlsm.image_size) for _, s in samples]).to(device)
                target = torch.stack([mask_to_tensor(s.mask, vlsm.image_size) for _, s in samples]).to(device)
                tok = {k: v.to(device) for k, v in vlsm.tokenize([sampler(s, ds) for ds, s in samples]).items()}
                logits = vlsm(px, tok["input_ids"], tok["attention_mask"])
                losses.append(float(dice_bce_loss(logits, target, *loss_weights)) * len(chunk))
                pred = (logits > 0).cpu().numpy()[:, 0]
                for (ds, s), p, t in zip(samples, pred, target.cpu().numpy()[:, 0] > 0.5):
                    per_task.setdefault(f"dice/{ds.name}/{s.label}", []).append(metrics.dice(p, t))
        finally:
            vlsm.train(was_training)
        scores = [v for vs in per_task.values() for v in vs]
        out = {"dice": float(np.mean(scores)) if scores else 0.0, "loss": sum(losses) / max(len(items), 1)}
        out.update({k: float(np.mean(v)) for k, v in per_task.items()})
        return out

    return val_fn


def build_vlsm_task(
    config: dict, data_dirs: Sequence[str | Path], exclude: Sequence[str] = ()
) -> tuple[VLSMTask, VLSMTrainDataset, Callable[[nn.Module], dict[str, float]]]:
    """Build the task, the train dataset and the validation function (see the module docstring).

    Raises:
        ValueError: no ``model`` / ``mode`` in the config, ``zero_shot`` (nothing to train: build it
            with ``segicl.vlsm.build_vlsm`` and ``save_pretrained`` it), unknown datasets.
    """
    model_name, mode = config.get("model"), config.get("mode")
    if not model_name or not mode:
        raise ValueError("the VLSM config needs 'model' and 'mode' (set by --model / --mode)")
    if mode == "zero_shot":
        raise ValueError("zero_shot has nothing to train: use segicl.vlsm.build_vlsm(model, 'zero_shot', config).save_pretrained(dir)")
    model_cfg = {k: v for k, v in config.items() if k not in ("mode", "data", "train")}
    model = build_vlsm(model_name, mode, model_cfg)
    data, train = dict(config.get("data") or {}), dict(config.get("train") or {})
    seed = int(config.get("seed", 0))
    datasets = resolve_datasets(data_dirs, exclude, data.get("datasets"))
    train_items = _items(datasets, data.get("train_split", "train"), data.get("max_train_samples"), seed)
    val_items = _items(datasets, data.get("val_split", "val"), data.get("max_val_samples"), seed)
    if not train_items:
        raise ValueError("no training items in the selected datasets")
    sampler = PromptSampler(data.get("prompt_levels", ["p1"]), seed=seed, use_prompts_json=bool(data.get("prompts_json", True)))
    train_set = VLSMTrainDataset(train_items, model, sampler, bool(data.get("augment", True)), seed)
    task = VLSMTask(model, train)
    if not val_items:
        import warnings

        warnings.warn(f"no {data.get('val_split', 'val')!r} split in the selected datasets: training runs without validation", stacklevel=2)
        return task, train_set, None
    val_fn = make_val_fn(
        val_items, data.get("val_prompt_level", "p1"), int(train.get("batch_size", 8)), (task.dice_weight, task.bce_weight)
    )
    return task, train_set, val_fn


def fit(
    config: dict, data_dirs: Sequence[str | Path], exclude: Sequence[str] = (), steps: int = 200,
    out: str | Path | None = None, log_every: int = 50,
) -> dict[str, float]:
    """A smoke run through the shared accelerate loop (training/loop.py; ``segicl train vlsm`` is the
    full command): ``steps`` optimizer steps, validation (and ReduceLROnPlateau) every epoch, no
    checkpoints. Returns validation Dice before and after."""
    import tempfile

    from training.loop import LoopConfig, train

    task, train_set, val_fn = build_vlsm_task(config, data_dirs, exclude)
    before = val_fn(task)["dice"] if val_fn is not None else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        loop_cfg = LoopConfig.from_dict(
            task.train_config, max_steps=int(steps), log_every=int(log_every), seed=int(config.get("seed", 0)),
            out_dir=tmp, ckpt_every=0, save_final_checkpoint=False, progress=False, tensorboard=False,
        )
        result = train(task, train_set, val_fn, loop_cfg)
    if out is not None:
        task.save_pretrained(out)
    return {"val_dice_before": before, "val_dice_after": result["val"].get("dice", float("nan")), "steps": result["step"],
            "seconds": result["seconds"], "trainable_params": sum(p.numel() for p in task.trainable_parameters())}


def parse_args(argv: Sequence[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.vlsm_task", description="Smoke-train one VLSM baseline.")
    p.add_argument("--model", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--data", nargs="+", required=True, type=Path, help="dataset folders or roots")
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--datasets", nargs="*", default=None, help="restrict to these dataset names")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="override the config's learning rate for this mode")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(args) -> dict[str, float]:
    from segicl.vlsm.registry import load_config

    cfg = load_config(args.config)
    cfg.update(model=args.model, mode=args.mode)
    cfg.setdefault("data", {})
    if args.datasets:
        cfg["data"]["datasets"] = args.datasets
    if args.max_train_samples is not None:
        cfg["data"]["max_train_samples"] = args.max_train_samples
    if args.lr is not None:
        cfg.setdefault("train", {})["lr"] = args.lr
        cfg["train"].pop("lr_by_mode", None)
    result = fit(cfg, args.data, args.exclude, args.steps, args.out)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return result


if __name__ == "__main__":
    main(parse_args())
