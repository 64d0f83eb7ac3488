"""Report statistics and leave-one-out discovery: pure functions, no models, no data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eval import report
from eval.suite import find_loo_checkpoint


def _row(stem: str, dice: float, draw: int = 0, error: str = "", hd95: float = 1.0, **kw) -> dict:
    base = {"dataset": "d", "label": "l", "method": "m", "k": 1, "supports": "random", "stem": stem,
            "draw": draw, "dice": dice, "iou": dice / 2, "hd95": hd95, "nsd": 0.5, "seconds": 0.1, "error": error}
    base.update(kw)
    return base


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_bootstrap_interval_contains_mean_and_is_reproducible(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.beta(0.5, 0.5, size=n)  # skewed, bimodal: the hard case for intervals
    lo, hi = report.bootstrap_ci(values, resamples=2000, seed=3)
    assert lo <= values.mean() <= hi
    assert (lo, hi) == report.bootstrap_ci(values, resamples=2000, seed=3)
    if n > 2:
        assert lo < hi
    if n > 5:  # with fewer values the 2.5% / 97.5% quantiles are the sample's min and max for any seed
        assert (lo, hi) != report.bootstrap_ci(values, resamples=2000, seed=4)


def test_bootstrap_interval_width_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(0.6, 0.1, 10)
    large = rng.normal(0.6, 0.1, 400)
    w_small = np.subtract(*report.bootstrap_ci(small)[::-1])
    w_large = np.subtract(*report.bootstrap_ci(large)[::-1])
    assert w_large < w_small / 3  # ~ 1/sqrt(n): sqrt(40) ~ 6.3
    lo, hi = report.bootstrap_ci(large)
    se = large.std(ddof=1) / math.sqrt(large.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_edge_cases() -> None:
    assert report.bootstrap_ci([0.4]) == (0.4, 0.4)
    lo, hi = report.bootstrap_ci([float("nan"), float("nan")])
    assert math.isnan(lo) and math.isnan(hi)
    assert report.bootstrap_ci([0.2, float("nan"), 0.2]) == (0.2, 0.2)
    with pytest.raises(ValueError, match="confidence"):
        report.bootstrap_ci([1.0], confidence=1.5)
    with pytest.raises(ValueError, match="resamples"):
        report.bootstrap_ci([1.0], resamples=0)


def test_summarize_averages_draws_excludes_errors_counts_nan() -> None:
    rows = [
        _row("a", 0.2, draw=0), _row("a", 0.4, draw=1),  # image a: mean 0.3
        _row("b", 0.9, draw=0, hd95=float("nan")), _row("b", 0.7, draw=1, hd95=float("nan")),  # b: 0.8, HD95 NaN
        _row("c", float("nan"), draw=0, error="RuntimeError: boom"),  # c failed in draw 0 only
        _row("c", 0.5, draw=1),
        _row("x", 0.1, method="other"),
    ]  # fmt: skip
    summary = report.summarize(rows, resamples=500)
    assert [s["method"] for s in summary] == ["m", "other"]
    s = summary[0]
    assert s["n"] == 3 and s["draws"] == 2 and s["errors"] == 1
    assert s["dice_mean"] == pytest.approx((0.3 + 0.8 + 0.5) / 3)
    assert s["dice_std"] == pytest.approx(np.std([0.3, 0.8, 0.5], ddof=1))
    assert s["dice_ci_low"] <= s["dice_mean"] <= s["dice_ci_high"]
    assert s["hd95_nan"] == 1 and s["hd95_mean"] == 1.0
    assert s["dice_nan"] == 0
    assert set(report.SUMMARY_COLUMNS) <= set(s)
    # order-independent: the bootstrap seed depends on the group, not on row order
    again = report.summarize(list(reversed(rows)), resamples=500)
    assert {x["method"]: x["dice_ci_low"] for x in again} == {x["method"]: x["dice_ci_low"] for x in summary}


def test_csv_round_trip_and_markdown(tmp_path) -> None:
    rows = [_row("a", 0.25), _row("b", float("nan"), error="ValueError: bad, really")]
    path = report.write_csv(rows, tmp_path / "r.csv", report.RESULT_COLUMNS)
    back = report.read_results(path)
    assert back[0]["dice"] == 0.25 and math.isnan(back[1]["dice"])
    assert back[1]["error"] == "ValueError: bad, really"
    md = report.markdown_table(report.summarize(rows, resamples=100), nsd_tolerance=2.0)
    assert md.splitlines()[0].startswith("| dataset | label | method | k | supports | n | Dice |")
    assert "NSD@2px" in md and "| 1 |" in md  # one error counted


def test_loo_summary_means_over_datasets() -> None:
    summary = [
        {"dataset": "A", "label": "x", "method": "segicl", "k": 1, "supports": "random", "dice_mean": 0.5},
        {"dataset": "B", "label": "y", "method": "segicl", "k": 1, "supports": "random", "dice_mean": 0.7},
        {"dataset": "B", "label": "z", "method": "segicl", "k": 1, "supports": "random", "dice_mean": 0.9},
    ]
    (row,) = report.loo_summary(summary)
    assert row["datasets"] == 2
    assert row["dice_mean"] == pytest.approx((0.5 + 0.8) / 2)  # B = mean of its labels
    assert row["per_dataset"] == "A=0.5000;B=0.8000"
    assert "| segicl | 1 | random | 2 | 0.650 |" in report.loo_markdown([row])


def test_find_loo_checkpoint(tmp_path) -> None:
    (tmp_path / "kvasir_seg").mkdir()
    (tmp_path / "run_17").mkdir()
    (tmp_path / "run_17" / "config.json").write_text(json.dumps({"train": {"exclude": ["acdc_cardiac_mri"]}}))
    (tmp_path / "run_18").mkdir()
    (tmp_path / "run_18" / "run.json").write_text(json.dumps({"exclude": ["hc18", "wbc"]}))
    assert find_loo_checkpoint(tmp_path, "kvasir_seg") == tmp_path / "kvasir_seg"
    assert find_loo_checkpoint(tmp_path, "acdc_cardiac_mri") == tmp_path / "run_17"
    with pytest.raises(FileNotFoundError, match="no checkpoint trained without hc18"):
        find_loo_checkpoint(tmp_path, "hc18")  # run_18 excludes two datasets: not a LOO checkpoint
    (tmp_path / "run_19").mkdir()
    (tmp_path / "run_19" / "config.json").write_text(json.dumps({"exclude": "acdc_cardiac_mri"}))
    with pytest.raises(FileNotFoundError, match="2 checkpoints"):
        find_loo_checkpoint(tmp_path, "acdc_cardiac_mri")


def test_dataset_pivot_table() -> None:
    summary = [
        {"dataset": "A", "label": "x", "method": "segicl", "k": 1, "supports": "random", "dice_mean": 0.5},
        {"dataset": "B", "label": "y", "method": "segicl", "k": 1, "supports": "random", "dice_mean": 0.6},
        {"dataset": "B", "label": "z", "method": "segicl", "k": 1, "supports": "random", "dice_mean": 0.8},
        {"dataset": "A", "label": "x", "method": "unet_supervised", "k": "", "supports": "train", "dice_mean": 0.9},
    ]
    lines = report.dataset_markdown(summary).splitlines()
    assert lines[0] == "| method | k | supports | A | B | mean |"
    assert lines[2] == "| segicl | 1 | random | 0.500 | 0.700 | 0.600 |"
    assert lines[3] == "| unet_supervised | – | train | 0.900 | – | – |"  # not run on B: no mean


# ---------------------------------------------------------------------------------- uncertainty
def _unc_row(stem: str, dice: float, unc_mean, unc_auroc=0.8, draw: int = 0, **kw) -> dict:
    return _row(stem, dice, draw=draw, unc_mean=unc_mean, unc_auroc=unc_auroc, **kw)


def test_tail_dice_and_spearman_hand_computed() -> None:
    unc = [0.5, 0.1, 0.9, 0.3]
    dice = [0.6, 0.9, 0.2, 0.8]
    assert report.tail_dice(unc, dice, 0.1) == (1, 0.9, 0.2)  # n = 4: one image per tail
    assert report.tail_dice(unc, dice, 0.5) == (2, pytest.approx(0.85), pytest.approx(0.4))
    n, lo, hi = report.tail_dice([0.3], [0.5])
    assert n == 0 and math.isnan(lo) and math.isnan(hi)
    assert report.tail_dice(list(range(30)), list(range(30)), 0.1)[0] == 3  # floor(0.1 * 30), not 2
    with pytest.raises(ValueError, match="fraction"):
        report.tail_dice(unc, dice, 0.7)
    rho, p = report.spearman(unc, dice)
    assert rho == pytest.approx(-1.0) and p < 0.1  # perfectly anti-monotone
    assert math.isnan(report.spearman([1, 2], [3, 4])[0])  # too few images
    assert math.isnan(report.spearman([1, 1, 1], [3, 4, 5])[0])  # constant uncertainty


def test_uncertainty_summary_groups_averages_draws_and_skips_unmeasured() -> None:
    rows = [
        # image a: two draws averaged -> unc 0.2, dice 0.8, auroc 0.9
        _unc_row("a", 0.7, 0.1, 1.0, draw=0), _unc_row("a", 0.9, 0.3, 0.8, draw=1),
        _unc_row("b", 0.3, 0.6, float("nan")),  # AUROC undefined: not in its mean
        _unc_row("c", 0.5, 0.4), _unc_row("c", 0.5, 0.4, label="l2"),  # another label: another image
        _unc_row("d", float("nan"), 0.9, error="RuntimeError: boom"),  # failed: left out
        _unc_row("e", 0.1, float("nan")),  # both masks empty: unc_mean NaN, not ranked
        _row("f", 0.5, method="no_unc", unc_mean=None, unc_auroc=None),  # method without uncertainty
        _row("g", 0.5, method="old"),  # no unc columns at all (older results)
    ]  # fmt: skip
    (s,) = report.uncertainty_summary(rows)
    assert {c: s[c] for c in report.UNCERTAINTY_GROUP} == {"dataset": "d", "method": "m", "k": "1", "supports": "random"}
    assert s["n"] == 4  # a, b, c/l, c/l2
    assert s["n_tail"] == 1
    assert s["dice_least_uncertain"] == pytest.approx(0.8)  # a (0.2)
    assert s["dice_most_uncertain"] == pytest.approx(0.3)  # b (0.6)
    assert s["dice_gap"] == pytest.approx(0.5)
    assert s["spearman_rho"] == pytest.approx(-1.0)  # unc 0.2, 0.6, 0.4, 0.4 vs dice 0.8, 0.3, 0.5, 0.5
    assert s["unc_mean_mean"] == pytest.approx((0.2 + 0.6 + 0.4 + 0.4) / 4)
    assert s["unc_auroc_mean"] == pytest.approx((0.9 + 0.8 + 0.8 + 0.8) / 4) and s["unc_auroc_n"] == 4
    assert set(report.UNCERTAINTY_COLUMNS) <= set(s)
    assert report.uncertainty_summary([r for r in rows if r["method"] != "m"]) == []
    md = report.uncertainty_markdown([s])
    assert md.splitlines()[2].startswith("| d | m | 1 | random | 4 | -1.000 |")
    assert "| 0.800 | 0.300 | 0.500 | 1 |" in md


def test_results_round_trip_keeps_unmeasured_uncertainty_empty(tmp_path) -> None:
    rows = [_unc_row("a", 0.5, 0.25, float("nan")), _row("b", 0.5, unc_mean=None, unc_auroc=None)]
    path = report.write_csv(rows, tmp_path / "r.csv", report.RESULT_COLUMNS)
    lines = path.read_text().splitlines()
    assert lines[1].split(",")[13:15] == ["0.25", "nan"] and lines[2].split(",")[13:15] == ["", ""]
    back = report.read_results(path)
    assert back[0]["unc_mean"] == 0.25 and math.isnan(back[0]["unc_auroc"])
    assert back[1]["unc_mean"] is None and back[1]["unc_auroc"] is None
    assert len(report.uncertainty_summary(back)) == 1
    png = report.plot_uncertainty(report.uncertainty_points(back), tmp_path / "u.png")
    assert png.stat().st_size > 1000
