"""`segicl benchmark folds` end to end on the demo sample: 2-step stage 1, dense matcher and UniverSeg-style
comparator per fold (smoke scale)."""

from __future__ import annotations

import csv

from eval.bench import bench_folds
from segicl.cli import main
from tests.conftest import REPO


def test_folds_train_without_the_held_out_dataset_and_score_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_folds, "FOLDS", {"T": ("hc18_fetal_head_us", "busbra_breast_us")})
    demo = REPO / "segicl" / "assets" / "demo"
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["benchmark", "folds", "--data", str(demo), "--folds", "T", "--steps", "2", "--dense-steps", "2",
            "--universeg-steps", "2", "--limit", "1", "--runs", str(runs), "--out", str(out)]
    assert main(argv) == 0
    for part in ("", "dense", "universeg"):  # every model of the fold trained without the held-out dataset
        assert "hc18_fetal_head_us" in (runs / "T" / part / "config.yaml").read_text()
    rows = list(csv.DictReader(open(out / "folds.csv")))
    assert {r["method"] for r in rows} == {"learned", "learned+native", "route+native", "route+native-raw", "route",
                                           "labelprop", "universeg"}
    assert {(r["k"], r["supports"]) for r in rows if r["method"] == "learned"} == {("0", "none"), ("5", "retrieved"),
                                                                                  ("5", "shuffled")}
    assert all(r["dataset"] in bench_folds.FOLDS["T"] and 0 <= float(r["dice"]) <= 1 for r in rows)
    table = (out / "folds.md").read_text()
    assert "| T | hc18_fetal_head_us |" in table and "learned - labelprop" in table
    assert main(argv) == 0  # resumable: the trained fold is reused
    assert "T 0 / " in (out / "folds.md").read_text()

    # --models stage1: only stage 1 of a fresh fold is trained; the route rows are re-measured, the learned and
    # UniverSeg rows (no such models in runs2) kept from the folds.csv already there
    before = {(r["method"], r["k"], r["supports"], r["dataset"]): r["dice"] for r in rows}
    runs2 = tmp_path / "runs2"
    assert main([*argv[:-4], "--runs", str(runs2), "--out", str(out), "--models", "stage1"]) == 0
    assert (runs2 / "T" / "model" / "manifest.json").is_file()
    assert not (runs2 / "T" / "dense").exists() and not (runs2 / "T" / "universeg").exists()
    after = list(csv.DictReader(open(out / "folds.csv")))
    assert {r["method"] for r in after} == {r["method"] for r in rows}
    assert all(before[(r["method"], r["k"], r["supports"], r["dataset"])] == r["dice"] for r in after
               if r["method"] in ("learned", "learned+native", "universeg"))
    assert "fold T: learned, learned+native, universeg" in (out / "folds.md").read_text()
