"""`segicl benchmark vlsm-quality`: the cell plan, one tiny cell end to end on real data, its resume, and
the supervised U-Net's early stopping."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from eval.bench import bench_vlsm_quality as bvq
from eval.bench import cli
from eval.bench.bench_folds import FOLDS
from tests.conftest import DATASETS


def main(argv: list[str]) -> int:
    """``segicl benchmark ...`` through the benchmark plugin's own registration (not every installed plugin)."""
    parser = argparse.ArgumentParser(prog="segicl")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _args(**kw) -> argparse.Namespace:
    return bvq.add_arguments(argparse.ArgumentParser()).parse_args(["--data", "d", "--out", "o", *kw.pop("argv", [])])


def test_plan_has_every_protocol_cell() -> None:
    cells = bvq.plan(_args(), sorted(DATASETS))
    by = {p: [c for c in cells if c.protocol == p] for p in bvq.PROTOCOLS}
    assert len([c for c in by["supervised"] if c.model != "unet"]) == 4 * 8  # four models x eight datasets, e2e
    assert len([c for c in by["supervised"] if c.model == "unet"]) == 8
    assert len(by["prompts"]) == 2 * 10 and {c.prompt for c in by["prompts"]} == set(bvq.PROMPTS)
    assert len(by["modes"]) == 2 * 9 and {c.test for c in by["modes"]} == {(d,) for d in bvq.TWO}
    assert len(by["zeroshot_folds"]) == 4 * len(FOLDS)
    for c in by["zeroshot_folds"]:  # the folds of bench_folds: trained without the held-out datasets
        assert c.test == FOLDS[c.fold] and not set(c.train) & set(FOLDS[c.fold])
    # the supervised CLIPSeg cell and the prompts protocol's P1 cell share one trained model
    sup = next(c for c in by["supervised"] if c.model == "clipseg" and c.train == ("kvasir_seg",))
    p1 = next(c for c in by["prompts"] if c.prompt == "p1" and c.train == ("kvasir_seg",))
    assert sup.run_dir(Path("r")) == p1.run_dir(Path("r")) and sup.key != p1.key
    sub = bvq.plan(_args(argv=["--protocols", "modes", "--modes", "vpt", "--datasets", "kvasir_seg"]), sorted(DATASETS))
    assert [(c.model, c.mode, c.train) for c in sub] == [("clipseg", "vpt", ("kvasir_seg",))]


def test_tiny_cell_end_to_end_then_resumed_without_training(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "rossa_octa_vessel").symlink_to(shared_data / "rossa_octa_vessel")
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["benchmark", "vlsm-quality", "--data", str(data), "--out", str(out), "--runs", str(runs), "--protocols",
            "supervised", "--models", "clipseg", "--train-steps", "2", "--limit", "2", "--no-progress"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "vlsm.csv")))
    assert len(rows) == 1
    row = rows[0]
    assert (row["protocol"], row["model"], row["mode"], row["prompt"], row["dataset"], row["n"]) == (
        "supervised", "clipseg", "e2e", "p1", "rossa_octa_vessel", "2")
    assert 0 <= float(row["dice"]) <= 1 and int(row["steps"]) == 2 and float(row["train_seconds"]) > 0
    run = runs / "clipseg" / "e2e-p1" / "rossa_octa_vessel"
    assert (run / "model" / "config.json").is_file()
    run_json = json.loads((run / "eval_rossa_octa_vessel_n2" / "run.json").read_text())
    assert "--vlsm-prompt p1" in run_json["command"] and "prompt level p1" in str(run_json["methods"])
    assert "| rossa_octa_vessel / retinal vessel (OCTA) |" in (out / "vlsm.md").read_text()

    def refuse(*_a, **_k):
        raise AssertionError("a finished cell was trained or evaluated again")

    monkeypatch.setattr("training.cli.main", refuse)
    monkeypatch.setattr("eval.cli.main", refuse)
    assert main(argv) == 0  # finished: row in the CSV and model saved
    assert list(csv.DictReader(open(out / "vlsm.csv"))) == rows
    (out / "vlsm.csv").unlink()  # model saved, rows lost: evaluated again (summary reused), not retrained
    assert main(argv) == 0
    assert list(csv.DictReader(open(out / "vlsm.csv"))) == rows


def test_unet_early_stopping_keeps_the_best_weights(shared_data: Path) -> None:
    from eval.methods import UNetSupervised
    from eval.unet import UNetConfig
    from segicl.data import load_dataset

    ds = load_dataset(shared_data / "hc18_fetal_head_us")
    cfg = UNetConfig.from_dict({"size": 32, "channels": [8, 16], "strides": [2], "num_res_units": 0, "batch_size": 2,
                                "steps": 200, "val_every": 2, "patience": 1, "min_steps": 10, "max_train_items": 8,
                                "max_val_items": 4})
    method = UNetSupervised(cfg, seed=0)
    method.prepare(ds, 255)
    log = method.training_log[0]
    assert log["dataset"] == "hc18_fetal_head_us" and 10 <= log["steps"] < 200  # stopped on the val Dice, not before min_steps
    assert log["best_step"] <= log["steps"] and 0 <= log["best_val_dice"] <= 1
    assert UNetConfig.from_dict({}).val_every == 0  # the default keeps the fixed budget
    with pytest.raises(ValueError, match="patience"):
        UNetConfig.from_dict({"patience": 0})
