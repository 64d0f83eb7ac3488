"""Benchmark the VLSM baselines: parameters, train-step time and inference time per model x mode.

Tiny presets (configs/vlsm/*_tiny.yaml) are timed on this CPU: one training step is forward +
Dice/BCE + backward + AdamW step on a batch of ``--batch`` images at the preset's size; inference is
a no-grad forward of the same batch, reported per image. Medians over ``--repeats`` after
``--warmup`` untimed runs. Real-size parameter counts (CLIPSeg rd64-refined, BiomedCLIPSeg, CRIS RN50)
come from models built on the meta device (no weights, no memory).

    python -m eval.bench.bench_vlsm --out runs/bench_vlsm            # full table
    python -m eval.bench.bench_vlsm --models clipseg --modes e2e vpt  # a subset

Writes ``bench_vlsm.csv`` and ``bench_vlsm.md`` under ``--out`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from segicl import CONFIGS_DIR
from segicl.losses import dice_bce_loss
from segicl.vlsm import MODELS, MODES, build_vlsm
from segicl.vlsm.base import check_mode
from segicl.vlsm.registry import load_config

FIELDS = ("model", "mode", "params_total", "params_trainable", "train_step_ms", "infer_ms_per_image",
          "real_params_total", "real_params_trainable")


def real_arch(model: str) -> dict:
    """Config of the real-size architecture (for meta-device parameter counts)."""
    from segicl.vlsm.biomedclipseg import BIOMEDCLIP_ARCH
    from segicl.vlsm.clipseg import CLIPSEG_RD64_REFINED
    from segicl.vlsm.cris import CRIS_RN50

    real = {"clipseg": "clipseg_rd64_refined", "biomedclipseg": "biomedclipseg", "biomedclipseg_d": "biomedclipseg_d",
            "cris": "cris_rn50"}[model]
    cfg = {k: v for k, v in load_config(CONFIGS_DIR / "vlsm" / f"{real}.yaml").items()
           if k not in ("pretrained", "decoder_from", "checkpoint", "clip_checkpoint")}
    cfg["arch"] = {"clipseg": CLIPSEG_RD64_REFINED, "cris": CRIS_RN50}.get(model, BIOMEDCLIP_ARCH)
    return cfg


def _median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_one(model_name: str, mode: str, batch: int, warmup: int, repeats: int, real: bool) -> dict:
    """Measure one (model, mode) pair; returns a row of :data:`FIELDS`."""
    torch.manual_seed(0)
    cfg = load_config(CONFIGS_DIR / "vlsm" / f"{model_name}_tiny.yaml")
    model = build_vlsm(model_name, mode, cfg)
    size = model.image_size
    x = torch.rand(batch, 3, size, size) * 2 - 1
    y = (torch.rand(batch, 1, size, size) > 0.7).float()
    tok = model.tokenize(["one small round polyp, located in center of the image"] * batch)
    row = {"model": model_name, "mode": mode, "params_total": model.num_parameters(),
           "params_trainable": model.num_parameters(trainable_only=True)}
    if row["params_trainable"]:
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        model.train()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            dice_bce_loss(model(x, **tok), y).backward()
            opt.step()

        row["train_step_ms"] = round(_median_ms(step, warmup, repeats), 1)
    else:
        row["train_step_ms"] = ""
    model.eval()

    def infer() -> None:
        with torch.no_grad():
            model(x, **tok)

    row["infer_ms_per_image"] = round(_median_ms(infer, warmup, repeats) / batch, 2)
    if real:
        with torch.device("meta"):
            big = build_vlsm(model_name, mode, real_arch(model_name))
        row["real_params_total"] = big.num_parameters()
        row["real_params_trainable"] = big.num_parameters(trainable_only=True)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("model", "mode", "trainable (tiny)", "total (tiny)", "train step ms", "infer ms/img",
            "trainable (real)", "total (real)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = (r["model"], r["mode"], f"{r['params_trainable']:,}", f"{r['params_total']:,}", r["train_step_ms"],
                r["infer_ms_per_image"], f"{r['real_params_trainable']:,}" if r.get("real_params_trainable") != "" else "",
                f"{r['real_params_total']:,}" if r.get("real_params_total") != "" else "")
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_vlsm", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-real", action="store_true", help="skip the real-size (meta device) parameter counts")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_vlsm.csv / .md")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models:
        for mode in args.modes:
            try:
                check_mode(mode, has_vit=model_name != "cris")
            except ValueError:
                continue
            rows.append(bench_one(model_name, mode, args.batch, args.warmup, args.repeats, not args.no_real))
            r = rows[-1]
            print(f"{model_name:16s} {mode:20s} trainable {r['params_trainable']:>10,}  step {r['train_step_ms']!s:>7} ms  "
                  f"infer {r['infer_ms_per_image']} ms/img", flush=True)
    for r in rows:
        for f in FIELDS:
            r.setdefault(f, "")
    table = markdown(rows)
    print(f"\nCPU, {args.threads} thread(s), batch {args.batch}, tiny presets\n")
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "bench_vlsm.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "bench_vlsm.md").write_text(table + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main(parse_args())
