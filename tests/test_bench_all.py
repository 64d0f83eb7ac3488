"""`segicl benchmark all` and `segicl benchmark embedders` on the demo sample; the README's tables stay
in sync with the generated ones."""

from __future__ import annotations

import csv
import json
import re

import pytest

from segicl.cli import main
from tests.conftest import REPO

DEMO = REPO / "segicl" / "assets" / "demo"
PLAN = """
steps:
  - name: in_domain/lp
    quick: true
    done: in_domain/lp/summary.csv
    command: [evaluate, --data, "{data}", --split, test, --methods, labelprop, --k, "3", --supports, retrieved,
              --limit, "2", --no-progress, --out, "{out}/in_domain/lp"]
  - name: emb
    quick: false
    done: emb/embedders.md
    command: [benchmark, embedders, --data, "{data}", --split, test, --k, "3", --limit, "1", --methods, labelprop,
              --embedders, pixel, hog, --out, "{out}/emb"]
in_domain_table:
  - {row: "**LP**", run: in_domain/lp, method: labelprop, k: 3}
short_names: {hc18_fetal_head_us: HC18}
"""


def test_benchmark_all_quick_then_resume_writes_every_table(tmp_path):
    plan, out = tmp_path / "plan.yaml", tmp_path / "results"
    plan.write_text(PLAN)
    base = ["benchmark", "all", "--data", str(DEMO), "--out", str(out), "--runs", str(tmp_path / "runs"), "--plan", str(plan)]
    assert main([*base, "--quick"]) == 0
    assert not (out / "emb").exists()  # not a quick step
    assert sorted(p.name for p in (out / "in_domain" / "lp").iterdir()) == ["dice_vs_k.png", "run.json", "summary.csv",
                                                                            "summary.md"]  # per-image rows pruned
    table = (out / "in_domain" / "table.md").read_text()
    assert table.splitlines()[0] == "| method | k | busbra_breast_us | fuseg_foot_ulcer | HC18 | mean Dice | mean HD95 |"
    row = table.splitlines()[2]
    dice = [float(x) for x in re.findall(r"\d\.\d{3}", row)]
    summary = list(csv.DictReader(open(out / "in_domain" / "lp" / "summary.csv")))
    assert len(dice) == 4 and dice[:3] == [round(float(r["dice_mean"]), 3) for r in summary]  # one label each
    assert row.startswith("| **LP** | 3 |") and f"**{sum(dice[:3]) / 3:.3f}**" in row
    first = json.loads((out / "steps.json").read_text())["in_domain/lp"]
    assert main([*base, "--resume"]) == 0
    steps = json.loads((out / "steps.json").read_text())
    assert steps["in_domain/lp"] == first and "emb" in steps  # the finished step was skipped, the other ran
    rows = list(csv.DictReader(open(out / "emb" / "embedders.csv")))
    assert {r["embedder"] for r in rows} == {"random supports", "pixel", "hog"}
    assert {r["dataset"] for r in rows} == {"busbra_breast_us", "fuseg_foot_ulcer", "hc18_fetal_head_us"}
    results = (out / "results.md").read_text()
    assert table in results and "| labelprop | hog |" in results and "## emb" in results
    assert "segicl benchmark embedders" in results and "| in_domain/lp |" in results


def test_benchmark_all_rejects_unknown_steps(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    with pytest.raises(SystemExit, match="unknown steps"):
        main(["benchmark", "all", "--data", str(DEMO), "--out", str(tmp_path / "o"), "--plan", str(plan), "--only", "nope"])
def _table_rows(text: str, first_cell: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(first_cell) and "---" not in ln]


def test_readme_tables_are_the_generated_ones():
    """Every number of the README's two results tables comes from docs/results (segicl benchmark all)."""
    readme = (REPO / "README.md").read_text()
    in_domain = (REPO / "docs" / "results" / "in_domain" / "table.md").read_text()
    for line in _table_rows(in_domain, "| method |"):
        assert line in readme, f"README in-domain table differs from docs/results/in_domain/table.md: {line}"
    folds = (REPO / "docs" / "results" / "folds" / "folds.md").read_text()
    per_fold = folds.split("Mean Dice per fold")[1]
    for line in _table_rows(per_fold, "| fold |"):
        assert line in readme, f"README fold table differs from docs/results/folds/folds.md: {line}"
