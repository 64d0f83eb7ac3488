"""``segicl benchmark vlsm-quality``: Dice of the VLSM comparators (CLIPSeg, CRIS, BiomedCLIPSeg,
BiomedCLIPSeg-D at the tiny from-scratch presets) trained and scored on the project's datasets.

Every cell trains through ``segicl train vlsm`` (training/cli.py, the shared loop, a wall-clock budget
per cell: ``--train-seconds``, or ``--train-steps``) and is scored through ``segicl evaluate``
(eval/cli.py, test split, first ``--limit`` images per label, the text = the P-level prompt the model
was trained with, ``--vlsm-prompt``). Protocols (``--protocols``):

- ``supervised``: per dataset, train on its train split, test on its test split; the four models in
  mode ``e2e`` with prompt P1 (the class name; prompts.json alternatives on Kvasir / CVC; BiomedCLIPSeg-D
  starts from the decoder of the CLIPSeg cell trained on the same data, as no CLIPSeg weights are
  available offline), plus the
  supervised U-Net (``unet``: ``segicl evaluate --methods unet_supervised``, trained per label with
  early stopping on the val split, ``--unet-*``). The table puts SegICL and labelprop beside them from
  the committed in-domain run (``--segicl-summary``, k = 5 retrieved, first 10 test images per label).
- ``prompts``: CLIPSeg e2e on kvasir_seg and busbra_breast_us trained and tested with each of P0-P9
  (the medvlsm ablation; generated prompts where a dataset has no prompts.json, oracle for P2-P9).
- ``modes``: CLIPSeg on the same two datasets in the TuneVLSeg / VLSM-Adapter modes (decoder, the six
  prompt learners, the dense and shallow VLC adapters), prompt P1.
- ``zeroshot_folds``: each model trained on the datasets outside a fold (bench_folds.FOLDS), scored on
  the fold's held-out datasets by text alone; beside SegICL k = 0 and k = 5 from ``--folds-csv``.

Resumable: a cell whose model is saved (``<runs>/<model>/<mode>-<prompt>/<train datasets>/model``) is
not retrained, one with rows in the CSV is skipped; cells sharing a model (the supervised CLIPSeg P1
and the prompts protocol's P1) train once. ``vlsm.csv`` and ``vlsm.md`` are rewritten after every cell.

    segicl benchmark vlsm-quality --data ../shared/data --out docs/results/vlsm --protocols supervised
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from eval.bench.bench_folds import FOLDS

REPO = Path(__file__).resolve().parents[2]
VLSM_MODELS = ("clipseg", "cris", "biomedclipseg", "biomedclipseg_d")
MODELS = (*VLSM_MODELS, "unet")
PROTOCOLS = ("supervised", "prompts", "modes", "zeroshot_folds")
TWO = ("kvasir_seg", "busbra_breast_us")
MODES = ("decoder", "coop", "cocoop", "vpt", "maple", "shared_separate", "shared_attention",
         "adapter_dense_vlc", "adapter_shallow_vlc")
PROMPTS = tuple(f"p{i}" for i in range(10))
FIELDS = ("protocol", "model", "mode", "prompt", "train_datasets", "dataset", "label", "n", "dice", "iou", "hd95", "nsd",
          "dice_first10", "train_seconds", "epochs", "steps", "val_dice", "eval_seconds")
KEY = ("protocol", "model", "mode", "prompt", "train_datasets")


@dataclass(frozen=True)
class Cell:
    """One trained model scored on some datasets."""

    protocol: str
    model: str  # a VLSM name or "unet"
    mode: str
    prompt: str
    train: tuple[str, ...]  # datasets trained on
    test: tuple[str, ...]  # datasets scored
    fold: str = ""  # zeroshot_folds: the held-out fold

    @property
    def train_datasets(self) -> str:
        return f"all but fold {self.fold}" if self.fold else ";".join(self.train)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.protocol, self.model, self.mode, self.prompt, self.train_datasets)

    def run_dir(self, runs: Path) -> Path:
        """The training run folder, shared by the protocols that train the same model."""
        where = f"without_{self.fold}" if self.fold else "+".join(self.train)
        return runs / self.model / f"{self.mode}-{self.prompt}" / where


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for vlsm.csv / vlsm.md")
    parser.add_argument("--runs", type=Path, default=Path("runs/vlsm_quality"), help="training and evaluation run folders")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="VLSMs and 'unet' (the supervised U-Net beside the supervised rows)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes of the modes protocol")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=PROMPTS, help="levels of the prompts protocol")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="restrict to these datasets (zeroshot_folds: the held-out ones)")
    parser.add_argument("--train-seconds", type=float, default=60.0,
                        help="wall-clock budget of each VLSM cell's training steps (train.max_minutes; default 60)")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps per VLSM cell instead of epochs")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="learning rate of every mode (default 1e-3; 0 = the preset's lr_by_mode, whose e2e 1e-4 is "
                             "the papers' rate for pretrained weights and does not move a random-init model in 300 steps)")
    parser.add_argument("--limit", type=int, default=None, help="test images per label (default: the whole test split)")
    parser.add_argument("--unet-seconds", type=float, default=150.0,
                        help="U-Net: wall-clock cap of the training per label (default 150)")
    parser.add_argument("--unet-steps", type=int, default=4000, help="U-Net: most optimiser steps per label")
    parser.add_argument("--unet-val-every", type=int, default=50, help="U-Net: steps between validations")
    parser.add_argument("--unet-patience", type=int, default=6, help="U-Net: validations without improvement before stopping")
    parser.add_argument("--unet-min-steps", type=int, default=600,
                        help="U-Net: no early stop before this step (the all-empty plateau of the first steps)")
    parser.add_argument("--segicl-summary", type=Path, default=REPO / "docs/results/in_domain/eval_defaults/summary.csv",
                        help="committed in-domain SegICL / labelprop summary shown beside the supervised rows")
    parser.add_argument("--folds-csv", type=Path, default=REPO / "docs/results/folds/folds.csv",
                        help="committed fold results shown beside the zero-shot rows")
    parser.add_argument("--report-only", action="store_true", help="rewrite vlsm.md from vlsm.csv, run no cell")
    parser.add_argument("--no-progress", action="store_true")
    return parser


# ------------------------------------------------------------------------------------- cells
def plan(args: argparse.Namespace, available: list[str]) -> list[Cell]:
    """The cells of the selected protocols, in run order."""
    wanted = [d for d in available if args.datasets is None or d in args.datasets]
    vlsms = [m for m in args.models if m != "unet"]
    cells: list[Cell] = []
    if "supervised" in args.protocols:
        cells += [Cell("supervised", m, "e2e", "p1", (d,), (d,)) for d in wanted for m in vlsms]
        if "unet" in args.models:
            cells += [Cell("supervised", "unet", "supervised", "-", (d,), (d,)) for d in wanted]
    two = [d for d in TWO if d in wanted] if "clipseg" in args.models else []
    if "prompts" in args.protocols:
        cells += [Cell("prompts", "clipseg", "e2e", p, (d,), (d,)) for d in two for p in args.prompts]
    if "modes" in args.protocols:
        cells += [Cell("modes", "clipseg", m, "p1", (d,), (d,)) for d in two for m in args.modes]
    if "zeroshot_folds" in args.protocols:
        for fold, held in FOLDS.items():
            test = tuple(d for d in held if d in wanted)
            train = tuple(d for d in available if d not in held)
            if test:
                cells += [Cell("zeroshot_folds", m, "e2e", "p1", train, test, fold) for m in vlsms]
    return cells


def _train(cell: Cell, run: Path, args: argparse.Namespace) -> dict:
    """Train a VLSM cell with ``segicl train vlsm`` unless its model is saved; its training record."""
    import yaml

    from segicl.data import load_dataset
    from training.cli import main as train_main
    from training.cli import parse_args as train_args

    record = run / "train.json"
    if (run / "model" / "config.json").is_file():
        return json.loads(record.read_text()) if record.is_file() else {}
    argv = ["vlsm", "--config", str(REPO / "configs" / "vlsm" / f"{cell.model}_tiny.yaml"), "--model", cell.model,
            "--mode", cell.mode, "--data", str(args.data), "--out", str(run), "--overwrite", "--no-progress",
            "--set", f"data.prompt_levels=[{cell.prompt}]", "--set", f"data.val_prompt_level={cell.prompt}",
            "--set", "train.ckpt_every=0", "--set", "train.save_final_checkpoint=false",
            "--set", "train.tensorboard=false", "--set", f"train.max_minutes={args.train_seconds / 60:.6g}"]
    argv += ["--exclude", ",".join(FOLDS[cell.fold])] if cell.fold else ["--set", f"data.datasets=[{','.join(cell.train)}]"]
    if args.train_steps:
        argv += ["--max-steps", str(args.train_steps)]
    if args.lr:
        argv += ["--set", f"train.lr={args.lr:g}", "--set", "train.lr_by_mode={}"]
    decoder = "random"
    if cell.model == "biomedclipseg_d":  # the decoder of the CLIPSeg trained on the same data (none pretrained here)
        clipseg = Cell(cell.protocol, "clipseg", cell.mode, cell.prompt, cell.train, cell.test, cell.fold).run_dir(args.runs)
        if (clipseg / "model" / "config.json").is_file():
            decoder = str(clipseg / "model")
            argv += ["--set", f"decoder_from={decoder}"]
    t0 = time.time()
    train_main(train_args(argv))
    log = list(csv.DictReader(open(run / "log.csv")))
    vals = [float(r["val/dice"]) for r in log if r.get("val/dice")]
    steps = int(float(log[-1]["step"])) if log else 0
    batch = int(yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"])
    items = sum(len(ds.stems("train")) * len(ds.tasks()) for ds in map(load_dataset, (args.data / d for d in cell.train)))
    out = {"train_seconds": round(time.time() - t0, 1), "epochs": round(steps * batch / max(items, 1), 2), "steps": steps,
           "val_dice": vals[-1] if vals else math.nan, "command": "segicl train " + shlex.join(argv)}
    if cell.model == "biomedclipseg_d":
        out["decoder_from"] = decoder
    record.write_text(json.dumps(out, indent=1))
    return out


def _unet_config(run: Path, args: argparse.Namespace) -> Path:
    """The eval config of the U-Net cells: the defaults with early stopping on val."""
    import yaml

    from eval.suite import load_eval_config

    cfg = load_eval_config()
    cfg["unet_supervised"] = {**cfg["unet_supervised"], "steps": args.unet_steps, "val_every": args.unet_val_every,
                              "patience": args.unet_patience, "min_steps": args.unet_min_steps,
                              "max_seconds": args.unet_seconds}
    path = run / "eval_config.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _evaluate(cell: Cell, run: Path, args: argparse.Namespace) -> list[dict]:
    """Score a cell with ``segicl evaluate`` (reused when its summary is newer than the model)."""
    from eval.cli import main as eval_main
    from eval.cli import parse_args as eval_args

    out = run / ("eval_" + "+".join(cell.test) + f"_n{args.limit or 'all'}")
    argv = [x for d in cell.test for x in ("--data", str(args.data / d))]
    argv += ["--k", "0", "--supports", "random", "--out", str(out), "--overwrite", "--no-progress"]
    argv += ["--limit", str(args.limit)] if args.limit else []
    if cell.model == "unet":
        argv += ["--methods", "unet_supervised", "--config", str(_unet_config(run, args))]
        fresh = False  # the U-Net trains inside the evaluation: a cell without CSV rows reruns it
    else:
        argv += ["--methods", f"vlsm:{run / 'model'}", "--vlsm-prompt", cell.prompt]
        summary = out / "summary.csv"
        fresh = summary.is_file() and summary.stat().st_mtime > (run / "model" / "config.json").stat().st_mtime
    if not fresh:
        eval_main(eval_args(argv))
    run_json = json.loads((out / "run.json").read_text())
    first: dict[tuple[str, str], list[float]] = {}
    for r in csv.DictReader(open(out / "results.csv")):
        scores = first.setdefault((r["dataset"], r["label"]), [])
        if len(scores) < 10:
            scores.append(float(r["dice"]) if r["dice"] not in ("", "nan") else math.nan)
    training = {(t["dataset"], t["label"]): t for t in run_json.get("training", {}).get("unet_supervised", [])}
    rows = []
    for r in csv.DictReader(open(out / "summary.csv")):
        row = {**dict(zip(KEY, cell.key)), "dataset": r["dataset"], "label": r["label"], "n": int(r["n"]),
               **{m: float(r[f"{m}_mean"]) for m in ("dice", "iou", "hd95", "nsd")},
               "dice_first10": _nanmean(first.get((r["dataset"], r["label"]), [])),
               "eval_seconds": round(run_json["wall_seconds"], 1)}
        t = training.get((r["dataset"], r["label"]))
        if t:  # U-Net: its early-stopping record, per label
            row.update(train_seconds=t["seconds"], steps=t["steps"], val_dice=t["best_val_dice"],
                       epochs=round(t["steps"] * 8 / max(t["train_items"], 1), 1))
        rows.append(row)
    return rows


def _mean_over_datasets(rows: list[dict], field: str) -> float:
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(r["dataset"], []).append(float(r[field]) if r[field] not in ("", None) else math.nan)
    return _nanmean([_nanmean(v) for v in per.values()])


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


# ------------------------------------------------------------------------------------ tables
def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path))) if path.is_file() else []


def _fmt(v, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(f) else f"{f:.{digits}f}"


def _grid(row_keys: list[tuple], col_keys: list, cell_of, head: list[str], first: str, dataset_at: int | None = None,
          ) -> list[str]:
    """A Markdown table: one line per row key, one column per column key, a mean line (with ``dataset_at``, the
    index of the dataset in the row keys: the mean over datasets of their mean over labels, as the in-domain table)."""
    lines = ["| " + " | ".join([first, *head]) + " |", "|" + "---|" * (len(head) + 1)]
    sums: dict[int, dict[object, list[float]]] = {}
    for n, rk in enumerate(row_keys):
        vals = [cell_of(rk, ck) for ck in col_keys]
        for i, v in enumerate(vals):
            if v is not None and not math.isnan(v):
                sums.setdefault(i, {}).setdefault(n if dataset_at is None else rk[dataset_at], []).append(v)
        lines.append("| " + " / ".join(str(x) for x in rk) + " | " + " | ".join(_fmt(v) for v in vals) + " |")
    means = [_nanmean([_nanmean(v) for v in sums.get(i, {}).values()]) for i in range(len(col_keys))]
    label = "**mean**" if dataset_at is None else "**mean over datasets**"
    lines.append(f"| {label} | " + " | ".join(_fmt(m) for m in means) + " |")
    return lines


def _lookup(rows: list[dict], field: str, **match) -> float | None:
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()):
            return float(r[field]) if r.get(field) not in (None, "") else None
    return None


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    budget = f"{args.train_steps} optimizer steps" if args.train_steps else f"{args.train_seconds:g} s of training steps"
    limit = f"the first {args.limit} test images per label" if args.limit else "the whole test split"
    lines = ["# VLSM comparators: Dice on the project's datasets", "",
             f"Tiny presets (configs/vlsm/*_tiny.yaml, 64 px, random init: no pretrained weights offline), batch 8, "
             f"{budget} per cell, AdamW lr {f'{args.lr:g} in every mode' if args.lr else 'of the presets'} (at most 100 epochs, early stopping patience 20 epochs on val Dice, the last weights "
             f"kept), 1 CPU thread; scored by `segicl evaluate` on {limit} with the prompt level the model was trained "
             "with. Metrics at the mask's stored resolution (HD95 and NSD in pixels). Rows: `vlsm.csv`.", ""]
    sup = [r for r in rows if r["protocol"] == "supervised"]
    if sup:
        segicl = _read_csv(args.segicl_summary)
        labels = list(dict.fromkeys((r["dataset"], r["label"]) for r in sup))
        models = [m for m in MODELS if any(r["model"] == m for r in sup)]

        def value(field):
            def f(rk, m):
                if m in ("segicl", "labelprop"):
                    return _lookup(segicl, "dice_mean", dataset=rk[0], label=rk[1], method=m, k=5, supports="retrieved")
                return _lookup(sup, field, dataset=rk[0], label=rk[1], model=m)
            return f

        names = {"unet": "U-Net (early stop)"}
        lines += ["## Supervised: train split -> test split", "",
                  "VLSMs: mode e2e, prompt P1 (the class name; prompts.json alternatives on Kvasir / CVC). U-Net: "
                  "`segicl evaluate --methods unet_supervised` (MONAI UNet, 96 px, from scratch) per label, validated every "
                  f"{args.unet_val_every} steps on the val split, stopped after {args.unet_patience} validations without a "
                  f"better Dice (not before step {args.unet_min_steps}, nor while no better than an all-empty mask) or at {args.unet_steps} steps / "
                  f"{args.unet_seconds:g} s, the best weights kept.", "",
                  f"Mean Dice over {limit}:", ""]
        lines += _grid(labels, models, value("dice"), [names.get(m, m) for m in models], "dataset / label", 0)
        lines += ["", "All four metrics, mean over datasets of the mean over labels (HD95 in pixels, NSD at 2 px, "
                  "the eval config's tolerance):", ""]
        lines += _grid([(m,) for m in models], ["dice", "iou", "hd95", "nsd"],
                       lambda rk, f: _mean_over_datasets([r for r in sup if r["model"] == rk[0]], f),
                       ["Dice", "IoU", "HD95", "NSD"], "model")[:-1]
        lines += ["", "Same models on the first 10 test images per label, beside SegICL (shipped checkpoint, defaults) "
                  "and labelprop at k = 5 retrieved supports from the committed in-domain run "
                  f"(`{args.segicl_summary.relative_to(REPO) if args.segicl_summary.is_relative_to(REPO) else args.segicl_summary}`"
                  ", the same 10 images):", ""]
        cols = [*models, "segicl", "labelprop"]
        lines += _grid(labels, cols, value("dice_first10"), [*(names.get(m, m) for m in models), "SegICL k5",
                                                             "labelprop k5"], "dataset / label", 0)
        lines += ["", "Training per cell: seconds / epochs (U-Net: per label, steps of batch 8 until early stopping "
                  "or the cap, epochs = steps x 8 / train images):", ""]
        lines += ["| dataset / label | " + " | ".join(names.get(m, m) for m in models) + " |", "|" + "---|" * (len(models) + 1)]
        for ds, lab in labels:
            cells = []
            for m in models:
                r = next((x for x in sup if x["dataset"] == ds and x["label"] == lab and x["model"] == m), None)
                cells.append("-" if r is None else f"{_fmt(r.get('train_seconds'), 0)} s / {_fmt(r.get('epochs'), 1)}")
            lines.append(f"| {ds} / {lab} | " + " | ".join(cells) + " |")
        lines.append("")
    prompts = [r for r in rows if r["protocol"] == "prompts"]
    if prompts:
        levels = [p for p in PROMPTS if any(r["prompt"] == p for r in prompts)]
        keys = list(dict.fromkeys((r["dataset"],) for r in prompts))
        lines += ["## Prompts P0-P9: CLIPSeg e2e trained and tested with one level", "", "Mean Dice:", ""]
        lines += _grid(keys, levels, lambda rk, p: _lookup(prompts, "dice", dataset=rk[0], prompt=p),
                       [p.upper() for p in levels], "dataset")
        lines.append("")
    modes = [r for r in rows if r["protocol"] == "modes"]
    if modes:
        ref = [*modes, *(dict(r, mode="e2e") for r in sup if r["model"] == "clipseg" and r["dataset"] in TWO)]
        mode_keys = [(m,) for m in ("e2e", *MODES) if any(r["mode"] == m for r in ref)]
        dsets = [d for d in TWO if any(r["dataset"] == d for r in modes)]
        lines += ["## Tuning modes: CLIPSeg, prompt P1 (e2e from the supervised rows)", "", "Mean Dice:", ""]
        lines += _grid(mode_keys, dsets, lambda rk, d: _lookup(ref, "dice", dataset=d, mode=rk[0]), dsets, "mode")
        lines.append("")
    zs = [r for r in rows if r["protocol"] == "zeroshot_folds"]
    if zs:
        folds = _read_csv(args.folds_csv)
        labels = list(dict.fromkeys((r["train_datasets"].removeprefix("all but fold "), r["dataset"], r["label"]) for r in zs))
        models = [m for m in VLSM_MODELS if any(r["model"] == m for r in zs)]

        def zval(rk, m):
            if m in ("learned", "route+native"):
                return _lookup(folds, "dice", fold=rk[0], dataset=rk[1], label=rk[2], method=m, k=0 if m == "learned" else 5)
            return _lookup(zs, "dice", dataset=rk[1], label=rk[2], model=m)

        lines += ["## Zero-shot by text: trained without the fold, scored on its held-out datasets", "",
                  f"Mean Dice over {limit}; SegICL from the fold runs (`docs/results/folds/folds.csv`, first 10 test "
                  "images per label): the learned path at k = 0 and the default path (route + native) at k = 5:", ""]
        lines += _grid(labels, [*models, "learned", "route+native"], zval, [*models, "SegICL k0", "SegICL k5"],
                       "fold / dataset / label", 1)
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    available = sorted(p.parent.name for p in args.data.glob("*/dataset.json"))
    if not available:
        raise SystemExit(f"segicl benchmark vlsm-quality: no datasets in {args.data}")
    cells = [] if args.report_only else plan(args, available)
    csv_path = args.out / "vlsm.csv"
    rows = _read_csv(csv_path)
    done = {tuple(r[k] for k in KEY) for r in rows}
    bar = tqdm(cells, desc="vlsm-quality", unit="cell", disable=args.no_progress, dynamic_ncols=True)
    for cell in bar:
        run = cell.run_dir(args.runs)
        bar.set_postfix_str(f"{cell.protocol} {cell.model} {cell.mode} {cell.prompt} {cell.train_datasets[:30]}")
        if cell.key in done and (cell.model == "unet" or (run / "model" / "config.json").is_file()):
            continue
        record = {} if cell.model == "unet" else _train(cell, run, args)
        new = [{**r, **{k: record[k] for k in ("train_seconds", "epochs", "steps", "val_dice") if k in record}}
               for r in _evaluate(cell, run, args)]
        rows = [r for r in rows if tuple(r[k] for k in KEY) != cell.key] + new
        done.add(cell.key)
        _write(rows, args)
    text = _write(rows, args)
    print(text)
    return 0


def _write(rows: list[dict], args: argparse.Namespace) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    rows.sort(key=lambda r: order[r["protocol"]])  # stable: run order within a protocol
    with open(args.out / "vlsm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = markdown(rows, args)
    (args.out / "vlsm.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    import sys

    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="python -m eval.bench.bench_vlsm_quality")).parse_args()))
