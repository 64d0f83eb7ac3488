"""One training loop for every task module (stage 1, stage 2, the VLSM baselines), driven by accelerate.

A *task* is an ``nn.Module`` with

* ``forward(batch) -> dict``: a scalar ``"loss"`` tensor; every other scalar entry (tensor or number)
  is averaged over the logging window and logged;
* ``configure_optimizers() -> (optimizer, scheduler or None)``: a plain LR scheduler is stepped once
  per optimizer step; a ``ReduceLROnPlateau`` is stepped on the monitored validation metric;
* optional ``early_stopping()`` returning an object with ``step(value) -> bool`` (True = stop),
  stepped with the monitored validation metric;
* optional ``save_pretrained(dir)``: the final artifact, written to ``<out_dir>/model``.

:func:`train` runs it: single process on CPU or GPU, DDP or DeepSpeed under ``accelerate launch``
(or, for DeepSpeed in one process, ``LoopConfig.deepspeed`` = a DeepSpeed JSON). It logs to a
progress bar (loss, lr, steps/s, ETA), ``<out_dir>/log.csv`` and TensorBoard (``<out_dir>/tb``) if
installed, and writes checkpoints with ``accelerator.save_state`` into
``<out_dir>/checkpoints/.tmp-step_XXXXXXX`` which is then renamed atomically to ``step_XXXXXXX``;
only the last ``keep_last`` are kept. ``resume=True`` restores the newest checkpoint: weights,
optimizer, scheduler, early-stopping state, RNG states, the epoch and the position in it (batches of
the current epoch already seen are skipped with ``accelerator.skip_first_batches``), so a run
stopped at step 100 and resumed to 200 ends with the weights of an uninterrupted 200-step run.

Data order is a fixed function of (seed, epoch) (:class:`EpochSampler`); datasets with a
``set_epoch(epoch)`` method get it called at the start of every epoch, and a dataset attribute
``collate_fn`` is used as the DataLoader's collate function.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segicl.io import sha256_file

CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"

# Aliases accepted in config files (the VLSM configs say max_epochs, others may say steps).
_ALIASES = {
    "steps": "max_steps",
    "max_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "grad_accumulation": "grad_accum",
    "max_grad_norm": "grad_clip",
    "gradient_clipping": "grad_clip",
    "output_dir": "out_dir",
    "out": "out_dir",
    "save_every": "ckpt_every",
    "checkpoint_every": "ckpt_every",
    "eval_every": "val_every",
}


@dataclass
class LoopConfig:
    """Loop settings (the ``train:`` block of a config; keys the loop does not know are ignored,
    they belong to the task: lr, weight decay, warmup...).

    Attributes:
        max_steps: optimizer steps to run (after gradient accumulation). With ``epochs`` as well,
            training stops at whichever comes first. One of the two is required.
        max_minutes: wall-clock budget of the training steps (None = none): after the first step
            that ends past it, training stops as if ``max_steps`` were reached (final validation,
            checkpoint and model). The LR schedule still spans ``max_steps``.
        epochs: full passes over the train dataset.
        batch_size: per-process micro-batch size.
        num_workers: DataLoader worker processes.
        grad_accum: micro-batches per optimizer step.
        grad_clip: max global gradient norm (None/0 = off).
        mixed_precision: "no", "bf16" or "fp16" (fp16 needs a GPU).
        log_every: steps between log rows (progress bar, CSV, TensorBoard).
        val_every: steps between validations; 0 = at the end of every epoch; -1 = only at the end.
        ckpt_every: steps between checkpoints (0 = only the final one).
        keep_last: checkpoints to keep (the newest ones).
        seed: seeds data order, augmentation (through the dataset) and the global RNGs.
        out_dir: run folder (log.csv, tb/, checkpoints/, model/).
        monitor: validation metric that drives ReduceLROnPlateau and early stopping; default
            "dice" when val_fn returns it, else "loss".
        drop_last: drop the last incomplete batch of an epoch.
        deepspeed: a DeepSpeed JSON to use in a single process without ``accelerate launch``
            (needs MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK in the environment).
        tensorboard: also log to TensorBoard when it is installed.
        progress: show the tqdm bar (main process only).
        save_final_checkpoint: write a checkpoint at the end (besides the final model).
    """

    max_steps: int | None = None
    max_minutes: float | None = None
    epochs: int | None = None
    batch_size: int = 8
    num_workers: int = 0
    grad_accum: int = 1
    grad_clip: float | None = None
    mixed_precision: str = "no"
    log_every: int = 10
    val_every: int = 0
    ckpt_every: int = 0
    keep_last: int = 3
    seed: int = 0
    out_dir: str = "runs/default"
    monitor: str | None = None
    drop_last: bool = False
    deepspeed: str | None = None
    tensorboard: bool = True
    progress: bool = True
    save_final_checkpoint: bool = True

    @classmethod
    def from_dict(cls, d: dict | None, **overrides: Any) -> LoopConfig:
        """Build from a config block (aliases allowed, unknown keys ignored), then ``overrides``
        (None values in ``overrides`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in dict(d or {}).items():
            key = _ALIASES.get(key, key)
            if key in names:
                kwargs[key] = value
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("the training config needs 'steps' (max_steps) or 'epochs'")
        for name in ("batch_size", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and not float(self.max_minutes) > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "fp8"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if int(self.keep_last) < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a fixed function of (seed, epoch); ``shuffle=False``
    gives the identity. Independent of the global RNG, so resuming cannot shift it."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


@dataclass
class TrainerState:
    """Loop position, checkpointed with the accelerate state (``register_for_checkpointing``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (this process)
    best: float | None = None
    last_val: dict[str, float] = field(default_factory=dict)
    val_step: int = -1  # step of the last validation
    stopper: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class _StateOf:
    """Checkpoint adapter for objects without state_dict (an early-stopping dataclass)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        if hasattr(self.obj, "state_dict"):
            return self.obj.state_dict()
        return {k: v for k, v in vars(self.obj).items() if isinstance(v, (int, float, str, bool, type(None)))}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if hasattr(self.obj, "load_state_dict"):
            self.obj.load_state_dict(d)
        else:
            for k, v in d.items():
                setattr(self.obj, k, v)


# ---------------------------------------------------------------------------------- checkpoints
def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``<out_dir>/checkpoints``, oldest first (temp dirs excluded)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX):
            try:
                found.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A training checkpoint is truncated or modified. The message names the file."""


def write_checksums(ckpt: Path) -> None:
    """``checksums.json``: sha256 of every file of a checkpoint folder (checked before a resume reads it)."""
    sums = {str(f.relative_to(ckpt)): sha256_file(f) for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != CHECKSUMS}
    (ckpt / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def verify_checksums(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` when a file of ``ckpt`` is missing or differs from ``checksums.json``
    (checkpoints written before checksums existed are not checked)."""
    f = ckpt / CHECKSUMS
    if not f.is_file():
        return
    try:
        sums = json.loads(f.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{f}: unreadable ({exc}); delete {ckpt} to resume from the previous checkpoint") from None
    for name, digest in sums.items():
        p = ckpt / name
        if not p.is_file() or sha256_file(p) != digest:
            raise CheckpointError(f"{p}: {'missing' if not p.is_file() else 'checksum differs'} (truncated or modified "
                                  f"checkpoint); delete {ckpt} to resume from the previous one")


def _load_state_weights_only(acc, ckpt: Path) -> None:
    """``acc.load_state`` with every pickle read by ``torch.load(weights_only=True)`` (accelerate reads
    the registered custom states with weights_only=False; ours are plain dicts of numbers)."""
    from unittest import mock

    import accelerate.accelerator as acc_mod

    def load_custom_state(obj, path, index=0):
        obj.load_state_dict(torch.load(f"{path}/custom_checkpoint_{index}.pkl", map_location="cpu", weights_only=True))

    if hasattr(acc_mod, "load_custom_state"):
        with mock.patch.object(acc_mod, "load_custom_state", load_custom_state):
            acc.load_state(str(ckpt))
    else:
        acc.load_state(str(ckpt))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` atomically; an existing ``final`` is moved aside first."""
    if final.exists():
        trash = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ---------------------------------------------------------------------------------- logging
class CSVLog:
    """``log.csv`` with one row per logged step; new columns rewrite the file (atomically)."""

    BASE = ["step", "epoch", "loss", "lr"]

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.columns = list(self.BASE)
        if resume_step is not None and path.is_file():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or self.BASE)
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if self.rows and str(self.rows[-1].get("step")) == str(row["step"]):
            self.rows[-1].update(row)  # train and val rows of the same step merge
            merged = True
        else:
            self.rows.append(dict(row))
            merged = False
        new = [k for k in row if k not in self.columns]
        if new or merged:
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def _scalar(v: Any) -> float | None:
    if torch.is_tensor(v):
        return float(v.detach().float().mean()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _fresh_accelerate_state() -> None:
    """Let several loops run in one process (tests, notebooks) with different settings: accelerate
    keeps a process-wide singleton state. Only done when no process group exists (never under
    ``accelerate launch`` / torchrun)."""
    from accelerate.state import AcceleratorState, GradientState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op the first
    time (70 s to minutes; cached in ~/.cache/torch_extensions afterwards). gloo does the same job,
    slower for big tensors; ``SEGICL_DS_SHM_COMM=1`` keeps DeepSpeed's op."""
    if os.environ.get("SEGICL_DS_SHM_COMM", "0") == "1":
        return
    try:
        import deepspeed.ops
    except Exception:  # DeepSpeed not installed: nothing to skip
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_accelerator(cfg: LoopConfig):
    """The Accelerator for ``cfg``: gloo process groups when there is no GPU, DeepSpeed from
    ``cfg.deepspeed`` when given (single-process use), else whatever ``accelerate launch`` set."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    _fresh_accelerate_state()
    kwargs: dict[str, Any] = {}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or bool(cfg.deepspeed) or os.environ.get(
        "ACCELERATE_USE_DEEPSPEED", "false"
    ).lower() in ("1", "true")
    if distributed and not torch.cuda.is_available():
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        _skip_deepspeed_shm_op()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (cfg.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")):
            # torchrun / accelerate launch without GPUs: accelerate only builds a process group
            # (MULTI_CPU, DDP over gloo) when told cpu=True; otherwise each process trains alone.
            kwargs["cpu"] = True
    if cfg.deepspeed:
        path = Path(cfg.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: DeepSpeed config not found")
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.setdefault(var, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.get(var, "0") if var != "WORLD_SIZE" else "1")
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state and AcceleratorState().deepspeed_plugin is not None:
            # accelerate allows one DeepSpeed plugin per process: later loops in the same process
            # (tests, notebooks) reuse the first one, so they must use the same DeepSpeed settings.
            return Accelerator(gradient_accumulation_steps=int(cfg.grad_accum), project_dir=str(cfg.out_dir))
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=str(path), gradient_accumulation_steps=int(cfg.grad_accum),
            gradient_clipping=float(cfg.grad_clip or 0.0),  # fills "auto"; 0 = no clipping
        )
    return Accelerator(
        gradient_accumulation_steps=int(cfg.grad_accum),
        mixed_precision=cfg.mixed_precision,
        project_dir=str(cfg.out_dir),
        **kwargs,
    )


# ---------------------------------------------------------------------------------- the loop
def train(
    task: nn.Module,
    train_dataset: Dataset,
    val_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    config: LoopConfig | dict | None = None,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    collate_fn: Callable | None = None,
    shuffle: bool = True,
) -> dict[str, Any]:
    """Train ``task`` on ``train_dataset`` (see the module docstring).

    Args:
        task: the task module.
        train_dataset: a map-style dataset (``set_epoch`` and ``collate_fn`` attributes are used).
        val_fn: ``val_fn(task) -> {metric: float}`` on the unwrapped task, or None.
        config: :class:`LoopConfig` or a dict for :meth:`LoopConfig.from_dict`.
        resume: continue from the newest checkpoint in ``<out_dir>/checkpoints`` (a fresh start
            when there is none).
        stop_after_steps: stop after this global step as if killed: no final checkpoint, no final
            model, no final validation (tests of resuming).
        collate_fn: overrides ``train_dataset.collate_fn``.
        shuffle: shuffle with :class:`EpochSampler` (False = dataset order).

    Returns:
        ``{"step", "epoch", "val": last validation metrics, "out_dir", "model_dir" (or None),
        "checkpoints": [paths], "stopped_early", "seconds", "steps_per_s"}``.
    """
    from accelerate.utils import DistributedType, set_seed

    cfg = config if isinstance(config, LoopConfig) else LoopConfig.from_dict(config)
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    acc = make_accelerator(cfg)
    is_ds = acc.distributed_type == DistributedType.DEEPSPEED
    if acc.is_main_process:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out_dir / "loop_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    acc.wait_for_everyone()
    set_seed(int(cfg.seed))

    # ---- data
    sampler = EpochSampler(len(train_dataset), seed=int(cfg.seed), shuffle=shuffle)
    loader = DataLoader(
        train_dataset,
        batch_size=int(cfg.batch_size),
        sampler=sampler,
        num_workers=int(cfg.num_workers),
        collate_fn=collate_fn or getattr(train_dataset, "collate_fn", None),
        drop_last=bool(cfg.drop_last),
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(int(cfg.seed)),  # keeps the global RNG untouched
    )

    # ---- model, optimizer, scheduler
    optimizer, scheduler = task.configure_optimizers()
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if scheduler is not None and is_ds and not plateau:
        model, optimizer, loader, scheduler = acc.prepare(task, optimizer, loader, scheduler)
        step_scheduler = False  # the DeepSpeed engine steps it
    else:
        model, optimizer, loader = acc.prepare(task, optimizer, loader)
        step_scheduler = scheduler is not None and not plateau
        if scheduler is not None:
            acc.register_for_checkpointing(scheduler)
    unwrapped = acc.unwrap_model(model)
    stopper = task.early_stopping() if hasattr(task, "early_stopping") else None
    state = TrainerState()
    acc.register_for_checkpointing(state)
    if stopper is not None:
        acc.register_for_checkpointing(_StateOf(stopper))

    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError(
            f"the train dataset ({len(train_dataset)} items) gives no batch of {cfg.batch_size} per process "
            f"(drop_last={cfg.drop_last}, {acc.num_processes} processes)"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / int(cfg.grad_accum))
    total = min(
        int(cfg.max_steps) if cfg.max_steps is not None else 1 << 62,
        int(cfg.epochs) * steps_per_epoch if cfg.epochs is not None else 1 << 62,
    )

    # ---- resume
    ckpt_dir = out_dir / "checkpoints"
    resumed_from = None
    if resume:
        last = latest_checkpoint(out_dir)
        if last is not None:
            verify_checksums(last)
            _load_state_weights_only(acc, last)
            resumed_from = last
            acc.print(f"resumed from {last} (step {state.step}, epoch {state.epoch}, batch {state.batch_in_epoch})")
        else:
            acc.print(f"no checkpoint in {ckpt_dir}: starting from scratch")

    # ---- logging
    csv_log = CSVLog(out_dir / "log.csv", resume_step=state.step if resumed_from else None) if acc.is_main_process else None
    tb = None
    if cfg.tensorboard and acc.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out_dir / "tb"), purge_step=state.step + 1 if resumed_from else None)
        except Exception:  # tensorboard not installed
            tb = None
    bar = None
    if cfg.progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(state.step, total), desc="train", dynamic_ncols=True, smoothing=0.1)

    def lr_now() -> float:
        return float(optimizer.param_groups[0]["lr"])

    def emit(row: dict[str, Any]) -> None:
        if csv_log is not None:
            csv_log.log(row)
        if tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    tb.add_scalar(k if "/" in k or k.startswith("val") else f"train/{k}", v, row["step"])

    def monitor_value(metrics: dict[str, float]) -> tuple[str, float] | None:
        key = cfg.monitor or ("dice" if "dice" in metrics else "loss" if "loss" in metrics else None)
        if key is None or key not in metrics:
            if cfg.monitor:
                raise KeyError(f"monitor {cfg.monitor!r} not among the validation metrics {sorted(metrics)}")
            return None
        return key, float(metrics[key])

    def validate() -> dict[str, float]:
        if val_fn is None:
            return {}
        model.eval()
        try:
            with torch.no_grad():
                metrics = {k: float(v) for k, v in val_fn(unwrapped).items()}
        finally:
            model.train()
        state.last_val, state.val_step = metrics, state.step
        mv = monitor_value(metrics)
        if mv is not None:
            if plateau:
                scheduler.step(mv[1])
            if stopper is not None and stopper.step(mv[1]):
                state.stopped_early = True
            higher = "dice" in mv[0] or "iou" in mv[0] or "acc" in mv[0]
            if state.best is None or (mv[1] > state.best if higher else mv[1] < state.best):
                state.best = mv[1]
        emit({"step": state.step, "epoch": state.epoch, "lr": lr_now(), **{f"val/{k}": v for k, v in metrics.items()}})
        if bar is not None and mv is not None:
            bar.write(f"step {state.step}: val {mv[0]} {mv[1]:.4f}")
        return metrics

    def save_checkpoint() -> Path:
        final = ckpt_dir / f"{CKPT_PREFIX}{state.step:07d}"
        tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state.state_dict(), indent=2))
            write_checksums(tmp)
            _replace_dir(tmp, final)
            for old in list_checkpoints(out_dir)[: -int(cfg.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    # ---- train
    model.train()
    window: dict[str, float] = {}
    window_n = 0
    t_window, window_step = time.perf_counter(), state.step
    t0, step0 = time.perf_counter(), state.step
    clip = float(cfg.grad_clip) if cfg.grad_clip else None
    killed = out_of_time = False
    while state.step < total and not state.stopped_early and not killed and not out_of_time:
        # accelerate's loaders call set_epoch(their own iteration counter) on the sampler and the
        # dataset when iterated; setting it here keeps it equal to our epoch, also after a resume.
        loader.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)
        if hasattr(train_dataset, "set_epoch"):
            train_dataset.set_epoch(state.epoch)
        epoch_loader = acc.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in epoch_loader:
            with acc.accumulate(model):
                out = model(batch)
                if not isinstance(out, dict) or "loss" not in out:
                    raise TypeError(f"{type(task).__name__}.forward must return a dict with a 'loss' tensor, got {type(out).__name__}")
                loss = out["loss"]
                acc.backward(loss)
                if clip and acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            for k, v in out.items():
                s = _scalar(v)
                if s is not None:
                    window[k] = window.get(k, 0.0) + s
            window_n += 1
            if not acc.sync_gradients:
                continue
            state.step += 1
            if step_scheduler and not acc.optimizer_step_was_skipped:
                scheduler.step()
            if bar is not None:
                bar.update(1)
            if state.step % int(cfg.log_every) == 0 or state.step == total:
                keys = sorted(window)
                vals = torch.tensor([window[k] / max(window_n, 1) for k in keys], device=acc.device)
                vals = acc.reduce(vals, "mean") if acc.num_processes > 1 else vals
                now = time.perf_counter()
                row = {"step": state.step, "epoch": state.epoch, "lr": lr_now(), **dict(zip(keys, vals.tolist()))}
                row["steps_per_s"] = (state.step - window_step) / max(now - t_window, 1e-9)
                t_window, window, window_n, window_step = now, {}, 0, state.step
                emit(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row['lr']:.2e}")
            if cfg.val_every and cfg.val_every > 0 and state.step % int(cfg.val_every) == 0:
                validate()
            if cfg.ckpt_every and state.step % int(cfg.ckpt_every) == 0:
                save_checkpoint()
            if stop_after_steps is not None and state.step >= stop_after_steps:
                killed = True
                break
            if cfg.max_minutes is not None and time.perf_counter() - t0 >= 60.0 * float(cfg.max_minutes):
                out_of_time = True
            if state.step >= total or state.stopped_early or out_of_time:
                break
        if not killed and state.batch_in_epoch >= batches_per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
            if cfg.val_every == 0 and state.step < total and not state.stopped_early and not out_of_time:
                validate()

    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "step": state.step, "epoch": state.epoch, "out_dir": str(out_dir), "model_dir": None,
        "stopped_early": state.stopped_early, "out_of_time": out_of_time, "seconds": seconds,
        "steps_per_s": (state.step - step0) / seconds if seconds > 0 else float("nan"),
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
    if not killed:
        if val_fn is not None and state.val_step != state.step:
            validate()
        if cfg.save_final_checkpoint and not (cfg.ckpt_every and state.step % int(cfg.ckpt_every) == 0):
            save_checkpoint()
        if hasattr(unwrapped, "save_pretrained"):
            model_dir = out_dir / "model"
            _save_final(acc, unwrapped, model_dir, is_ds)
            result["model_dir"] = str(model_dir)
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    result["val"] = dict(state.last_val)
    result["checkpoints"] = [str(p) for p in list_checkpoints(out_dir)]
    acc.wait_for_everyone()
    acc.free_memory()
    return result


def _save_final(acc, task: nn.Module, model_dir: Path, is_ds: bool) -> None:
    """``task.save_pretrained`` into a temp dir renamed atomically (main process); under ZeRO-3 the
    partitioned parameters are gathered first (collective)."""
    zero3 = is_ds and acc.state.deepspeed_plugin is not None and acc.state.deepspeed_plugin.zero_stage == 3
    tmp = model_dir.with_name(f"{TMP_PREFIX}{model_dir.name}")

    def _write() -> None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            task.save_pretrained(tmp)
            _replace_dir(tmp, model_dir)

    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(task.parameters()), modifier_rank=None):
            _write()
    else:
        _write()
    acc.wait_for_everyone()
