"""Copy a trained pipeline into the package as the shipped checkpoint, with its provenance.

    python -m training.ship --model runs/tiny_stage2/model --runs runs/tiny_stage1 runs/tiny_stage2 \
        --out segicl/checkpoints/tiny --note "..."

The pipeline is loaded (checksums verified) and saved again atomically with a manifest that records,
per training run, the resolved loop config, the last logged step, the last validation metrics and
the datasets it trained on; the repository's git commit; and the total size. It refuses to write more
than ``--max-mb`` (50 MB by default: a shipped checkpoint stays in git history forever).

Re-shipping a checkpoint with other inference settings and the same weights (``--matching route``,
without ``--runs``) keeps the source manifest's training provenance and appends a ``revisions`` entry
(what changed, the commit, ``--note``: say which ``segicl evaluate`` run showed it is better)::

    python -m training.ship --model segicl/checkpoints/tiny --out segicl/checkpoints/tiny \
        --matching route --note "segicl evaluate ...: mean Dice 0.217 -> 0.401"
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
from pathlib import Path
from typing import Any

from segicl.pipeline import SegICLPipeline


def run_summary(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run": str(run)}
    for name in ("config.yaml", "loop_config.json"):
        f = run / name
        if f.is_file():
            out[name] = f.read_text()
    log = run / "log.csv"
    if log.is_file():
        rows = list(csv.DictReader(open(log)))
        if rows:
            out["last_step"] = int(rows[-1]["step"])
            vals = [r for r in rows if any(k.startswith("val/") and r[k] for k in r)]
            if vals:
                out["last_val"] = {k: float(v) for k, v in vals[-1].items() if k.startswith("val/") and v}
                out["last_val_step"] = int(vals[-1]["step"])
    return out


def ship(model: Path, out: Path, runs: list[Path], note: str = "", max_mb: float = 50.0,
         matching: str | None = None) -> Path:
    pipe = SegICLPipeline.from_pretrained(model)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    src_manifest = json.loads((model / "manifest.json").read_text())
    if runs:
        extra = {"source": str(model), "git_commit": commit, "note": note, "training": [run_summary(r) for r in runs]}
        if "stage" in src_manifest:
            extra["stage"] = src_manifest["stage"]
    else:  # same weights, other settings: keep the provenance, record the revision
        extra = {k: v for k, v in src_manifest.items() if k not in ("format", "files", "num_parameters")}
        extra["revisions"] = list(src_manifest.get("revisions", [])) + [
            {"git_commit": commit, "matching.mode": matching or pipe.config.matching.mode, "note": note}]
    if matching is not None:
        pipe.set_matching(mode=matching)
    pipe.save_pretrained(out, extra=extra)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    if size > max_mb:
        raise ValueError(f"{out}: {size:.1f} MB exceeds --max-mb {max_mb}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ship", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a saved pipeline (a run's model/ folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="training run folders (log.csv, config)")
    p.add_argument("--note", default="")
    p.add_argument("--max-mb", type=float, default=50.0)
    p.add_argument("--matching", choices=["none", "route"], default=None, help="set the shipped matching.mode")
    a = p.parse_args(argv)
    if not a.runs and a.matching is None:
        p.error("give --runs (a newly trained model) or --matching (same weights, new settings)")
    out = ship(a.model, a.out, a.runs, a.note, a.max_mb, a.matching)
    print(f"shipped {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
