"""`segicl benchmark folds` end to end on the demo sample: a 2-step stage 1 per fold (smoke scale)."""

from __future__ import annotations

import csv

from eval.bench import bench_folds
from segicl.cli import main
from tests.conftest import REPO


def test_folds_train_without_the_held_out_dataset_and_score_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_folds, "FOLDS", {"T": ("hc18_fetal_head_us",)})
    demo = REPO / "segicl" / "assets" / "demo"
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["benchmark", "folds", "--data", str(demo), "--folds", "T", "--steps", "2", "--limit", "1",
            "--runs", str(runs), "--out", str(out)]
    assert main(argv) == 0
    config = (runs / "T" / "config.yaml").read_text()
    assert "hc18_fetal_head_us" in config  # excluded from training
    rows = list(csv.DictReader(open(out / "folds.csv")))
    assert {r["method"] for r in rows} == {"segicl", "segicl:no_blend", "segicl:route", "labelprop"}
    assert all(r["dataset"] == "hc18_fetal_head_us" and 0 <= float(r["dice"]) <= 1 for r in rows)
    assert "| T | hc18_fetal_head_us |" in (out / "folds.md").read_text()
    assert main(argv) == 0  # resumable: the trained fold is reused
    assert list(csv.DictReader(open(out / "folds.csv")))[0]["train_s"] == "0"
