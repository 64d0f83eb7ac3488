"""``segicl benchmark interactive``: a robot user segments a whole dataset, image after image.

For every dataset folder and label (a task) it takes the images of ``--split`` that hold the label,
in a fixed random order (``--seed``), the first ``--limit`` of them, and goes through them as a user
of ``segicl annotate`` would (eval/robot_user.py): the proposal from what is already finished, then
one interaction at a time (clicks at the centre of the largest error region; ``--kind scribbles``
for the scribble variant) until Dice >= ``--target`` or ``--max-interactions``, then it accepts its
final prediction (not the ground truth) into the context and moves on. Settings side by side:

- ``both``: growing context and interactions (segicl/interactive.py, the default of ``segicl annotate``);
- ``interactive``: the same with no context (every image starts from nothing);
- ``context``: growing context, no interactions (``interactions`` is 0, ``dice_final`` its Dice); with
  no user to correct them its finished images join the context with their ground truth, so this is
  the in-context Dice against the number of labelled images;
- ``labelprop``: the propagation over the growing context with the interactions as labelled points,
  no random walker;
- ``both:model`` / ``context:model`` (with ``--fold-models``): the context prior is the learned SegICL
  path (the dense checkpoint of the fold that held the dataset out, ``--matching none``, k = 5
  nearest context images) instead of the propagation.
- ``both:click`` / ``interactive:click`` / ``both:model:click`` (with ``--click-models``): the
  interactions go through the learned interactive network of the fold that held the dataset out
  (segicl/click_net.py, ``DIR/<fold>/model``) instead of the random walker; ``interactive:click`` is
  their no-context baseline in the per-fold table.

Writes ``interactive.csv`` (one row per setting and image: ``dataset, label, setting, position,
image, interactions, dice_initial, dice_final, dice_after_1, dice_after_3, dice_after_5, seconds,
context``; ``seconds`` is the mean per prediction), ``interactive.md`` and ``interactive.png``
(interactions per image against its position, a running mean of 5) under ``--out``. Training-free:
any dataset folder is unseen by the method, so the defaults were chosen on val splits and this is
run on test splits.

    segicl benchmark interactive --data ../shared/data --limit 30 --out docs/results/interactive
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

SETTINGS = ("both", "interactive", "context", "labelprop", "both:model", "context:model", "both:click",
            "interactive:click", "both:model:click")
DEFAULT_SETTINGS = SETTINGS[:4]
FIELDS = ("dataset", "label", "setting", "position", "image", "interactions", "dice_initial", "dice_final",
          "dice_after_1", "dice_after_3", "dice_after_5", "seconds", "context")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", action="append", type=Path, required=True, metavar="DIR",
                        help="dataset folder (repeat for several); a folder holding dataset folders is expanded")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=30, help="images per task (the first N of the order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    parser.add_argument("--fold-models", type=Path, default=None, metavar="DIR",
                        help="the :model settings: the learned path of DIR/<fold>/dense/model (segicl benchmark folds), "
                             "the fold that holds the dataset out")
    parser.add_argument("--click-models", type=Path, default=None, metavar="DIR",
                        help="the :click settings: the interactive network DIR/<fold>/model (segicl train click) of the "
                             "fold that holds the dataset out")
    parser.add_argument("--kind", choices=("clicks", "scribbles"), default="clicks", help="the robot's interactions")
    parser.add_argument("--target", type=float, default=0.90, help="Dice at which the robot accepts")
    parser.add_argument("--max-interactions", type=int, default=20)
    parser.add_argument("--labels", default=None, help="comma list of label names to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an InteractiveConfig field (e.g. --set beta=4)")
    parser.add_argument("--latency", action="store_true",
                        help="instead: time clicks on the first dataset (10 context images, 20 clicks per query, 256 px)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite interactive.md and .png from the interactive.csv already in --out")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def latency(args: argparse.Namespace, cfg, n_context: int = 10, n_queries: int = 5, n_clicks: int = 20) -> str:
    """Seconds per prediction with ``n_context`` finished images: the proposal (context searched) and
    each click after it (context search cached), on the first dataset's first task; ``latency.md``."""
    import numpy as np

    from eval.cli import _expand_data
    from eval.robot_user import add_correction
    from segicl.data import load_dataset
    from segicl.interactive import Interactions, InteractiveSegmenter

    ds = load_dataset(_expand_data(args.data)[0])
    label = ds.tasks()[0].label_value
    stems = [s for s in ds.stems(args.split) if label in ds.labels_present(s)][: n_context + n_queries]
    net = None
    if args.click_models is not None:  # the fold's interactive network reads the clicks
        from eval.bench.bench_folds import FOLDS
        from segicl.click_net import ClickNet

        fold = next((f for f, names in FOLDS.items() if ds.name in names), None)
        if fold is None:
            raise SystemExit(f"--latency --click-models: {ds.name} is in no fold")
        net = ClickNet.from_pretrained(args.click_models / fold / "model")
    seg = InteractiveSegmenter(cfg, click_net=net)
    for stem in stems[:n_context]:
        s = ds.sample(stem, label)
        seg.add_context(s.image, s.mask, stem)
    first, clicks = [], []
    for stem in stems[n_context:]:
        s = ds.sample(stem, label)
        ints = Interactions()
        out = seg.predict(s.image, ints, key=stem)
        first.append(out.seconds)
        for _ in range(n_clicks):
            if not add_correction(ints, out.mask, s.mask, args.kind):
                break
            out = seg.predict(s.image, ints, key=stem)
            clicks.append(out.seconds)
    size = f"{s.image.width}x{s.image.height} px image, working size {cfg.max_size} px" + (
        f", interactive network {net.cfg.size} px" if net is not None else "")
    text = (f"{ds.name}, {size}, {len(seg.context_keys)} context images, {len(first)} queries:\n\n"
            f"| prediction | n | p50 s | p90 s |\n|---|---|---|---|\n"
            f"| proposal (context searched) | {len(first)} | {np.median(first):.3f} | {np.percentile(first, 90):.3f} |\n"
            f"| click (context cached) | {len(clicks)} | {np.median(clicks):.3f} | {np.percentile(clicks, 90):.3f} |\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("latency_click.md" if net is not None else "latency.md")).write_text(text)
    return text


def _config(sets: list[str]):
    import dataclasses

    from segicl.interactive import InteractiveConfig

    cfg = InteractiveConfig()
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    for item in sets:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--set {item}: InteractiveConfig has no field {name!r} (fields: {', '.join(types)})")
        cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes"), "str": str}[str(types[name])]
        setattr(cfg, name, cast(value))
    cfg.validate()
    return cfg


def run_task(ds, label_value: int, stems: list[str], setting: str, args, cfg, desc: str = "") -> list[dict]:
    """One setting over one task's ordered images: the rows of ``interactive.csv``."""
    import dataclasses

    from tqdm import tqdm

    from eval.bench.bench_folds import FOLDS
    from eval.metrics import dice
    from eval.robot_user import add_correction
    from segicl.interactive import Interactions, InteractiveSegmenter

    pipe = net = None
    mods = setting.split(":")[1:]
    fold = next((f for f, names in FOLDS.items() if ds.name in names), None)
    if "model" in mods:
        from eval.methods import load_segicl

        if args.fold_models is None or fold is None:
            raise SystemExit(f"setting {setting}: needs --fold-models and a dataset of a fold ({ds.name})")
        pipe, _ = load_segicl(args.fold_models / fold / "dense" / "model")
        pipe.set_matching(mode="none")
    if "click" in mods:
        from segicl.click_net import ClickNet

        if args.click_models is None or fold is None:
            raise SystemExit(f"setting {setting}: needs --click-models and a dataset of a fold ({ds.name})")
        net = ClickNet.from_pretrained(args.click_models / fold / "model")
    seg = InteractiveSegmenter(dataclasses.replace(cfg, random_walk=setting != "labelprop"), pipeline=pipe,
                               text=ds.instruction(label_value), click_net=net)
    rows = []
    for pos, stem in enumerate(tqdm(stems, desc=desc, leave=False)):
        s = ds.sample(stem, label_value)
        ints = Interactions()
        out = seg.predict(s.image, ints, key=stem)
        times = [out.seconds]
        scores = [dice(out.mask, s.mask)]
        if not setting.startswith("context"):
            while scores[-1] < args.target and len(scores) - 1 < args.max_interactions:
                if not add_correction(ints, out.mask, s.mask, args.kind):
                    break
                out = seg.predict(s.image, ints, key=stem)
                times.append(out.seconds)
                scores.append(dice(out.mask, s.mask))
        after = {n: scores[min(n, len(scores) - 1)] for n in (1, 3, 5)}
        rows.append({"dataset": ds.name, "label": ds.labels[label_value], "setting": setting, "position": pos,
                     "image": stem, "interactions": len(scores) - 1, "dice_initial": round(scores[0], 4),
                     "dice_final": round(scores[-1], 4), **{f"dice_after_{n}": round(v, 4) for n, v in after.items()},
                     "seconds": round(sum(times) / len(times), 4), "context": len(out.context_used)})
        if not setting.startswith("interactive"):  # the context settings have no user: they are given the ground truth
            seg.add_context(s.image, s.mask if setting.startswith("context") else out.mask, stem)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from eval.cli import _expand_data
    from segicl.data import load_dataset

    cfg = _config(args.set)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = set(settings) - set(SETTINGS)
    if bad:
        raise SystemExit(f"--settings: unknown {sorted(bad)}; choose from {', '.join(SETTINGS)}")
    wanted = {s.strip() for s in args.labels.split(",")} if args.labels else None
    rows = []
    for folder in _expand_data(args.data):
        ds = load_dataset(folder)
        for task in ds.tasks():
            if wanted and task.label_name not in wanted:
                continue
            stems = ds.stems(args.split)
            order = [stems[int(i)] for i in np.random.default_rng(args.seed).permutation(len(stems))]
            order = [s for s in order if task.label_value in ds.labels_present(s)][: args.limit]
            for setting in settings:
                rows += run_task(ds, task.label_value, order, setting, args, cfg,
                                 desc=f"{ds.name}:{task.label_name}:{setting}")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per task and setting: totals, Dice after n interactions, the late median."""
    import numpy as np

    out = []
    keys = list(dict.fromkeys((r["dataset"], r["label"], r["setting"]) for r in rows))
    for d, lab, st in keys:
        rs = [r for r in rows if (r["dataset"], r["label"], r["setting"]) == (d, lab, st)]
        late = [r["interactions"] for r in rs if r["position"] >= 20]
        out.append({"dataset": d, "label": lab, "setting": st, "images": len(rs),
                    "total_interactions": sum(r["interactions"] for r in rs),
                    "median_after_20": float(np.median(late)) if late else float("nan"),
                    "reached_target": float(np.mean([r["dice_final"] >= 0.9 for r in rs])),
                    **{k: float(np.mean([r[k] for r in rs])) for k in
                       ("dice_initial", "dice_after_1", "dice_after_3", "dice_after_5", "dice_final", "seconds")}})
    return out


def _baseline(setting: str, settings) -> str:
    """The no-context setting a setting is compared with: ``interactive:click`` for the settings that
    use the click network, ``interactive`` otherwise."""
    return "interactive:click" if setting.endswith(":click") and "interactive:click" in settings else "interactive"


def _fold_lines(summary: list[dict]) -> list[str]:
    from eval.bench.bench_folds import FOLDS

    settings = [s for s in dict.fromkeys(x["setting"] for x in summary) if not s.startswith("context")]
    lines = []
    for fold, names in FOLDS.items():
        tot = {st: sum(x["total_interactions"] for x in summary if x["dataset"] in names and x["setting"] == st)
               for st in settings}
        if not any(x["dataset"] in names for x in summary):
            continue
        cells = []
        for st in settings:
            base = tot.get(_baseline(st, settings))
            cells.append(f"{tot[st]}" + (f" ({100 * (tot[st] / base - 1):+.0f} %)" if base and not st.startswith("interactive")
                                         else ""))
        lines.append(f"| {fold} | {', '.join(n for n in names if any(x['dataset'] == n for x in summary))} | "
                     + " | ".join(cells) + " |")
    return lines


def write(rows: list[dict], out: Path, args: argparse.Namespace, wall: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "interactive.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows)
    lines = [f"Robot user, {args.kind}, target Dice {args.target}, at most {args.max_interactions} interactions per "
             f"image, {args.split} split, first {args.limit} images holding the label (seed {args.seed}).", "",
             "| dataset | label | setting | images | total interactions | vs interactive | median after 20 | "
             "reached target | Dice at 0 | after 1 | after 3 | after 5 | final | s / prediction |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(s["dataset"], s["label"], s["setting"]): s["total_interactions"] for s in summary}
    names = list(dict.fromkeys(s["setting"] for s in summary))
    for s in summary:
        b = base.get((s["dataset"], s["label"], _baseline(s["setting"], names)))
        rel = (f"{100 * (s['total_interactions'] / b - 1):+.0f} %"
               if b and not s["setting"].startswith(("context", "interactive")) else "")
        med = "" if np.isnan(s["median_after_20"]) else f"{s['median_after_20']:.1f}"
        lines.append(f"| {s['dataset']} | {s['label']} | {s['setting']} | {s['images']} | {s['total_interactions']} | "
                     f"{rel} | {med} | {s['reached_target']:.2f} | {s['dice_initial']:.3f} | {s['dice_after_1']:.3f} | "
                     f"{s['dice_after_3']:.3f} | {s['dice_after_5']:.3f} | {s['dice_final']:.3f} | {s['seconds']:.3f} |")
    lines += ["", "Per fold of the leave-dataset-group-out protocol (eval/bench/bench_folds.py), total interactions over",
              "its tasks, and the change against the same model without context:", "",
              "| fold | datasets | " + " | ".join(s for s in dict.fromkeys(r["setting"] for r in rows)
                                                 if not s.startswith("context")) + " |",
              "|---|---|" + "---|" * len([s for s in dict.fromkeys(r["setting"] for r in rows) if not s.startswith("context")])]
    lines += _fold_lines(summary)
    lines += ["", f"Run time {wall:.0f} s."]
    text = "\n".join(lines) + "\n"
    (out / "interactive.md").write_text(text)
    tasks = list(dict.fromkeys((r["dataset"], r["label"]) for r in rows))
    cols = min(4, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (d, lab) in zip(axes.ravel(), tasks):
        for st in dict.fromkeys(r["setting"] for r in rows):
            ys = [r["interactions"] for r in rows if (r["dataset"], r["label"], r["setting"]) == (d, lab, st)]
            if st.startswith("context") or not ys:
                continue
            run_mean = np.convolve(ys, np.ones(5) / 5, mode="valid") if len(ys) >= 5 else np.asarray(ys, float)
            ax.plot(np.arange(len(run_mean)) + (len(ys) - len(run_mean)), run_mean, label=st)
        ax.set_title(f"{d}: {lab}", fontsize=9)
        ax.set_xlabel("image position")
        ax.set_ylabel("interactions (running mean 5)")
    for ax in axes.ravel()[len(tasks):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "interactive.png", dpi=100)
    plt.close(fig)
    return text


def main(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.latency:
        print(latency(args, _config(args.set)))
        return 0
    if args.report_only:
        with open(args.out / "interactive.csv", newline="") as f:
            rows = [{k: (v if k in ("dataset", "label", "setting", "image") else float(v) if "." in v else int(v))
                     for k, v in r.items()} for r in csv.DictReader(f)]
        old = (args.out / "interactive.md").read_text() if (args.out / "interactive.md").exists() else ""
        wall = next((float(ln.split()[2]) for ln in old.splitlines() if ln.startswith("Run time")), float("nan"))
        print(write(rows, args.out, args, wall))
        return 0
    rows = run(args)
    if not rows:
        raise SystemExit("segicl benchmark interactive: no tasks found under --data")
    print(write(rows, args.out, args, time.time() - t0))
    return 0
