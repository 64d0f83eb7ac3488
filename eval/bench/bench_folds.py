"""``segicl benchmark folds``: leave-dataset-group-out, every fold's models trained without its
held-out datasets (pseudo-tasks included: they are cut from the training images), scored on them in
context.

Folds (issues 16 and 24): A = {kvasir_seg, cvc_clinicdb, wbc_blood_smear, rossa_octa_vessel},
B = {busbra_breast_us, hc18_fetal_head_us}, C = {acdc_cardiac_mri, fuseg_foot_ulcer}.

For each fold it trains, unless the run folder already holds the model (resumable; a killed
training continues with ``--resume``):

1. stage 1 (condition encoder + decoder, ``configs/train/tiny_stage1.yaml``, ``--steps``) -> ``<runs>/<fold>/model``;
2. the dense matcher (``configs/train/tiny_dense.yaml``: stage 2 with the dense layout on real +
   pseudo-tasks, ``--dense-steps``) on that stage-1 model -> ``<runs>/<fold>/dense/model``;
3. the UniverSeg-style comparator (``configs/train/tiny_universeg.yaml``, ``--universeg-steps``, the
   same tasks) -> ``<runs>/<fold>/universeg/model``;

then runs ``segicl evaluate`` on the held-out datasets' test split (first ``--limit`` images per
label), supports retrieved from their train split:

- ``learned`` (k = 0, 5 and 5 with another task's supports, ``shuffled``): the dense matcher's
  condition map rendered by the decoder, nothing else (``--matching none --fine none --postprocess none``);
- ``learned+native``: the same with the shipped inference defaults (native path for thin structures,
  coarse-to-fine blend, post-processing decided by the supports);
- ``route+native``: the previous default (the stage-1 model: the label propagation rendered by the
  decoder, with the same native path, blend and post-processing);
- ``route+native-raw``: the same without the post-processing (what the native path and the blend do
  alone);
- ``route``: the propagation rendered by the decoder alone; ``labelprop``: the propagation alone;
- ``universeg``: the comparator.

Evaluations newer than the models they scored are reused, so a killed run resumes where it stopped.
Writes, after every fold, ``folds.csv`` (fold, dataset, method, k, supports, dice) and ``folds.md`` (held-out Dice at
k = 5 retrieved per dataset and mean, the k = 0 and shuffled columns of the learned path, the issue's
targets per fold, training and evaluation seconds) under ``--out``.

    segicl benchmark folds --data ../shared/data --limit 10 --runs runs/folds --out docs/results/folds
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
TRAIN_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--folds", default="A,B,C", help="comma list of folds to run")
    parser.add_argument("--steps", type=int, default=1000, help="stage-1 optimizer steps per fold")
    parser.add_argument("--dense-steps", type=int, default=1000, help="dense-matcher (stage 2) steps per fold")
    parser.add_argument("--universeg-steps", type=int, default=1000, help="UniverSeg-style comparator steps per fold")
    parser.add_argument("--limit", type=int, default=10, help="test images per label")
    parser.add_argument("--runs", type=Path, default=Path("runs/folds"), help="training run folders (one per fold)")
    parser.add_argument("--models", choices=["all", "stage1"], default="all",
                        help="stage1: train only stage 1; score it (route, route+native, labelprop) and the fold's "
                             "dense matcher and UniverSeg comparator where they exist; rows of models that do not "
                             "exist are kept from the folds.csv under --out")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the tables")
    return parser


def _train_one(stage: str, config: str, run: Path, held_out: tuple[str, ...], steps: int, args: argparse.Namespace,
               extra: list[str]) -> float:
    """Train one model of a fold unless ``run/model`` exists; returns the seconds spent."""
    from training.cli import main as train_main
    from training.cli import parse_args as train_args

    if (run / "model" / "manifest.json").is_file():  # every saved model ends with its manifest
        return 0.0
    argv = [stage, "--config", str(TRAIN_CONFIGS / config), "--data", str(args.data), "--exclude", ",".join(held_out),
            "--max-steps", str(steps), "--out", str(run), "--set", "train.val_every=500", "--set", "train.keep_last=1",
            "--set", f"data.cache_dir={args.runs / 'cache'}", "--no-progress", *extra]
    if (run / "checkpoints").is_dir():
        argv.append("--resume")
    t0 = time.time()
    train_main(train_args(argv))
    return time.time() - t0


def _train(fold: str, held_out: tuple[str, ...], args: argparse.Namespace) -> float:
    run = args.runs / fold
    seconds = _train_one("stage1", "tiny_stage1.yaml", run, held_out, args.steps, args, ["--set", "train.lr=5e-4"])
    if args.models == "stage1":
        return seconds
    seconds += _train_one("stage2", "tiny_dense.yaml", run / "dense", held_out, args.dense_steps, args,
                          ["--set", f"model.init={run / 'model'}"])
    seconds += _train_one("universeg", "tiny_universeg.yaml", run / "universeg", held_out, args.universeg_steps, args, [])
    return seconds


def _evaluate(fold: str, held_out: tuple[str, ...], args: argparse.Namespace) -> list[dict]:
    from eval.cli import main as eval_main
    from eval.cli import parse_args as eval_args

    run = args.runs / fold
    data = [x for d in held_out for x in ("--data", str(args.data / d))]
    common = ["--draws", "1", "--limit", str(args.limit), "--steps", "10", "--samples", "1", "--no-progress"]
    alone = ["--fine", "none", "--postprocess", "none"]
    dense, stage1 = str(run / "dense" / "model"), str(run / "model")
    have = lambda part: args.models != "stage1" or (run / part / "model" / "manifest.json").is_file()  # noqa: E731
    comparator = f",universeg:{run / 'universeg' / 'model'}" if have("universeg") else ""
    runs = {  # name: (checkpoint, k, supports, extra arguments); method "segicl" is renamed to the run's name
        "learned": (dense, "0,5", "retrieved,shuffled", ["--matching", "none", *alone]),
        "learned+native": (dense, "5", "retrieved", ["--matching", "none"]),
        "route+native": (stage1, "5", "retrieved", ["--matching", "route", "--methods", f"segicl,labelprop{comparator}"]),
        "route+native-raw": (stage1, "5", "retrieved", ["--matching", "route", "--postprocess", "none"]),
        "route": (stage1, "5", "retrieved", ["--matching", "route", *alone]),
    }
    if not have("dense"):
        runs = {k: v for k, v in runs.items() if k.startswith("route")}
    rows = []
    for name, (model, ks, supports, extra) in runs.items():
        out = run / f"eval_{name.replace('+', '_')}"
        methods = [] if "--methods" in extra else ["--methods", "segicl"]
        if not _fresh(out / "summary.csv", [Path(model) / "manifest.json", run / "universeg" / "model" / "manifest.json"]):
            eval_main(eval_args([*data, *common, "--overwrite", "--k", ks, "--supports", supports, *methods, *extra,
                                 "--checkpoint", model, "--out", str(out)]))
        for r in csv.DictReader(open(out / "summary.csv")):
            method = name if r["method"] == "segicl" else r["method"].split(":")[0]
            rows.append({"fold": fold, "dataset": r["dataset"], "label": r["label"], "method": method,
                         "k": int(r["k"] or 0), "supports": r["supports"], "dice": float(r["dice_mean"])})
    return rows


def _fresh(result: Path, models: list[Path]) -> bool:
    """An evaluation is reused (resumable runs) when its summary is newer than every model it scored."""
    return result.is_file() and all(not m.is_file() or m.stat().st_mtime < result.stat().st_mtime for m in models)


def _dataset_means(rows: list[dict]) -> dict[tuple, float]:
    """(fold, dataset, method, k, supports) -> mean Dice over the dataset's labels."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        acc.setdefault((r["fold"], r["dataset"], r["method"], r["k"], r["supports"]), []).append(r["dice"])
    return {key: sum(v) / len(v) for key, v in acc.items()}


COLUMNS = (("labelprop", 5, "retrieved"), ("route", 5, "retrieved"), ("route+native-raw", 5, "retrieved"),
           ("route+native", 5, "retrieved"),
           ("universeg", 5, "retrieved"), ("learned", 0, "none"), ("learned", 5, "retrieved"),
           ("learned", 5, "shuffled"), ("learned+native", 5, "retrieved"))


MEAN_COLUMNS = (("labelprop", 5, "retrieved"), ("route", 5, "retrieved"), ("universeg", 5, "retrieved"),
                ("learned", 0, "none"), ("learned", 5, "retrieved"), ("learned", 5, "shuffled"),
                ("route+native", 5, "retrieved"), ("learned+native", 5, "retrieved"))
MEAN_HEAD = ("labelprop", "route", "UniverSeg-style", "learned k0", "learned k5", "learned, shuffled supports",
             "route + native (default)", "learned + native")


def _table(means: dict[tuple, float], args: argparse.Namespace, times: dict[str, tuple[float, float]],
           kept_from: dict[str, list[str]] | None = None) -> str:
    folds = list(dict.fromkeys((f, d) for f, d, *_ in means))
    head = [f"{m} k{k}" + (" shuffled" if s == "shuffled" else "") for m, k, s in COLUMNS]
    lines = [f"Leave-dataset-group-out: per fold, stage 1 ({args.steps} steps), the dense matcher ({args.dense_steps} "
             f"steps) and the UniverSeg-style comparator ({args.universeg_steps} steps) trained without the held-out "
             f"datasets; test split, first {args.limit} images per label, supports retrieved from the train split "
             "(shuffled: another task's). Mean Dice over a dataset's labels.", "",
             "| fold | held-out dataset | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for fold, ds in folds:
        vals = [means.get((fold, ds, *c)) for c in COLUMNS]
        lines.append(f"| {fold} | {ds} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")

    def mean(col, fold=None):
        v = [means[(f, d, *col)] for f, d in folds if (fold is None or f == fold) and (f, d, *col) in means]
        return sum(v) / len(v) if v else float("nan")

    lines.append("| all | mean | " + " | ".join(f"**{mean(c):.3f}**" for c in COLUMNS) + " |")
    lines += ["", "Targets of issue 16 per fold (learned path alone, k = 5 retrieved; mean over the fold's datasets):", "",
              "| fold | learned - labelprop (>= +0.05) | learned k5 - k0 (>= +0.15) | own - shuffled (>= +0.15) |"
              " learned+native - labelprop |", "|---|---|---|---|---|"]
    for fold in dict.fromkeys(f for f, _ in folds):
        lp, lr5 = mean(("labelprop", 5, "retrieved"), fold), mean(("learned", 5, "retrieved"), fold)
        lines.append(f"| {fold} | {lr5 - lp:+.3f} | {lr5 - mean(('learned', 0, 'none'), fold):+.3f} | "
                     f"{lr5 - mean(('learned', 5, 'shuffled'), fold):+.3f} | "
                     f"{mean(('learned+native', 5, 'retrieved'), fold) - lp:+.3f} |")
    lines += ["", "Mean Dice per fold (the README's table; k = 5 retrieved unless k0):", "",
              "| fold | " + " | ".join(MEAN_HEAD) + " |", "|---|" + "---|" * len(MEAN_COLUMNS)]
    for fold in [*dict.fromkeys(f for f, _ in folds), None]:
        lines.append(f"| {fold or 'mean of the ' + str(len(folds)) + ' datasets'} | "
                     + " | ".join(f"{mean(c, fold):.3f}" for c in MEAN_COLUMNS) + " |")
    if kept_from:
        lines += ["", "This run (`--models stage1`) did not re-measure " + ", ".join(
            f"fold {f}: {', '.join(ms)}" for f, ms in kept_from.items()) + " (their models were not on this machine); "
            "those rows are kept from the earlier folds.csv (measured with the inference defaults of their day)."]
    lines += ["", "Seconds (train, evaluate) per fold: " + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in times.items())
              + " (train 0 = the fold's models were already trained)."]
    return "\n".join(lines) + "\n"


def _earlier_rows(args: argparse.Namespace) -> list[dict]:
    """With ``--models stage1``: the rows of the folds.csv already under --out (the rows of models this run does
    not score are kept from them)."""
    path = args.out / "folds.csv"
    if args.models != "stage1" or not path.is_file():
        return []
    return [{**r, "k": int(r["k"]), "dice": float(r["dice"])} for r in csv.DictReader(open(path))]


def main(args: argparse.Namespace) -> int:
    folds = [f.strip() for f in args.folds.split(",") if f.strip()]
    earlier = _earlier_rows(args)  # read before the first fold rewrites folds.csv
    rows, times = [], {}
    for fold in folds:
        held_out = FOLDS[fold]
        missing = [d for d in held_out if not (args.data / d / "dataset.json").is_file()]
        if missing:
            raise SystemExit(f"segicl benchmark folds: {args.data}: datasets {missing} not found")
        train_s = _train(fold, held_out, args)
        t0 = time.time()
        rows += _evaluate(fold, held_out, args)
        times[fold] = (train_s, time.time() - t0)
        measured = {(r["fold"], r["method"]) for r in rows}
        kept = [r for r in earlier if (r["fold"], r["method"]) not in measured]
        text = _write(rows + kept, args, times, measured)  # after every fold: a killed run keeps its finished folds
    print(text)
    return 0


def _write(rows: list[dict], args: argparse.Namespace, times: dict[str, tuple[float, float]],
           measured: set[tuple[str, str]]) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "folds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    kept_from: dict[str, list[str]] = {}
    for r in rows:
        if (r["fold"], r["method"]) not in measured and r["method"] not in kept_from.get(r["fold"], []):
            kept_from.setdefault(r["fold"], []).append(r["method"])
    text = _table(_dataset_means(rows), args, times, kept_from)
    (args.out / "folds.md").write_text(text)
    return text
