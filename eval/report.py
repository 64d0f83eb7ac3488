"""Turn per-image results into what goes in a paper: summary table, bootstrap intervals, plots.

Statistics of one group (dataset, label, method, k, supports):

1. rows whose method raised (``error`` set) are left out of the metrics and counted in ``errors``;
2. the draws of one image are averaged first (NaN-aware), so an image counts once however many
   support draws it had: ``n`` is a number of images, and the bootstrap resamples images;
3. per metric: mean and sample std (ddof=1) of the finite per-image values, the count of undefined
   values (``*_nan``: HD95/NSD where a mask is empty, see :mod:`eval.metrics`), and a percentile
   bootstrap interval of the mean (``resamples`` resamples of the images, a generator seeded from
   the bootstrap seed and the group, so the interval does not depend on row order).

Uncertainty analysis (:func:`uncertainty_summary`; only rows whose method measured an uncertainty,
see :func:`eval.metrics.uncertainty_metrics`) per (dataset, method, k, supports), over the images
(label, stem) of the group, draws of one image averaged first:

- Spearman correlation between an image's ``unc_mean`` and its Dice (negative: the more uncertain
  images are segmented worse);
- mean Dice of the least and of the most uncertain ``fraction`` (10 %) of the images by
  ``unc_mean``, at least one image each, and their difference ``dice_gap`` = least - most
  (positive: uncertainty flags the bad images);
- the mean pixel-level ``unc_auroc`` (does uncertainty mark the wrong pixels within an image).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.methods import derive_seed
from eval.metrics import METRICS, UNCERTAINTY_METRICS

RESULT_COLUMNS = [
    "dataset", "label", "label_value", "stem", "method", "k", "supports", "draw", "support_stems",
    "dice", "iou", "hd95", "nsd", *UNCERTAINTY_METRICS, "seconds", "error",
]  # fmt: skip
"""Columns of results.csv: one row per (dataset, label, stem, method, k, supports, draw)."""

GROUP_COLUMNS = ["dataset", "label", "method", "k", "supports"]
SUMMARY_COLUMNS = [
    *GROUP_COLUMNS, "n", "draws", "errors",
    *[f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci_low", "ci_high", "nan")],
    "seconds_mean",
]  # fmt: skip
"""Columns of summary.csv: per group, n images, draws, errors and per metric mean/std/CI/NaN count."""

LOO_COLUMNS = ["method", "k", "supports", "datasets", "dice_mean", "dice_min", "dice_max", "per_dataset"]
"""Columns of loo.csv: per (method, k, supports), Dice averaged over the held-out datasets."""

UNCERTAINTY_GROUP = ["dataset", "method", "k", "supports"]
UNCERTAINTY_COLUMNS = [
    *UNCERTAINTY_GROUP, "n", "spearman_rho", "spearman_p", "n_tail", "dice_least_uncertain",
    "dice_most_uncertain", "dice_gap", "unc_mean_mean", "unc_auroc_mean", "unc_auroc_n",
]  # fmt: skip
"""Columns of uncertainty.csv: per (dataset, method, k, supports), see :func:`uncertainty_summary`."""

UNCERTAINTY_FRACTION = 0.1
"""Share of the images in each tail (most / least uncertain) of the decile comparison."""

METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)", "nsd": "NSD"}


# ----------------------------------------------------------------------------------- csv i/o
def format_value(value: Any) -> str:
    """CSV text of a value: floats in full precision (``repr``), NaN as ``nan``, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(value) else repr(float(value))
    return str(value)


def write_csv(rows: Iterable[dict], path: Path, columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with exactly ``columns``; missing keys are written empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([format_value(row.get(c)) for c in columns])
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    """Read results.csv back: metrics and seconds as floats (NaN for ``nan``), draw as int.

    The uncertainty columns are floats, or None where empty (not measured, or an older file).
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for m in (*METRICS, "seconds"):
                row[m] = float(row[m]) if row[m] not in ("", None) else math.nan
            for m in UNCERTAINTY_METRICS:
                row[m] = float(row[m]) if row.get(m) not in ("", None) else None
            row["draw"] = int(row["draw"])
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------- statistics
def bootstrap_ci(
    values: Sequence[float], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite ``values``.

    Args:
        values: per-image values; NaN entries are ignored.
        resamples: number of bootstrap resamples.
        confidence: interval mass, e.g. 0.95.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no value is finite, ``(v, v)`` for a single value.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(resamples, arr.size))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # The percentile interval of a mean brackets the sample mean except for floating-point ties.
    mean = float(arr.mean())
    return min(float(low), mean), max(float(high), mean)


def _group_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in GROUP_COLUMNS)


def summarize(
    rows: Sequence[dict], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> list[dict[str, Any]]:
    """Summary rows (:data:`SUMMARY_COLUMNS`) per group, in order of first appearance in ``rows``."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if not r.get("error")]
        per_stem: dict[str, list[dict]] = {}
        for r in ok:
            per_stem.setdefault(str(r["stem"]), []).append(r)
        summary: dict[str, Any] = dict(zip(GROUP_COLUMNS, key))
        summary["n"] = len(per_stem)
        summary["draws"] = max((len(v) for v in per_stem.values()), default=0)
        summary["errors"] = len(members) - len(ok)
        stems = sorted(per_stem)  # the bootstrap resamples images in a fixed order: row order does not matter
        for m in METRICS:
            vals = np.array([_nanmean([float(r[m]) for r in per_stem[st]]) for st in stems], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            summary[f"{m}_mean"] = float(finite.mean()) if finite.size else math.nan
            summary[f"{m}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
            lo, hi = bootstrap_ci(finite, resamples, confidence, derive_seed(seed, "bootstrap", m, *key))
            summary[f"{m}_ci_low"], summary[f"{m}_ci_high"] = lo, hi
            summary[f"{m}_nan"] = int(vals.size - finite.size)
        secs = [float(r["seconds"]) for r in ok if math.isfinite(float(r["seconds"]))]
        summary["seconds_mean"] = float(np.mean(secs)) if secs else math.nan
        out.append(summary)
    return out


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def dataset_dice(summary: Sequence[dict]) -> dict[tuple[str, str, str, str], float]:
    """Dice per (dataset, method, k, supports), the mean over the dataset's labels (NaN if any is NaN)."""
    acc: dict[tuple[str, str, str, str], list[float]] = {}
    for s in summary:
        acc.setdefault((s["dataset"], s["method"], str(s["k"]), s["supports"]), []).append(float(s["dice_mean"]))
    return {key: (float(np.mean(v)) if all(math.isfinite(x) for x in v) else math.nan) for key, v in acc.items()}


def loo_summary(summary: Sequence[dict]) -> list[dict[str, Any]]:
    """Leave-one-dataset-out table: per (method, k, supports), Dice averaged over held-out datasets.

    Each dataset enters with the mean Dice over its labels (:func:`dataset_dice`); ``per_dataset``
    lists them as ``name=value``.
    """
    per: dict[tuple[str, str, str], dict[str, float]] = {}
    for (dataset, method, k, supports), dice_value in dataset_dice(summary).items():
        per.setdefault((method, k, supports), {})[dataset] = dice_value
    rows = []
    for (method, k, supports), by_ds in per.items():
        vals = np.array(list(by_ds.values()), dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        rows.append({
            "method": method, "k": k, "supports": supports, "datasets": len(by_ds),
            "dice_mean": float(finite.mean()) if finite.size else math.nan,
            "dice_min": float(finite.min()) if finite.size else math.nan,
            "dice_max": float(finite.max()) if finite.size else math.nan,
            "per_dataset": ";".join(f"{d}={v:.4f}" for d, v in by_ds.items()),
        })  # fmt: skip
    return rows


# ------------------------------------------------------------------------------- uncertainty
def uncertainty_points(rows: Sequence[dict]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Per (dataset, method, k, supports): one point per image with a measured uncertainty.

    Rows with an error or without uncertainty (``unc_mean`` None or absent) are left out. An image is
    a (label, stem) pair; its draws are averaged (NaN-aware). Points are sorted by (label, stem) and
    groups keep their order of first appearance.

    Returns:
        ``{group: [{"label", "stem", "unc_mean", "dice", "unc_auroc"}, ...]}``.
    """
    per_image: dict[tuple[str, ...], dict[tuple[str, str], list[dict]]] = {}
    for row in rows:
        if row.get("error") or row.get("unc_mean") in ("", None):
            continue
        key = tuple(str(row[c]) for c in UNCERTAINTY_GROUP)
        per_image.setdefault(key, {}).setdefault((str(row["label"]), str(row["stem"])), []).append(row)
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for key, images in per_image.items():
        out[key] = [
            {"label": label, "stem": stem,
             **{m: _nanmean([_float(r.get(m)) for r in draws]) for m in ("unc_mean", "dice", "unc_auroc")}}
            for (label, stem), draws in sorted(images.items())
        ]  # fmt: skip
    return out


def _float(value: Any) -> float:
    return math.nan if value in ("", None) else float(value)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (``scipy.stats.spearmanr``).

    ``(nan, nan)`` with fewer than 3 pairs or when either side is constant.
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    res = spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


def tail_dice(unc: Sequence[float], dice_values: Sequence[float], fraction: float = UNCERTAINTY_FRACTION
              ) -> tuple[int, float, float]:
    """Mean Dice of the least and of the most uncertain ``fraction`` of the images.

    Each tail holds ``max(1, floor(fraction * n))`` images; with ties in uncertainty the earlier
    image (input order) counts as less uncertain, so the result is deterministic.

    Returns:
        ``(n_tail, dice_least_uncertain, dice_most_uncertain)``; NaNs with n_tail 0 when n < 2.
    """
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    u, d = np.asarray(unc, dtype=np.float64), np.asarray(dice_values, dtype=np.float64)
    if u.size < 2:
        return 0, math.nan, math.nan
    n_tail = max(1, math.floor(fraction * u.size + 1e-9))
    order = np.argsort(u, kind="stable")
    return n_tail, float(d[order[:n_tail]].mean()), float(d[order[-n_tail:]].mean())


def uncertainty_summary(rows: Sequence[dict], fraction: float = UNCERTAINTY_FRACTION) -> list[dict[str, Any]]:
    """Does uncertainty flag the bad images? Rows of :data:`UNCERTAINTY_COLUMNS` (module docstring).

    ``n`` counts the images with a finite ``unc_mean`` and Dice (those ranked);
    ``unc_auroc_n`` those with a finite pixel AUROC. Empty when no row measured an uncertainty.
    """
    out = []
    for key, points in uncertainty_points(rows).items():
        ranked = [p for p in points if math.isfinite(p["unc_mean"]) and math.isfinite(p["dice"])]
        unc = [p["unc_mean"] for p in ranked]
        dice_values = [p["dice"] for p in ranked]
        rho, pval = spearman(unc, dice_values)
        n_tail, least, most = tail_dice(unc, dice_values, fraction)
        aurocs = [p["unc_auroc"] for p in points if math.isfinite(p["unc_auroc"])]
        out.append({
            **dict(zip(UNCERTAINTY_GROUP, key)), "n": len(ranked), "spearman_rho": rho, "spearman_p": pval,
            "n_tail": n_tail, "dice_least_uncertain": least, "dice_most_uncertain": most, "dice_gap": least - most,
            "unc_mean_mean": float(np.mean(unc)) if unc else math.nan,
            "unc_auroc_mean": float(np.mean(aurocs)) if aurocs else math.nan, "unc_auroc_n": len(aurocs),
        })  # fmt: skip
    return out


def uncertainty_markdown(rows: Sequence[dict], fraction: float = UNCERTAINTY_FRACTION) -> str:
    """Markdown of :func:`uncertainty_summary` with a note on what each column means."""
    head = ["dataset", "method", "k", "supports", "n", "Spearman ρ (unc, Dice)", "p",
            f"Dice least unc. {fraction:.0%}", f"Dice most unc. {fraction:.0%}", "gap", "tail n",
            "mean unc", "pixel AUROC", "AUROC n"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def f(v: float, digits: int = 3) -> str:
        return f"{v:.{digits}f}" if math.isfinite(v) else "–"

    for r in rows:
        cells = [r["dataset"], r["method"], str(r["k"]) if r["k"] not in (None, "") else "–", r["supports"],
                 str(r["n"]), f(r["spearman_rho"]), f"{r['spearman_p']:.2g}" if math.isfinite(r["spearman_p"]) else "–",
                 f(r["dice_least_uncertain"]), f(r["dice_most_uncertain"]), f(r["dice_gap"]), str(r["n_tail"]),
                 f(r["unc_mean_mean"], 4), f(r["unc_auroc_mean"]), str(r["unc_auroc_n"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nPer image (label, stem; draws averaged): `unc_mean` = mean uncertainty over predicted ∪ true "
        "foreground. ρ: Spearman correlation of unc_mean with Dice over the n images (negative = uncertain "
        f"images are worse). Dice least/most unc.: mean Dice of the {fraction:.0%} of images (at least 1, "
        "'tail n') with the lowest / highest unc_mean; gap = least − most (positive = uncertainty flags the "
        "bad images). Pixel AUROC: how well the uncertainty separates misclassified from correct pixels "
        "within an image (0.5 = chance), averaged over images where it is defined.\n"
    )
    return "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------------------------- markdown
def _cell(s: dict, m: str, digits: int = 3) -> str:
    mean, std, lo, hi = (s[f"{m}_{x}"] for x in ("mean", "std", "ci_low", "ci_high"))
    if not math.isfinite(mean):
        return "–"
    std_txt = f" ± {std:.{digits}f}" if math.isfinite(std) else ""
    return f"{mean:.{digits}f}{std_txt} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown_table(summary: Sequence[dict], nsd_tolerance: float | None = None, confidence: float = 0.95) -> str:
    """The summary as a Markdown table: mean ± std [bootstrap interval] per metric."""
    nsd_title = f"NSD@{nsd_tolerance:g}px" if nsd_tolerance is not None else "NSD"
    head = ["dataset", "label", "method", "k", "supports", "n", "Dice", "IoU", "HD95 (px)", nsd_title,
            "NaN HD95/NSD", "errors", "s/img"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summary:
        secs = s["seconds_mean"]
        cells = [
            s["dataset"], s["label"], s["method"], str(s["k"]) if s["k"] not in (None, "") else "–",
            s["supports"], str(s["n"]), _cell(s, "dice"), _cell(s, "iou"), _cell(s, "hd95", 1), _cell(s, "nsd"),
            f"{s['hd95_nan']}/{s['nsd_nan']}", str(s["errors"]), f"{secs:.3f}" if math.isfinite(secs) else "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nCells: mean ± std [{confidence:.0%} percentile-bootstrap interval of the mean] over images "
        "(draws of one image averaged first). HD95/NSD are undefined (NaN) when a mask is empty and are "
        "left out of the means; their counts are in 'NaN HD95/NSD'. Failed predictions are counted in "
        "'errors' and left out of every metric.\n"
    )
    return "\n".join(lines) + "\n" + note


def dataset_markdown(summary: Sequence[dict]) -> str:
    """Paper-style pivot: one row per (method, k, supports), one Dice column per dataset, and their mean.

    A dataset's cell is the mean Dice over its labels (:func:`dataset_dice`).
    """
    by = dataset_dice(summary)
    datasets = list(dict.fromkeys(d for d, *_ in by))
    configs = list(dict.fromkeys((m, k, p) for _, m, k, p in by))
    head = ["method", "k", "supports", *datasets, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m, k, p in configs:
        vals = [by.get((d, m, k, p), math.nan) for d in datasets]
        mean = float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else math.nan
        cells = [m, k if k != "" else "–", p, *[f"{v:.3f}" if math.isfinite(v) else "–" for v in vals],
                 f"{mean:.3f}" if math.isfinite(mean) else "–"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def loo_markdown(rows: Sequence[dict]) -> str:
    """Markdown of :func:`loo_summary`."""
    head = ["method", "k", "supports", "held-out datasets", "mean Dice", "min", "max", "per dataset"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["method"], str(r["k"]) if r["k"] != "" else "–", r["supports"], str(r["datasets"]),
                 f"{r['dice_mean']:.3f}", f"{r['dice_min']:.3f}", f"{r['dice_max']:.3f}",
                 r["per_dataset"].replace(";", ", ")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- plots
def plot_dice_vs_k(summary: Sequence[dict], path: Path) -> Path:
    """Dice against k: one panel per dataset, one line per (method, support policy).

    A dataset's value is the mean over its labels. The k = 0 point (no supports) starts every policy
    line of its method. Methods without supports (VLSM, supervised U-Net) are horizontal dashed lines.
    The shaded band is the bootstrap interval, drawn for single-label datasets.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    if not datasets:
        raise ValueError("nothing to plot: empty summary")
    ncol = min(len(datasets), 4)
    nrow = math.ceil(len(datasets) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(s["method"] for s in summary))
    color_of = {m: colors[i % len(colors)] for i, m in enumerate(methods)}
    styles = {"random": "-", "retrieved": "--"}
    for ax, dataset in zip(axes.flat, datasets):
        rows = [s for s in summary if s["dataset"] == dataset]
        single_label = len({s["label"] for s in rows}) == 1
        by_line: dict[tuple[str, str], dict[int, list[dict]]] = {}
        flat: dict[str, list[dict]] = {}
        for s in rows:
            if s["k"] in ("", None):
                flat.setdefault(s["method"], []).append(s)
            else:
                by_line.setdefault((s["method"], s["supports"]), {}).setdefault(int(s["k"]), []).append(s)
        lines: dict[tuple[str, str], dict[int, list[dict]]] = {}
        for (method, policy), pts in by_line.items():
            if policy == "none":
                continue
            merged = dict(pts)
            merged.update(by_line.get((method, "none"), {}))
            lines[(method, policy)] = merged
        for (method, policy), pts in by_line.items():  # a method evaluated at k = 0 only
            if policy == "none" and not any(m == method for m, _ in lines):
                lines[(method, "none")] = pts
        for (method, policy), pts in lines.items():
            ks = sorted(pts)
            y = [float(np.mean([p["dice_mean"] for p in pts[k]])) for k in ks]
            ax.plot(ks, y, styles.get(policy, ":"), marker="o", color=color_of[method], label=f"{method} ({policy})")
            if single_label:
                lo = [pts[k][0]["dice_ci_low"] for k in ks]
                hi = [pts[k][0]["dice_ci_high"] for k in ks]
                ax.fill_between(ks, lo, hi, color=color_of[method], alpha=0.12, linewidth=0)
        for method, pts in flat.items():
            y = float(np.mean([p["dice_mean"] for p in pts]))
            ax.axhline(y, linestyle=(0, (4, 2)), color=color_of[method], label=f"{method} ({pts[0]['supports']})")
        ax.set_title(dataset if single_label else f"{dataset} (mean over {len({s['label'] for s in rows})} labels)",
                     fontsize=9)
        all_k = sorted({k for pts in lines.values() for k in pts})
        if all_k:
            ax.set_xticks(all_k)
        ax.set_xlabel("k (supports)")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    lcol = max(1, min(len(labels), 2 * ncol))  # legend columns: as many as the panels' width holds
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=lcol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.06 + 0.03 * math.ceil(len(labels) / lcol)) / nrow, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # never cut the legend off
    plt.close(fig)
    return path


def plot_uncertainty(points: dict[tuple[str, ...], list[dict[str, Any]]], path: Path) -> Path:
    """Scatter of Dice against ``unc_mean``, one panel per dataset, one colour per (method, k, supports).

    Args:
        points: :func:`uncertainty_points` (images with a non-finite value are not drawn).
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(key[0] for key in points))
    if not datasets:
        raise ValueError("nothing to plot: no uncertainty measured")
    ncol = min(len(datasets), 4)
    nrow = math.ceil(len(datasets) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        for (ds, method, k, supports), pts in points.items():
            if ds != dataset:
                continue
            ok = [p for p in pts if math.isfinite(p["unc_mean"]) and math.isfinite(p["dice"])]
            k_txt = f" k={k}" if k not in ("", "None") else ""
            ax.scatter([p["unc_mean"] for p in ok], [p["dice"] for p in ok], s=10, alpha=0.6,
                       label=f"{method}{k_txt} ({supports})")
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("mean uncertainty (pred ∪ gt)")
        ax.set_ylabel("Dice")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_qualitative(items: Sequence[dict], path: Path, max_supports: int = 3) -> Path:
    """Grid, one row per item: query | supports (mask outlined) | prediction | uncertainty | ground truth.

    Args:
        items: dicts with ``title``, ``image`` (PIL), ``supports`` (list of (PIL, (H, W) bool)),
            ``prob`` ((H, W) or None when the method failed), ``uncertainty`` ((H, W) or None),
            ``mask`` ((H, W) bool), ``threshold``.
        path: PNG to write.
        max_supports: support columns shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not items:
        raise ValueError("no qualitative items to plot")
    n_sup = min(max((len(it["supports"]) for it in items), default=0), max_supports)
    titles = ["query", *[f"support {i + 1}" for i in range(n_sup)], "prediction", "uncertainty", "ground truth"]
    fig, axes = plt.subplots(len(items), len(titles), figsize=(1.9 * len(titles), 2.0 * len(items)), squeeze=False)
    for r, it in enumerate(items):
        img = np.asarray(it["image"].convert("RGB"))
        row = axes[r]
        row[0].imshow(img)
        row[0].set_ylabel(it["title"], fontsize=6)
        for j in range(n_sup):
            ax = row[1 + j]
            if j < len(it["supports"]):
                s_img, s_mask = it["supports"][j]
                ax.imshow(np.asarray(s_img.convert("RGB")))
                if np.asarray(s_mask).any():
                    ax.contour(np.asarray(s_mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
        ax_pred, ax_unc, ax_gt = row[1 + n_sup], row[2 + n_sup], row[3 + n_sup]
        ax_pred.imshow(img)
        if it["prob"] is not None:
            pred = np.asarray(it["prob"]) >= it.get("threshold", 0.5)
            ax_pred.imshow(np.ma.masked_where(~pred, pred.astype(float)), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
        else:
            ax_pred.text(0.5, 0.5, "error", ha="center", va="center", transform=ax_pred.transAxes, color="red")
        if it["uncertainty"] is not None:
            ax_unc.imshow(np.asarray(it["uncertainty"]), cmap="magma")
        else:
            ax_unc.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_unc.transAxes, fontsize=8)
        ax_gt.imshow(img)
        mask = np.asarray(it["mask"])
        ax_gt.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap="winter", alpha=0.5, vmin=0, vmax=1)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, title in enumerate(titles):
        axes[0][c].set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
