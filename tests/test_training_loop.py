"""training.loop: kill/resume equivalence, atomic keep-last-M checkpoints, CSV log, plateau and
early stopping, final artifact. Tiny MLP tasks on synthetic data, one torch thread."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from training.loop import EpochSampler, LoopConfig, latest_checkpoint, list_checkpoints, train

torch.set_num_threads(1)


class Noisy(Dataset):
    """x -> y = x @ w + per-(epoch, index) noise: item i is a fixed function of (epoch, i)."""

    def __init__(self, n: int = 37, dim: int = 8):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g)
        self.epoch = 0
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        noise = torch.randn(1, generator=torch.Generator().manual_seed(self.epoch * 1000 + i)) * 0.01
        return {"x": self.x[i], "y": self.y[i] + noise}


class MLPTask(nn.Module):
    """Dropout (global RNG), AdamW, warmup LambdaLR: every piece of state a resume must restore."""

    def __init__(self, dim: int = 8, lr: float = 1e-2, plateau: bool = False, patience: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.lr, self.plateau, self.patience = lr, plateau, patience
        self.saved_to: Path | None = None

    def forward(self, batch):
        loss = nn.functional.mse_loss(self.net(batch["x"]), batch["y"])
        return {"loss": loss, "mae": (self.net(batch["x"]) - batch["y"]).abs().mean().detach()}

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if self.plateau:
            return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))

    def early_stopping(self):
        from training.vlsm_task import EarlyStopping

        return EarlyStopping(patience=self.patience, mode="min") if self.patience else None

    def save_pretrained(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(path) / "weights.pt")


def cfg(out: Path, **kw) -> dict:
    base = dict(max_steps=40, batch_size=4, grad_accum=2, log_every=5, ckpt_every=10, keep_last=2, seed=3,
                out_dir=str(out), progress=False, tensorboard=False)
    base.update(kw)
    return base


def test_resume_matches_uninterrupted_run(tmp_path):
    # 37 items / 4 per batch = 10 batches = 5 steps per epoch: the kill at 20 falls at an epoch
    # boundary, the one at 13 mid-epoch and mid-way through the dataset's epochs.
    full = MLPTask()
    res = train(full, Noisy(), lambda m: {"loss": 1.0}, cfg(tmp_path / "full", val_every=7))
    assert res["step"] == 40
    for kill_at in (13, 20):
        out = tmp_path / f"killed{kill_at}"
        first = MLPTask()
        r1 = train(first, Noisy(), lambda m: {"loss": 1.0}, cfg(out, val_every=7, ckpt_every=1 if kill_at == 13 else 10),
                   stop_after_steps=kill_at)
        assert r1["step"] == kill_at and r1["model_dir"] is None
        second = MLPTask()  # fresh weights: everything must come from the checkpoint
        torch.manual_seed(999)  # and a disturbed global RNG
        r2 = train(second, Noisy(), lambda m: {"loss": 1.0}, cfg(out, val_every=7, ckpt_every=1 if kill_at == 13 else 10), resume=True)
        assert r2["resumed_from"].endswith(f"step_{kill_at:07d}")
        assert r2["step"] == 40
        for (name, a), b in zip(full.state_dict().items(), second.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), (kill_at, name, (a - b).abs().max())
    # and the comparison is not vacuous: a different seed gives different weights
    other = MLPTask()
    train(other, Noisy(), None, cfg(tmp_path / "other", seed=4))
    assert not torch.allclose(full.net[0].weight, other.net[0].weight)


def test_checkpoints_atomic_keep_last_and_csv(tmp_path):
    task = MLPTask()
    res = train(task, Noisy(), lambda m: {"loss": 0.5, "dice": 0.25}, cfg(tmp_path, max_steps=35, val_every=10))
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_0000030", "step_0000035"]  # keep_last=2, final at 35
    assert latest_checkpoint(tmp_path) == ckpts[-1]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == 35 and state["epoch"] == 7
    assert (ckpts[-1] / "model.safetensors").is_file() and (ckpts[-1] / "optimizer.bin").is_file()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    cols = rows[0].keys()
    assert {"step", "epoch", "loss", "lr", "mae", "steps_per_s", "val/loss", "val/dice"} <= set(cols)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30, 35]
    assert rows[1]["val/dice"] == "0.25" and rows[0]["val/dice"] == ""
    assert float(rows[0]["lr"]) == pytest.approx(1e-2 * 6 / 10)  # warmup stepped once per optimizer step (5 steps done)
    assert res["model_dir"] and (Path(res["model_dir"]) / "weights.pt").is_file()
    assert res["val"] == {"loss": 0.5, "dice": 0.25}
    # a leftover temp dir from a crash is not a checkpoint and does not break resuming
    (tmp_path / "checkpoints" / ".tmp-step_0000040").mkdir()
    assert latest_checkpoint(tmp_path) == ckpts[-1]
    r2 = train(MLPTask(), Noisy(), None, cfg(tmp_path, max_steps=40), resume=True)
    assert r2["step"] == 40 and r2["resumed_from"].endswith("step_0000035")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_plateau_and_early_stopping(tmp_path):
    task = MLPTask(plateau=True, patience=2)
    res = train(task, Noisy(), lambda m: {"loss": 1.0}, cfg(tmp_path, max_steps=100, val_every=5, ckpt_every=0))
    # constant val loss: better once, then 2 bad validations -> stop at step 15
    assert res["stopped_early"] and res["step"] == 15
    rows = [r for r in csv.DictReader(open(tmp_path / "log.csv")) if r["val/loss"]]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([1e-2, 5e-3, 2.5e-3])  # ReduceLROnPlateau(patience=0) halves per bad val


class SlowNoisy(Noisy):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import time

        time.sleep(0.02)
        return super().__getitem__(i)


def test_max_minutes_stops_and_still_saves(tmp_path):
    # 4 items x 20 ms per optimizer step (batch 4, grad_accum 1): a 0.5 s budget ends after ~6 steps
    task = MLPTask()
    res = train(task, SlowNoisy(), lambda m: {"loss": 1.0},
                cfg(tmp_path, max_steps=1000, grad_accum=1, ckpt_every=0, val_every=-1, max_minutes=0.5 / 60))
    assert res["out_of_time"] and not res["stopped_early"]
    assert 1 <= res["step"] < 100
    assert res["model_dir"] and (Path(res["model_dir"]) / "weights.pt").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{res['step']:07d}"]
    assert res["val"] == {"loss": 1.0}  # the final validation ran
    with pytest.raises(ValueError, match="max_minutes"):
        LoopConfig.from_dict({"max_steps": 5, "max_minutes": 0})


def test_epochs_and_sampler_determinism(tmp_path):
    s = EpochSampler(10, seed=1)
    a = list(s)
    s.set_epoch(1)
    assert sorted(a) == list(range(10)) and list(s) != a
    s.set_epoch(0)
    assert list(s) == a
    data = Noisy(n=8)
    res = train(MLPTask(), data, None, cfg(tmp_path, max_steps=None, epochs=3, batch_size=4, grad_accum=1))
    assert res["step"] == 6 and res["epoch"] == 3 and sorted(set(data.epochs_seen)) == [0, 1, 2]
    with pytest.raises(ValueError, match="steps"):
        LoopConfig.from_dict({"batch_size": 2})
    with pytest.raises(TypeError, match="loss"):

        class Bad(MLPTask):
            def forward(self, batch):
                return self.net(batch["x"]).sum()

        train(Bad(), Noisy(), None, cfg(tmp_path / "bad"))
