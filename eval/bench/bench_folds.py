"""``segicl benchmark folds``: leave-dataset-group-out, every fold's model trained without its
held-out datasets, scored on them in context.

Folds (issues 16 and 24): A = {kvasir_seg, cvc_clinicdb, wbc_blood_smear, rossa_octa_vessel},
B = {busbra_breast_us, hc18_fetal_head_us}, C = {acdc_cardiac_mri, fuseg_foot_ulcer}.

For each fold it trains stage 1 (condition encoder + decoder, ``configs/train/tiny_stage1.yaml``,
``--steps`` optimizer steps) on the train splits of the *other* datasets, unless the run folder
already holds its ``model/`` (resumable: a killed training continues with ``--resume``), then runs
``segicl evaluate`` on the held-out datasets' test split with k = 5 retrieved supports:

- ``segicl``: the fold's model with the shipped inference defaults (matching route, native path for
  thin structures, blend, post-processing);
- ``segicl:no_blend``: the same without the blend (``--blend 0``);
- ``segicl:route``: the same model, route only (``--fine none --postprocess none``);
- ``labelprop``: the training-free propagation alone (no weights).

A stage-1 model has no trained multimodal encoder, so k = 0 (zero-shot) is not scored here: with
supports the route does not use the encoder (docs/model.md). Writes ``folds.csv`` and ``folds.md``
(held-out Dice per dataset and the mean, with the training and evaluation times) under ``--out``.

    segicl benchmark folds --data ../shared/data --steps 1000 --limit 10 --runs runs/folds --out docs/results/folds
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

FOLDS = {
    "A": ("kvasir_seg", "cvc_clinicdb", "wbc_blood_smear", "rossa_octa_vessel"),
    "B": ("busbra_breast_us", "hc18_fetal_head_us"),
    "C": ("acdc_cardiac_mri", "fuseg_foot_ulcer"),
}
STAGE1 = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny_stage1.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--folds", default="A,B,C", help="comma list of folds to run")
    parser.add_argument("--steps", type=int, default=1000, help="stage-1 optimizer steps per fold")
    parser.add_argument("--limit", type=int, default=10, help="test images per label")
    parser.add_argument("--runs", type=Path, default=Path("runs/folds"), help="training run folders (one per fold)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the tables")
    return parser


def _train(fold: str, held_out: tuple[str, ...], args: argparse.Namespace) -> float:
    from training.cli import main as train_main
    from training.cli import parse_args as train_args

    run = args.runs / fold
    if (run / "model" / "config.json").is_file():
        return 0.0
    argv = ["stage1", "--config", str(STAGE1), "--data", str(args.data), "--exclude", ",".join(held_out),
            "--max-steps", str(args.steps), "--out", str(run), "--set", "train.lr=5e-4", "--set", "train.val_every=500",
            "--set", "train.keep_last=1", "--set", f"data.cache_dir={args.runs / 'cache'}"]
    if (run / "checkpoints").is_dir():
        argv.append("--resume")
    t0 = time.time()
    train_main(train_args(argv))
    return time.time() - t0


def _evaluate(fold: str, held_out: tuple[str, ...], args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    from eval.cli import main as eval_main
    from eval.cli import parse_args as eval_args

    dice: dict[tuple[str, str], list[float]] = {}
    model = str(args.runs / fold / "model")
    data = [x for d in held_out for x in ("--data", str(args.data / d))]
    common = ["--k", "5", "--supports", "retrieved", "--draws", "1", "--limit", str(args.limit), "--steps", "10",
              "--samples", "1", "--no-progress", "--matching", "route"]
    runs = {"segicl": ["--methods", "segicl,labelprop"],
            "segicl:no_blend": ["--methods", "segicl", "--blend", "0"],
            "segicl:route": ["--methods", "segicl", "--fine", "none", "--postprocess", "none"]}
    for name, extra in runs.items():
        out = args.runs / fold / f"eval_{name.replace(':', '_')}"
        eval_main(eval_args([*data, *common, *extra, "--checkpoint", model, "--out", str(out)]))
        for r in csv.DictReader(open(out / "summary.csv")):
            method = name if r["method"] == "segicl" else r["method"]
            dice.setdefault((method, r["dataset"]), []).append(float(r["dice_mean"]))
    return dice


def main(args: argparse.Namespace) -> int:
    rows = []
    for fold in [f.strip() for f in args.folds.split(",") if f.strip()]:
        held_out = FOLDS[fold]
        missing = [d for d in held_out if not (args.data / d / "dataset.json").is_file()]
        if missing:
            raise SystemExit(f"segicl benchmark folds: {args.data}: datasets {missing} not found")
        train_s = _train(fold, held_out, args)
        t0 = time.time()
        dice = _evaluate(fold, held_out, args)
        eval_s = time.time() - t0
        for (method, dataset), vals in sorted(dice.items()):
            rows.append({"fold": fold, "dataset": dataset, "method": method, "dice": round(sum(vals) / len(vals), 4),
                         "train_s": round(train_s), "eval_s": round(eval_s)})
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "folds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"Leave-dataset-group-out, stage 1 {args.steps} steps per fold, test split, first {args.limit} images "
             "per label, k = 5 retrieved. Mean Dice over a dataset's labels.", "",
             "| fold | held-out dataset | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    by = {(r["fold"], r["dataset"], r["method"]): r["dice"] for r in rows}
    for fold, dataset in dict.fromkeys((r["fold"], r["dataset"]) for r in rows):
        lines.append(f"| {fold} | {dataset} | " + " | ".join(f"{by.get((fold, dataset, m), float('nan')):.3f}"
                                                          for m in methods) + " |")
    means = {m: sum(r["dice"] for r in rows if r["method"] == m) / sum(1 for r in rows if r["method"] == m)
             for m in methods}
    lines.append("| all | mean | " + " | ".join(f"**{means[m]:.3f}**" for m in methods) + " |")
    times = {r["fold"]: (r["train_s"], r["eval_s"]) for r in rows}
    lines += ["", "Seconds (train, evaluate) per fold: " + ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in times.items())
              + " (0 = the fold's model was already trained)."]
    text = "\n".join(lines) + "\n"
    (args.out / "folds.md").write_text(text)
    print(text)
    return 0
