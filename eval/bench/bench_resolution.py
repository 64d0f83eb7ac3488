"""``segicl benchmark resolution``: does the working size or the model limit a task?

For every dataset folder and label (a task), on the first ``--limit`` images of ``--split`` with
``--k`` random supports from the train split (seeded, the same draw for every method):

- ``oracle@N``: Dice of the ground truth itself taken to N x N (area) and back (bilinear, > 0.5),
  the ceiling of any model working at N px (:func:`segicl.native.round_trip`);
- ``labelprop@64``: the training-free propagation as the ``labelprop`` eval method runs it
  (colour features, 64 px, 2 px patches);
- ``vote@N`` / ``forest@N``: the native-resolution path's two classifiers (segicl/native.py: the
  label propagation over multi-scale patch features, and the random forest over a multi-scale filter
  bank fitted to the supports' pixels; aspect kept, longer side capped at N px; ``native`` = uncapped);
- ``segicl:coarse`` / ``segicl:auto``: the SegICL pipeline (``--checkpoint``, default the shipped
  one) with ``fine.mode`` none and auto, unless ``--no-model``; ``path_fine`` is the share of
  images the auto rule sent to the native path.

Writes ``resolution.csv`` (one row per task and method: Dice mean, n, seconds per image) and
``resolution.md`` (tasks x methods) under ``--out``, prints the table, the run time and the
process's peak resident memory.

    segicl benchmark resolution --data ../shared/data --limit 12 --out docs/results/resolution
"""

from __future__ import annotations

import argparse
import csv
import resource
import time
from pathlib import Path

SIZES = (64, 128, 256)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", action="append", type=Path, required=True, metavar="DIR",
                        help="dataset folder (repeat for several); a folder holding dataset folders is expanded")
    parser.add_argument("--split", default="test", help="split of the query images (supports come from train)")
    parser.add_argument("--k", type=int, default=5, help="random supports per query")
    parser.add_argument("--limit", type=int, default=12, help="query images per task")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="working sizes, comma list")
    parser.add_argument("--checkpoint", default=None, help="SegICL checkpoint (default: the shipped one)")
    parser.add_argument("--no-model", action="store_true", help="skip the SegICL pipeline rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch
    from tqdm import tqdm

    from eval.cli import _expand_data
    from eval.methods import LabelPropagation
    from eval.metrics import dice
    from segicl.config import FineConfig, MatchingConfig
    from segicl.data import load_dataset
    from segicl.native import native_probability, round_trip

    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    labelprop = LabelPropagation({"size": 64, "grid": 32})
    matching = MatchingConfig()
    caps = {str(s): s for s in sizes if s > 64} | {"native": 1 << 16}
    fines = {f"{c}@{name}": FineConfig(max_size=cap, classifier=c) for c in ("vote", "forest") for name, cap in caps.items()}
    pipe = None
    if not args.no_model:
        from eval.methods import load_segicl

        pipe, _ = load_segicl(args.checkpoint)
    rows = []
    for folder in _expand_data(args.data):
        ds = load_dataset(folder)
        for task in ds.tasks():
            rng = np.random.default_rng(args.seed)
            train, queries = ds.stems("train"), ds.stems(args.split)[: args.limit]
            scores: dict[str, list[float]] = {}
            seconds: dict[str, float] = {}
            fine_share = []
            for stem in tqdm(queries, desc=f"{ds.name}:{task.label_name}", leave=False):
                q = ds.sample(stem, task.label_value)
                sup = [ds.sample(train[j], task.label_value) for j in rng.choice(len(train), args.k, replace=False)]
                pairs = [(s.image, s.mask) for s in sup]
                for s in sizes:
                    scores.setdefault(f"oracle@{s}", []).append(dice(round_trip(q.mask, s), q.mask))

                names = ["labelprop@64", *fines] + (["segicl:coarse", "segicl:auto"] if pipe is not None else [])
                for name in names:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        if name == "labelprop@64":
                            prob = labelprop.predict(q, sup, "", 0)[0]
                        elif name in fines:
                            prob = native_probability(q.image, pairs, matching, fines[name])
                        else:
                            pipe.set_fine(mode="none" if name == "segicl:coarse" else "auto")
                            out = pipe([q.image], text=q.instruction, supports=[pairs],
                                       generator=torch.Generator().manual_seed(args.seed))
                            prob = out.probabilities[0]
                            if name == "segicl:auto":
                                fine_share.append(out.paths[0] == "fine")
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                    scores.setdefault(name, []).append(dice(prob > 0.5, q.mask))
            for name, vals in scores.items():
                rows.append({"dataset": ds.name, "label": task.label_name, "method": name, "n": len(vals),
                             "dice_mean": round(float(np.mean(vals)), 4),
                             "s_per_img": round(seconds[name] / len(vals), 4) if name in seconds else "",
                             "path_fine": round(float(np.mean(fine_share)), 3) if name == "segicl:auto" else ""})
    return rows


def write(rows: list[dict], out: Path, wall: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "resolution.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys((r["dataset"], r["label"]) for r in rows))
    by = {(r["dataset"], r["label"], r["method"]): r for r in rows}
    lines = ["| dataset | label | n | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for d, lab in tasks:
        n = next(r["n"] for r in rows if (r["dataset"], r["label"]) == (d, lab))
        lines.append(f"| {d} | {lab} | {n} | " + " | ".join(
            f"{by[(d, lab, m)]['dice_mean']:.3f}" if (d, lab, m) in by else "" for m in methods) + " |")
    timed = [m for m in methods if any(r["s_per_img"] != "" for r in rows if r["method"] == m)]
    lines += ["", "Seconds per image (mean over all tasks): " + ", ".join(
        f"{m} {sum(r['s_per_img'] for r in rows if r['method'] == m) / len(tasks):.3f}" for m in timed)]
    share = [r for r in rows if r["path_fine"] != ""]
    if share:
        lines.append("Share of images the auto rule sent to the native path: " + ", ".join(
            f"{r['dataset']}:{r['label']} {r['path_fine']:.2f}" for r in share))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"Run time {wall:.0f} s, peak resident memory {peak:.0f} MB.")
    text = "\n".join(lines) + "\n"
    (out / "resolution.md").write_text(text)
    return text


def main(args: argparse.Namespace) -> int:
    t0 = time.time()
    rows = run(args)
    if not rows:
        raise SystemExit("segicl benchmark resolution: no tasks found under --data")
    print(write(rows, args.out, time.time() - t0))
    return 0
