"""`segicl demo` end to end on the shipped demo sample (a random tiny checkpoint; the shipped one in
test_checkpoint.py)."""

from __future__ import annotations

import csv

from eval.demo import run_demo
from segicl.pipeline import SegICLPipeline


def test_demo_writes_masks_overlays_and_summary(tmp_path):
    ck = SegICLPipeline.from_preset("tiny", seed=0).save_pretrained(tmp_path / "ck")
    res = run_demo(tmp_path / "out", checkpoint=str(ck), k=2, steps=2, samples=1, limit=1, progress=False)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["dataset"] for r in rows} == {"busbra_breast_us", "hc18_fetal_head_us", "fuseg_foot_ulcer"}
    assert sorted({r["k"] for r in rows}) == ["0", "2"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    for r in rows:
        d = out / r["dataset"]
        assert (d / f"{r['stem']}.png").is_file() and (d / f"{r['stem']}_overlay.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "Dice k=2 retrieved" in summary and "HD95 k=2" in summary and "NSD k=0" in summary
    assert all(r["nsd"] != "" for r in rows)
    assert len(res["summary"]) == 3
