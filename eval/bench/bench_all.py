"""``segicl benchmark all``: rerun every table that README.md and docs/results/ show, from one committed plan.

The plan is ``configs/bench/all.yaml``: a list of steps, each a ``segicl`` command line (evaluate or
another benchmark) with ``{data}``, ``{out}`` and ``{runs}`` filled in, and the rows of the README's
in-domain table. ``--quick`` runs the steps marked ``quick`` (the in-domain table and the resolution
table of the thin-vessel dataset: about 12 min on 2 cores); the full plan also trains every model of
the leave-dataset-group-out folds (about 3 h). ``--resume`` skips a step whose ``done`` file exists
(a killed run continues; the folds benchmark also reuses its trained models). ``--only NAME`` runs
the named steps (comma list) and rewrites the summary.

Writes under ``--out``: each step's own files (CSV, Markdown, plots), ``in_domain/table.md`` (the
README's table, generated; a test keeps the README in sync with it) and ``results.md``: every table,
the command and wall time of each step, the machine and the total time.

    segicl benchmark all --data ../shared/data --out docs/results            # everything (~3 h)
    segicl benchmark all --data ../shared/data --out runs/results --quick    # the subset (~12 min)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

PLAN = Path(__file__).resolve().parents[2] / "configs" / "bench" / "all.yaml"
KEPT = ("summary.csv", "summary.md", "run.json", "dice_vs_k.png")  # what an evaluate step keeps (results.csv is per image)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. docs/results)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="training runs (models; not committed)")
    parser.add_argument("--quick", action="store_true", help="only the steps marked quick (about 12 min)")
    parser.add_argument("--resume", action="store_true", help="skip steps whose output already exists")
    parser.add_argument("--only", default=None, help="comma list of step names to run")
    parser.add_argument("--plan", type=Path, default=PLAN, help="the plan (default configs/bench/all.yaml)")
    parser.add_argument("--keep-all", action="store_true",
                        help="keep every file an evaluate step writes (default: summaries, run.json and the Dice-vs-k plot)")
    return parser


def load_plan(path: Path) -> dict:
    import yaml

    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"segicl benchmark all: {path}: cannot read the plan ({exc})") from exc
    names = [s.get("name") for s in plan.get("steps", [])]
    if not names or None in names or len(set(names)) != len(names):
        raise SystemExit(f"segicl benchmark all: {path}: every step needs a unique name")
    return plan


def _fill(command: list[str], args: argparse.Namespace) -> list[str]:
    return [str(c).format(data=args.data, out=args.out, runs=args.runs) for c in command]


def _prune(folder: Path) -> None:
    """An evaluate step keeps its summaries, run.json and the Dice-vs-k plot (per-image rows are large)."""
    if (folder / "run.json").is_file():
        for f in folder.iterdir():
            if f.is_file() and f.name not in KEPT:
                f.unlink()


def in_domain_table(rows: list[dict], out: Path, short: dict[str, str]) -> str:
    """The README's in-domain table from the evaluate summaries under ``out`` (mean over labels per dataset)."""
    lines, head = [], None
    for spec in rows:
        path = out / spec["run"] / "summary.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the step {spec['run']!r} first)")
        dice: dict[str, list[float]] = {}
        hd: dict[str, list[float]] = {}
        with open(path, newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if r["method"].split(":")[0] == spec["method"] and int(r["k"] or 0) == int(spec["k"]):
                    dice.setdefault(r["dataset"], []).append(float(r["dice_mean"]))
                    if r["hd95_mean"] not in ("", "nan"):
                        hd.setdefault(r["dataset"], []).append(float(r["hd95_mean"]))
        if not dice:
            raise ValueError(f"{path}: no rows of method {spec['method']!r} at k = {spec['k']}")
        datasets = sorted(dice)
        if head is None:
            head = datasets
            lines = ["| method | k | " + " | ".join(short.get(d, d) for d in datasets) + " | mean Dice | mean HD95 |",
                     "|---|---|" + "---|" * (len(datasets) + 2)]
        elif datasets != head:
            raise ValueError(f"{path}: datasets {datasets} differ from the table's {head}")
        means = [sum(dice[d]) / len(dice[d]) for d in datasets]
        hds = [sum(hd[d]) / len(hd[d]) for d in datasets if hd.get(d)]
        bold = "**" if spec["row"].startswith("**") else ""
        hd_cell = f"{bold}{sum(hds) / len(hds):.1f}{bold}" if len(hds) == len(datasets) else ""
        lines.append(f"| {spec['row']} | {spec['k']} | " + " | ".join(f"{m:.3f}" for m in means)
                     + f" | {bold}{sum(means) / len(means):.3f}{bold} | {hd_cell} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    from segicl.cli import main as segicl_main

    plan = load_plan(args.plan)
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    if only and (unknown := only - {s["name"] for s in plan["steps"]}):
        raise SystemExit(f"segicl benchmark all: unknown steps {sorted(unknown)}")
    if not any(args.data.glob("*/dataset.json")):
        raise SystemExit(f"segicl benchmark all: {args.data}: no dataset folders")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "steps.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    t_all = time.perf_counter()
    for step in plan["steps"]:
        name = step["name"]
        if (only and name not in only) or (args.quick and not step.get("quick")):
            continue
        done = args.out / step["done"]
        if args.resume and done.is_file():
            print(f"[benchmark all] {name}: done, skipped (--resume)")
            continue
        command = _fill(step["command"], args)
        if command[0] == "evaluate":
            command.append("--overwrite")  # the step reruns: its earlier results are replaced
        print(f"[benchmark all] {name}: segicl {' '.join(command)}", flush=True)
        t0 = time.perf_counter()
        rc = segicl_main(command)
        if rc:
            raise SystemExit(f"segicl benchmark all: step {name} failed with exit status {rc}")
        if command[0] == "evaluate" and not args.keep_all:
            _prune(args.out / name)
        log[name] = {"command": "segicl " + " ".join(command), "seconds": round(time.perf_counter() - t0, 1),
                     "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    text = write_results(plan, args, log, time.perf_counter() - t_all)
    print(text)
    return 0


def write_results(plan: dict, args: argparse.Namespace, log: dict, wall: float) -> str:
    """``in_domain/table.md`` and ``results.md``: every table that exists under ``--out``."""
    parts = ["# Results (generated by `segicl benchmark all`; do not edit)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}. "
             f"This invocation: {wall / 60:.1f} min" + (" (--quick)" if args.quick else "") + ". Commands and wall time "
             "of each step (when it last ran) are listed at the end.", ""]
    try:
        table = in_domain_table(plan["in_domain_table"], args.out, plan.get("short_names", {}))
        (args.out / "in_domain" / "table.md").write_text(table, encoding="utf-8")
        parts += ["## In domain (README table)", "", "The shipped checkpoint, test split, first 10 images per label, "
                  "supports retrieved from the train split, the default 5 DDIM steps, 1 sample. Mean Dice over a dataset's labels, "
                  "then over datasets; HD95 in pixels.", "", table]
    except (FileNotFoundError, ValueError) as exc:
        parts += ["## In domain (README table)", "", f"Not written: {exc}", ""]
    for step in plan["steps"]:
        if step["command"][0] == "benchmark" and (args.out / step["done"]).is_file():
            body = (args.out / step["done"]).read_text(encoding="utf-8").strip()
            parts += [f"## {step['name']}", "", body.replace("\n# ", "\n### ").replace("\n## ", "\n### "), ""]
    parts += ["## Steps", "", "| step | seconds | finished | command |", "|---|---|---|---|"]
    for step in plan["steps"]:
        if step["name"] in log:
            e = log[step["name"]]
            parts.append(f"| {step['name']} | {e['seconds']} | {e['finished']} | `{e['command']}` |")
    text = "\n".join(parts) + "\n"
    (args.out / "results.md").write_text(text, encoding="utf-8")
    return text
