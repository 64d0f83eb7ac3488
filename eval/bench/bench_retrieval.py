"""Benchmark the FAISS support store: index speed/recall, and retrieval quality on the real data.

Index part (synthetic vectors of the embedder's width, ``--dim``, default the pixel embedder's 336):
a Gaussian mixture (``--clusters`` centres, unit vectors after normalisation) so that neighbours
have structure, as real embeddings do; 1000 held-out queries from the same mixture. For each size
and index type: build time, serialised size, resident-memory growth, single-query latency at k=5
(median and p99 of the 1000 queries, one at a time) and recall@5 against exact search.

Quality part (``--data``, the 7 datasets of ../shared/data): one store per embedder over every
dataset's train split. For each test image and each of its labels (a task):

- ``same_ds@5`` / ``same_task@5``: share of the top-5 supports (no filters) from the query's dataset
  / from its dataset *and* carrying its label;
- ``dice_ret@3``: mean Dice between the query's mask and the masks of its k=3 retrieved supports
  (filtered to dataset + label, query group excluded), all masks resized to 64x64;
- ``dice_rand@3``: the same for 3 random train supports carrying the label (seed 0; the mean over
  ``--random-draws`` draws);
- ``dice_oracle@3``: the 3 train masks with the highest Dice to the query's (an upper bound).

Retrieval helps when ``dice_ret`` > ``dice_rand``.

    python -m eval.bench.bench_retrieval --out runs/bench_retrieval                       # both parts
    python -m eval.bench.bench_retrieval --sizes 10000 100000 1000000 --types ivfpq --skip-quality
    python -m eval.bench.bench_retrieval --skip-index --embedders pixel segicl:<ckpt dir>

Writes ``index.csv``, ``quality.csv``, ``quality_per_dataset.csv`` and ``bench_retrieval.md`` under
``--out`` and prints the Markdown tables. Runs on ``--threads`` CPU threads (default 1).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = Path(os.environ.get("SEGICL_SHARED_DATA", REPO.parent / "shared" / "data"))


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def mixture(n: int, dim: int, clusters: int, rng: np.random.Generator, centres: np.ndarray | None = None):
    if centres is None:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = np.empty((n, dim), np.float32)
    step = 200_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x[s:s + m] = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, centres


def bench_index(sizes: Sequence[int], types: Sequence[str], dim: int, clusters: int, n_queries: int, k: int = 5) -> list[dict]:
    import faiss

    from retrieval import index as ix

    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        x, centres = mixture(n, dim, clusters, rng)
        q, _ = mixture(n_queries, dim, clusters, rng, centres)
        exact = faiss.IndexFlatIP(dim)
        exact.add(x)
        _, truth = exact.search(q, k)
        del exact
        for kind in types:
            rss0 = _rss_mb()
            t0 = time.perf_counter()
            index = ix.build_index(x, kind)
            build_s = time.perf_counter() - t0
            mem = _rss_mb() - rss0
            size_mb = len(ix.serialize(index)) / 2**20
            lat, got = [], np.empty((n_queries, k), np.int64)
            for i in range(n_queries):
                t = time.perf_counter()
                _, ids = ix.search(index, q[i:i + 1], k)  # the store's path (IVF-PQ shortlist size etc.)
                lat.append((time.perf_counter() - t) * 1e3)
                got[i] = ids[0]
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
            row = {"n": n, "dim": dim, "index": kind, "build_s": round(build_s, 2), "index_mb": round(size_mb, 1),
                   "rss_growth_mb": round(mem, 1), "query_ms_p50": round(statistics.median(lat), 3),
                   "query_ms_p95": round(float(np.percentile(lat, 95)), 3),
                   "query_ms_p99": round(float(np.percentile(lat, 99)), 3), "recall@5": round(recall, 4)}
            print(row, flush=True)
            rows.append(row)
            del index
    return rows


# ------------------------------------------------------------------------------------------ quality
def _mask64(ds, stem: str, cache: dict) -> np.ndarray:
    from PIL import Image

    key = (ds.name, stem)
    if key not in cache:
        lm = ds.read_label_map(stem)
        cache[key] = np.asarray(Image.fromarray(lm).resize((64, 64), Image.Resampling.NEAREST))
    return cache[key]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def bench_quality(data_root: Path, embedders: Sequence[str], k: int = 3, top: int = 5, random_draws: int = 5,
                  limit: int | None = None) -> tuple[list[dict], list[dict]]:
    from retrieval.embedders import get_embedder
    from retrieval.store import SupportStore
    from segicl.data import find_datasets, load_dataset, open_image

    datasets = [load_dataset(p) for p in find_datasets(data_root)]
    cache: dict = {}
    # train masks per task, for random and oracle supports
    train_by_task = {}
    for ds in datasets:
        for v in ds.labels:
            train_by_task[(ds.name, v)] = [s for s in ds.stems("train") if v in ds.labels_present(s)]
    queries = []  # (ds, stem)
    for ds in datasets:
        stems = ds.stems("test")
        queries += [(ds, s) for s in (stems[:limit] if limit else stems)]
    summary, per_ds = [], []
    for spec in embedders:
        emb = get_embedder(spec)
        t0 = time.perf_counter()
        store = SupportStore.build([ds.root for ds in datasets], split="train", embedder=emb, progress=False)
        build_s = time.perf_counter() - t0
        n_train = len(store)
        imgs = [open_image(ds.image_path(s), mode=ds.image_mode) for ds, s in queries]
        t0 = time.perf_counter()
        qv = np.concatenate([store.embed(imgs[i:i + 64]) for i in range(0, len(imgs), 64)])
        embed_ms = (time.perf_counter() - t0) * 1e3 / len(imgs)
        stats: dict[tuple[str, int], dict[str, list]] = {}
        lat = []
        for qi, (ds, stem) in enumerate(queries):
            present = ds.labels_present(stem)
            t = time.perf_counter()
            top_hits = store.search(query_embeddings=qv[qi], embedder_id=store.embedder_id, k=top,
                                    exclude_groups=[ds.group(stem)])
            lat.append((time.perf_counter() - t) * 1e3)
            qmap = _mask64(ds, stem, cache)
            for v in ds.labels:
                st = stats.setdefault((ds.name, v), {k_: [] for k_ in ("same_ds", "same_task", "ret", "rand", "oracle")})
                st["same_ds"].append(np.mean([h.dataset == ds.name for h in top_hits]) if top_hits else 0.0)
                st["same_task"].append(np.mean([h.dataset == ds.name and v in h.label_values for h in top_hits]) if top_hits else 0.0)
                if v not in present:
                    continue  # Dice of supports is measured for tasks whose label the query carries
                qm = qmap == v
                hits = store.search(query_embeddings=qv[qi], embedder_id=store.embedder_id, k=k, dataset=ds.name,
                                    label=v, exclude_stems=[stem], exclude_groups=[ds.group(stem)])
                st["ret"].append(np.mean([_dice(qm, _mask64(ds, h.stem, cache) == v) for h in hits]))
                cands = [s for s in train_by_task[(ds.name, v)] if ds.group(s) != ds.group(stem)]
                rng = np.random.default_rng(qi)
                draws = [np.mean([_dice(qm, _mask64(ds, s, cache) == v) for s in rng.choice(cands, k, replace=False)])
                         for _ in range(random_draws)]
                st["rand"].append(float(np.mean(draws)))
                all_d = sorted((_dice(qm, _mask64(ds, s, cache) == v) for s in cands), reverse=True)
                st["oracle"].append(float(np.mean(all_d[:k])))
        rows = []
        for (name, v), st in stats.items():
            ds = next(d for d in datasets if d.name == name)
            row = {"embedder": spec, "dataset": name, "label": ds.labels[v], "queries": len(st["same_ds"]),
                   "with_label": len(st["ret"]), f"same_ds@{top}": round(float(np.mean(st["same_ds"])), 4),
                   f"same_task@{top}": round(float(np.mean(st["same_task"])), 4),
                   f"dice_ret@{k}": round(float(np.mean(st["ret"])), 4) if st["ret"] else float("nan"),
                   f"dice_rand@{k}": round(float(np.mean(st["rand"])), 4) if st["rand"] else float("nan"),
                   f"dice_oracle@{k}": round(float(np.mean(st["oracle"])), 4) if st["oracle"] else float("nan")}
            rows.append(row)
            print(row, flush=True)
        per_ds += rows

        def mean_of(key, rows=rows):
            vals = [r[key] for r in rows if r[key] == r[key]]
            return round(float(np.mean(vals)), 4)

        summary.append({"embedder": spec, "embedder_id": emb.id, "dim": emb.dim, "train_images": n_train,
                        "build_s": round(build_s, 1), "embed_ms_per_image": round(embed_ms, 2),
                        "search_ms_p50": round(statistics.median(lat), 3),
                        f"same_ds@{top}": mean_of(f"same_ds@{top}"), f"same_task@{top}": mean_of(f"same_task@{top}"),
                        f"dice_ret@{k}": mean_of(f"dice_ret@{k}"), f"dice_rand@{k}": mean_of(f"dice_rand@{k}"),
                        f"dice_oracle@{k}": mean_of(f"dice_oracle@{k}")})
        print(summary[-1], flush=True)
    return summary, per_ds


# ------------------------------------------------------------------------------------------ output
def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivfpq"], choices=["flat", "hnsw", "ivfpq"])
    p.add_argument("--dim", type=int, default=336, help="vector width (pixel embedder: 336)")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of dataset folders (../shared/data)")
    p.add_argument("--embedders", nargs="+", default=["pixel"])
    p.add_argument("--limit", type=int, default=None, help="test images per dataset (quick runs)")
    p.add_argument("--random-draws", type=int, default=5)
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"# Retrieval benchmark\n\n`{' '.join(['python -m eval.bench.bench_retrieval', *sys.argv[1:]])}`"
          f" (faiss {faiss.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs visible)\n"]
    if not args.skip_index:
        rows = bench_index(args.sizes, args.types, args.dim, args.clusters, args.queries)
        write_csv(rows, args.out / "index.csv")
        md += ["## Index (synthetic clustered vectors, k=5, single queries)\n", markdown(rows)]
    if not args.skip_quality:
        summary, per_ds = bench_quality(args.data, args.embedders, limit=args.limit, random_draws=args.random_draws)
        write_csv(summary, args.out / "quality.csv")
        write_csv(per_ds, args.out / "quality_per_dataset.csv")
        md += ["## Retrieval quality on the real data (test split vs train supports)\n", markdown(summary),
               "\n### Per dataset and label\n", markdown(per_ds)]
    text = "\n".join(md)
    tmp = args.out / "bench_retrieval.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.out / "bench_retrieval.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
