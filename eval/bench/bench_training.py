"""Training benchmarks on this machine (CPU): data pipeline, loop steps/s and peak memory, DeepSpeed
ZeRO-2 with 1 vs 2 processes.

    python -m eval.bench.bench_training data   [--data ../shared/data] [--size 64]
    python -m eval.bench.bench_training stage  --stage stage1 --config configs/train/tiny_stage1.yaml --steps 20
    python -m eval.bench.bench_training zero2  --stage stage1 --config configs/train/tiny_stage1.yaml --steps 20

``data``: cache build and reload time for the train split, episodes/s (k_max 5) and pairs/s from the
cache with augmentation, in the main process and through a 2-worker DataLoader.
``stage``: ``segicl train <stage>`` in this process for ``--steps`` steps: steps/s (after the first
step) and peak resident memory.
``zero2``: the same run under DeepSpeed ZeRO-2 in one process and in two (``accelerate launch
--config_file configs/accelerate/deepspeed_zero2.yaml``), as subprocesses; prints both steps/s and
the ratio. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_data(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from training.episodes import EpisodeDataset, PairDataset, collate, load_split

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache_dir:
        t = time.perf_counter()
        datasets, cache = load_split(args.data, "train", args.size, cache_dir=cache_dir, progress=False)
        build = time.perf_counter() - t
        t = time.perf_counter()
        load_split(args.data, "train", args.size, cache_dir=cache_dir, progress=False)
        reload = time.perf_counter() - t
    eps = EpisodeDataset(cache, datasets, k_max=5, seed=0)
    pairs = PairDataset(cache, datasets, seed=0)
    n = args.items
    t = time.perf_counter()
    for i in range(n):
        eps[i]
    ep_s = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(n):
        pairs[i]
    pair_s = n / (time.perf_counter() - t)
    loader = DataLoader(eps, batch_size=8, num_workers=2, collate_fn=collate)
    t = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["text"])
        if seen >= n:
            break
    ep_s_workers = seen / (time.perf_counter() - t)
    return {"bench": "data", "pairs_cached": len(cache), "datasets": len(datasets), "size": args.size,
            "stored_px": cache.stored, "cache_build_s": round(build, 2), "cache_reload_s": round(reload, 2),
            "cache_mb": round((cache.images.nbytes + cache.label_maps.nbytes) / 2**20, 1),
            "episodes_per_s_main": round(ep_s, 1), "episodes_per_s_2workers": round(ep_s_workers, 1),
            "pairs_per_s_main": round(pair_s, 1), "mean_k": float(sum(eps[i]["num_supports"] for i in range(50)) / 50)}


def bench_stage(args) -> dict:
    import torch

    from training.cli import build_task, parse_args, resolve
    from training.loop import LoopConfig, train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cli_args = parse_args([args.stage, "--config", str(args.config), "--out", out, "--max-steps", str(args.steps),
                               "--no-progress", "--set", "train.val_every=-1", "--set", "train.ckpt_every=0",
                               "--set", f"train.num_workers={args.workers}", *sum((["--set", s] for s in args.set), []),
                               *(["--data", *map(str, args.data)] if args.data else [])])
        config, data_dirs, exclude, _ = resolve(cli_args)
        task, train_set, _ = build_task(args.stage, config, data_dirs, exclude)
        cfg = LoopConfig.from_dict(config["train"], save_final_checkpoint=False)
        # steps/s excluding start-up: time a 1-step run, then the full run resumes... simpler: log every step
        cfg.log_every = 1
        t = time.perf_counter()
        res = train(task, train_set, None, cfg)
        total = time.perf_counter() - t
        import csv

        rows = list(csv.DictReader(open(Path(out) / "log.csv")))
        rates = [float(r["steps_per_s"]) for r in rows[1:] if r.get("steps_per_s")]
    return {"bench": "stage", "stage": args.stage, "steps": res["step"], "batch_size": cfg.batch_size,
            "threads": args.threads, "num_workers": cfg.num_workers,
            "steps_per_s": round(len(rates) / sum(1 / r for r in rates), 3) if rates else None,
            "wall_s": round(total, 1), "peak_rss_mb": round(_peak_rss_mb(), 0),
            "final_loss": float(rows[-1]["loss"]) if rows else None}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def bench_zero2(args) -> dict:
    common = [args.stage, "--config", str(args.config), "--max-steps", str(args.steps), "--no-progress",
              "--set", "train.val_every=-1", "--set", "train.ckpt_every=0", "--set", "train.save_final_checkpoint=false",
              "--set", f"train.log_every={max(1, args.steps // 4)}", *sum((["--set", s] for s in args.set), []),
              *(["--data", *map(str, args.data)] if args.data else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        one = [sys.executable, "-m", "training.cli", *common, "--out", f"{tmp}/one", "--deepspeed", "configs/deepspeed/zero2.json"]
        env1 = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        two = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml",
               "--main_process_port", _free_port(), "-m", "training.cli", *common, "--out", f"{tmp}/two"]
        for name, cmd, e in (("1proc", one, env1), ("2proc", two, env)):
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=args.timeout)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            import csv

            rows = list(csv.DictReader(open(Path(tmp) / ("one" if name == "1proc" else "two") / "log.csv")))
            rates = [float(r["steps_per_s"]) for r in rows[1:]] or [float(r["steps_per_s"]) for r in rows]
            results[name] = {"steps_per_s": round(sum(rates) / len(rates), 3), "wall_s": round(wall, 1)}
    r1, r2 = results["1proc"]["steps_per_s"], results["2proc"]["steps_per_s"]
    return {"bench": "zero2", "stage": args.stage, "steps": args.steps, "threads_per_proc": args.threads, **results,
            "ratio_2proc_over_1proc_steps_per_s": round(r2 / r1, 3),
            "note": "per-process batch is train.batch_size, so 2 processes see twice the samples per step"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.bench.bench_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["data", "stage", "zero2"])
    p.add_argument("--data", nargs="+", type=Path, default=None, help="dataset roots (default ../shared/data / the config's)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--items", type=int, default=200, help="data: items to time")
    p.add_argument("--stage", default="stage1", choices=["stage1", "stage2", "vlsm"])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "train" / "tiny_stage1.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config overrides as for segicl train")
    p.add_argument("--timeout", type=int, default=1200)
    args = p.parse_args(argv)
    if args.what == "data":
        args.data = args.data or [REPO.parent / "shared" / "data"]
        out = bench_data(args)
    elif args.what == "stage":
        out = bench_stage(args)
    else:
        out = bench_zero2(args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
