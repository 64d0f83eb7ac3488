"""`segicl benchmark resolution` on the shipped demo sample (no model rows: fast)."""

from __future__ import annotations

import csv

from segicl.cli import main
from tests.conftest import REPO


def test_resolution_benchmark_writes_the_oracle_and_the_paths(tmp_path, capsys):
    demo = REPO / "segicl" / "assets" / "demo" / "hc18_fetal_head_us"
    out = tmp_path / "res"
    assert main(["benchmark", "resolution", "--data", str(demo), "--limit", "2", "--k", "2", "--sizes", "32,64,128",
                 "--no-model", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "resolution.csv")))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"oracle@32", "oracle@64", "oracle@128", "labelprop@64", "vote@128", "vote@native",
                       "forest@128", "forest@native"}  # the native path's classifiers above 64 px
    assert all(r["n"] == "2" for r in rows)
    oracle = [float(by[f"oracle@{s}"]["dice_mean"]) for s in (32, 64, 128)]
    assert oracle == sorted(oracle) and oracle[-1] > 0.95  # a head survives 128 px; finer is never worse here
    assert 0 <= float(by["forest@native"]["dice_mean"]) <= 1
    assert float(by["vote@128"]["s_per_img"]) > 0 and by["oracle@64"]["s_per_img"] == ""
    table = (out / "resolution.md").read_text()
    assert "| hc18_fetal_head_us | fetal head | 2 |" in table and "peak resident memory" in table
    assert "oracle@32" in capsys.readouterr().out
