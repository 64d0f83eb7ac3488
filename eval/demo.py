"""``segicl demo``: the main job on a fresh machine, offline, in about a minute on 2 cores.

1. builds a FAISS support store over the train split of the demo sample that ships in the repo
   (segicl/assets/demo: BUS-BRA, HC18 and FUSeg pairs, permissive licences, attribution in the
   README);
2. segments every demo query (the test split) with the shipped checkpoint, once with k = 3 supports
   retrieved from the store (same dataset and label, another patient / case group) and once
   zero-shot (k = 0), both from the same seed;
3. writes ``<dataset>/<stem>.png`` (mask, 0/255, original resolution), ``<stem>_prob.png``,
   ``<stem>_overlay.png`` (prediction outline in red and ground truth in cyan over the query, the
   method, k and Dice in the corner, the retrieved supports in a strip),
   ``results.csv`` (Dice, IoU, HD95, NSD per query and k), ``summary.md`` (their means per task;
   HD95 in pixels, NSD at 2 px) and ``supports.json`` (the supports each query got), and prints
   where they are.

The demo queries are test-split images the checkpoint never trained on; the datasets themselves
were in its training data (the leave-one-dataset-out numbers are in the README).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segicl import PACKAGE_DIR

DEMO_DIR = PACKAGE_DIR / "assets" / "demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="segment the shipped demo images with retrieved supports (offline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    p.add_argument("--checkpoint", default=None, help="saved pipeline (default: the shipped checkpoint)")
    p.add_argument("--data", type=Path, default=DEMO_DIR, help="root of dataset folders with train + test splits")
    p.add_argument("--k", type=int, default=3, help="retrieved supports per query (default 3)")
    p.add_argument("--embedder", default=None, help="store embedder (default: the retrieval default)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--samples", type=int, default=None, help="diffusion samples per query (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many queries per dataset")
    return p


def _png(img, path: Path) -> None:
    from segicl.io import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def run_demo(out: Path, checkpoint: str | None = None, data: Path = DEMO_DIR, k: int = 3, embedder: str | None = None,
             steps: int | None = None, samples: int | None = None, seed: int = 0, limit: int | None = None,
             progress: bool = True) -> dict:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from eval import metrics
    from retrieval.cli import overlay
    from retrieval.store import SupportStore
    from segicl.data import find_datasets, load_dataset
    from segicl.pipeline import SegICLPipeline, default_checkpoint

    t0 = time.time()
    ckpt = Path(checkpoint) if checkpoint else default_checkpoint()
    pipe = SegICLPipeline.from_pretrained(ckpt)
    folders = find_datasets(data)
    if not folders:
        raise FileNotFoundError(f"{data}: no dataset folders found")
    datasets = [load_dataset(f) for f in folders]
    store = SupportStore.build(folders, split="train", embedder=embedder, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    used: dict[str, list] = {}
    jobs = []
    for ds in datasets:
        if "test" not in ds.splits:
            raise ValueError(f"{ds.root}: the demo needs a test split (the queries)")
        for task in ds.tasks():
            stems = [s for s in ds.stems("test") if task.label_value in ds.labels_present(s)][:limit]
            jobs += [(ds, task.label_value, s) for s in stems]
    bar = tqdm(total=len(jobs), desc="demo", disable=not progress)
    by_task: dict[tuple[str, int], list] = {}
    for ds, value, stem in jobs:
        by_task.setdefault((ds.name, value), []).append((ds, value, stem))
    for group in by_task.values():  # one batched pipeline call per task and k
        ds, value = group[0][0], group[0][1]
        text = ds.instruction(value)
        queries, supports, hits_all = [], [], []
        for _, _, stem in group:
            q = ds.sample(stem, value)
            hits = store.search(q.image, k=k, dataset=ds.name, label=value, exclude_stems=[stem],
                                exclude_groups=[q.group])
            queries.append(q)
            hits_all.append(hits)
            supports.append([h.sample(value) for h in hits])
        outs = {}
        for name, sup in (("k", supports), (0, [[] for _ in queries])):
            outs[name] = pipe([q.image for q in queries], text=text, supports=[[(s.image, s.mask) for s in x] for x in sup],
                              num_inference_steps=steps, num_samples=samples, generator=torch.Generator().manual_seed(seed))
        for i, q in enumerate(queries):
            for name in ("k", 0):
                m = metrics.compute_metrics(outs[name].masks[i], q.mask)
                if name == "k":
                    dice_k = m["dice"]
                rows.append({"dataset": ds.name, "label": ds.labels[value], "stem": q.stem,
                             "k": len(supports[i]) if name == "k" else 0, "supports": "retrieved" if name == "k" else "none",
                             "dice": m["dice"], "iou": m["iou"], "hd95": m["hd95"], "nsd": m["nsd"]})
            o = outs["k"]
            d = out / ds.name
            d.mkdir(exist_ok=True)
            _png(Image.fromarray(o.masks[i].astype(np.uint8) * 255), d / f"{q.stem}.png")
            _png(Image.fromarray((o.probabilities[i] * 255).round().astype(np.uint8)), d / f"{q.stem}_prob.png")
            tiles = [{"image": s.image, "mask": s.mask, "score": h.score} for s, h in zip(supports[i], hits_all[i])]
            caption = f"SegICL ({o.paths[i] if getattr(o, 'paths', None) else 'model'}), k={len(tiles)}, Dice {dice_k:.3f}"
            _png(overlay(q.image, o.masks[i], tiles, truth=q.mask, caption=caption), d / f"{q.stem}_overlay.png")
            used[f"{ds.name}/{q.stem}"] = [h.as_dict() for h in hits_all[i]]
            bar.update(1)
    bar.close()
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# SegICL demo ({ckpt.name}, store embedder {store.embedder_spec}, seed {seed})", "",
             f"| dataset | label | n | Dice k=0 | Dice k={k} retrieved | HD95 k=0 (px) | HD95 k={k} | NSD k=0 | NSD k={k} |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}

    def mean(vals: list[float]) -> float:
        vals = [v for v in vals if v == v]  # NaN (undefined: an empty side) left out, as in segicl evaluate
        return float(np.mean(vals)) if vals else float("nan")

    for ds in datasets:
        for task in ds.tasks():
            name = ds.labels[task.label_value]
            sel = {sup: [r for r in rows if r["dataset"] == ds.name and r["label"] == name and r["supports"] == sup]
                   for sup in ("none", "retrieved")}
            if sel["none"]:
                m = {(key, sup): mean([r[key] for r in sel[sup]]) for key in ("dice", "hd95", "nsd") for sup in sel}
                summary[f"{ds.name}/{name}"] = {"n": len(sel["none"]), "dice_k0": m["dice", "none"],
                                                f"dice_k{k}": m["dice", "retrieved"], "hd95_k0": m["hd95", "none"],
                                                f"hd95_k{k}": m["hd95", "retrieved"]}
                lines.append(f"| {ds.name} | {name} | {len(sel['none'])} | {m['dice', 'none']:.3f} | "
                             f"{m['dice', 'retrieved']:.3f} | {m['hd95', 'none']:.1f} | {m['hd95', 'retrieved']:.1f} | "
                             f"{m['nsd', 'none']:.3f} | {m['nsd', 'retrieved']:.3f} |")
    lines += ["", f"Wall time {time.time() - t0:.1f} s. Per-image numbers: results.csv; masks and overlays per dataset folder."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "supports.json").write_text(json.dumps(used, indent=2) + "\n")
    return {"out": str(out), "summary": summary, "seconds": time.time() - t0}


def main(args: argparse.Namespace) -> int:
    res = run_demo(args.out, args.checkpoint, args.data, args.k, args.embedder, args.steps, args.samples, args.seed,
                   args.limit)
    print((Path(res["out"]) / "summary.md").read_text())
    print(f"outputs in {Path(res['out']).resolve()} (summary.md, results.csv, <dataset>/<stem>_overlay.png)")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return main(add_arguments(argparse.ArgumentParser(prog="segicl demo")).parse_args(argv))
