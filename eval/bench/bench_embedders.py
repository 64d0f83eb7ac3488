"""``segicl benchmark embedders``: which support-store embedder retrieves the supports that segment best.

A store embedder is judged by what matters to a user: the Dice (and HD95) of the segmentation made
with the k supports it retrieves, not by how similar the retrieved images look. For every embedder
spec (``--embedders``; default ``pixel``, ``hog`` and ``segicl``, the shipped model's own vision
tower) it runs ``segicl evaluate`` on every dataset of ``--data``: supports retrieved from the train
split (k = ``--k``, same dataset and label, the query's own group excluded), segmented by the
shipped default pipeline (``segicl``) and by the training-free label propagation (``labelprop``),
first ``--limit`` images per label. ``random`` supports (the same k) are the reference: retrieval
helps where an embedder beats them.

Held out: ``pixel`` and ``hog`` have no weights, so they never saw any dataset. The ``segicl``
embedder uses the shipped checkpoint, which was trained on every dataset's train split; with
``--fold-runs DIR`` (the run folders of ``segicl benchmark folds``) a ``segicl (fold)`` row is added
in which each dataset's queries and supports are embedded by the vision tower of the stage-1
model trained without that dataset's fold (the segmenting pipeline stays the shipped one, so the
rows differ only in the retrieved supports).

The choice of the default is made on ``--split val``; ``--split test`` reports the same table for
the record. Evaluations already written are reused (resumable). Writes ``embedders.csv`` (embedder,
method, dataset, dice, hd95) and ``embedders.md`` under ``--out``.

    segicl benchmark embedders --data ../shared/data --split val --limit 12 --fold-runs runs/folds \\
        --out docs/results/embedders/val
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

from eval.bench.bench_folds import FOLDS


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--embedders", nargs="+", default=["pixel", "hog", "segicl"], metavar="SPEC",
                        help="embedder specs to compare (retrieval/embedders.py)")
    parser.add_argument("--split", default="val", help="evaluated split (val decides; test reports)")
    parser.add_argument("--k", type=int, default=5, help="retrieved supports per query")
    parser.add_argument("--limit", type=int, default=12, help="images per label")
    parser.add_argument("--methods", default="segicl,labelprop", help="segmenting methods (segicl evaluate --methods)")
    parser.add_argument("--fold-runs", type=Path, default=None,
                        help="run folders of `segicl benchmark folds`: adds the held-out `segicl (fold)` embedder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def _evaluate(datasets: list[Path], supports: str, embedder: str | None, out: Path, args: argparse.Namespace) -> Path:
    """One ``segicl evaluate`` run (reused when its summary exists); the path of its summary.csv."""
    from eval.cli import main as eval_main
    from eval.cli import parse_args as eval_args

    summary = out / "summary.csv"
    if not summary.is_file():
        argv = [x for d in datasets for x in ("--data", str(d))]
        argv += ["--split", args.split, "--methods", args.methods, "--k", str(args.k), "--supports", supports,
                 "--draws", "1", "--limit", str(args.limit), "--steps", "10", "--samples", "1", "--no-progress",
                 "--overwrite", "--out", str(out)]  # no summary: a killed run's leftovers are replaced
        eval_main(eval_args(argv + (["--embedder", embedder] if embedder else [])))
    return summary


def _rows(summary: Path, name: str) -> list[dict]:
    rows = []
    with open(summary, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            hd = float(r["hd95_mean"]) if r["hd95_mean"] not in ("", "nan") else math.nan
            rows.append({"embedder": name, "method": r["method"], "dataset": r["dataset"], "label": r["label"],
                         "dice": float(r["dice_mean"]), "hd95": hd})
    return rows


def _dataset_means(rows: list[dict]) -> list[dict]:
    """Per (embedder, method, dataset): the mean over the dataset's labels."""
    acc: dict[tuple, list[dict]] = {}
    for r in rows:
        acc.setdefault((r["embedder"], r["method"], r["dataset"]), []).append(r)
    out = []
    for (emb, method, ds), rs in acc.items():
        hds = [r["hd95"] for r in rs if not math.isnan(r["hd95"])]
        out.append({"embedder": emb, "method": method, "dataset": ds, "dice": sum(r["dice"] for r in rs) / len(rs),
                    "hd95": sum(hds) / len(hds) if hds else math.nan})
    return out


def table(means: list[dict], metric: str = "dice") -> str:
    """Markdown: one row per (method, embedder), a column per dataset and the mean over datasets."""
    datasets = sorted({m["dataset"] for m in means})
    keys = list(dict.fromkeys((m["method"], m["embedder"]) for m in means))
    cell = {(m["method"], m["embedder"], m["dataset"]): m[metric] for m in means}
    fmt = "{:.3f}" if metric == "dice" else "{:.1f}"
    lines = ["| method | embedder | " + " | ".join(datasets) + " | mean |", "|---|---|" + "---|" * (len(datasets) + 1)]
    for method, emb in keys:
        vals = [cell.get((method, emb, d), math.nan) for d in datasets]
        ok = [v for v in vals if not math.isnan(v)]
        mean = sum(ok) / len(ok) if len(ok) == len(vals) else math.nan
        lines.append(f"| {method} | {emb} | " + " | ".join("-" if math.isnan(v) else fmt.format(v) for v in vals)
                     + f" | **{fmt.format(mean) if not math.isnan(mean) else '-'}** |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from segicl.data import find_datasets

    t0 = time.perf_counter()
    datasets = find_datasets(args.data)
    if not datasets:
        raise SystemExit(f"segicl benchmark embedders: {args.data}: no dataset folders")
    runs = args.out / "runs"
    rows = _rows(_evaluate(datasets, "random", None, runs / "random", args), "random supports")
    for spec in args.embedders:
        name = spec.replace(":", "_").replace("/", "_")
        rows += _rows(_evaluate(datasets, "retrieved", spec, runs / name, args), spec)
    if args.fold_runs is not None:
        by_name = {d.name: d for d in datasets}
        for fold, held_out in FOLDS.items():
            model = args.fold_runs / fold / "model"
            if not (model / "manifest.json").is_file():
                raise SystemExit(f"segicl benchmark embedders: {model}: no stage-1 model of fold {fold} "
                                 "(run `segicl benchmark folds` first, or leave out --fold-runs)")
            ds = [by_name[d] for d in held_out if d in by_name]
            if ds:
                rows += _rows(_evaluate(ds, "retrieved", f"segicl:{model}", runs / f"segicl_fold_{fold}", args),
                              "segicl (fold)")
    means = _dataset_means(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "embedders.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["embedder", "method", "dataset", "label", "dice", "hd95"])
        w.writeheader()
        w.writerows(rows)
    text = (f"Support-store embedders judged by segmentation: {args.split} split, first {args.limit} images per label, "
            f"k = {args.k} supports retrieved from the train split (random: the reference). Mean over a dataset's labels.\n\n"
            f"## Dice\n\n{table(means, 'dice')}\n\n## HD95 (px; images with an empty mask left out)\n\n{table(means, 'hd95')}\n\n"
            f"`segicl benchmark embedders --data {args.data} --split {args.split} --k {args.k} --limit {args.limit} "
            f"--embedders {' '.join(args.embedders)}" + (f" --fold-runs {args.fold_runs}" if args.fold_runs else "")
            + f" --out {args.out}` ({time.perf_counter() - t0:.0f} s, evaluations already written reused).\n")
    (args.out / "embedders.md").write_text(text, encoding="utf-8")
    print(text)
    return 0
