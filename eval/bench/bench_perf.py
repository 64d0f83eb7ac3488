"""``segicl benchmark perf``: what SegICL costs, side by side with its alternatives (issue 20).

One run measures, with warm-up calls excluded and p50 / p95 over ``--repeats`` timed calls:

- **segment**: the shipped pipeline (``--checkpoint``, default the shipped one) at its default
  inference settings (and at the in-domain table's 10 steps / 1 sample when these differ), k = 0, 3, 5
  supports retrieved from a support store over the train splits of ``--data``, on ``--images`` test
  images per dataset (the stored images, longer side <= 256 px). Broken down, by timing the
  pipeline's own methods from outside (wrapped for the run, no library change): ``load`` (the
  checkpoint, once), ``embed`` and ``search`` (retrieval/store.py), ``read`` (the supports' files),
  ``encoder`` (``pipe.encode``; of which ``match``, the route's label propagation), ``decoder``
  (``pipe.decode``: all steps, and ``decoder.step`` per step), ``propagation`` (segicl/native.py,
  the blend / native path), ``postprocess`` (segicl/postprocess.py decide + apply), ``other`` (the
  rest of the pipeline call: conversions, resizing) and ``pipeline`` (the call) and ``total``;
- **throughput**: images per second of one pipeline call on a batch of 1, 8, 16 (``--batches``),
  k = 3 retrieved supports each (retrieval excluded); p50 is batch / median call time, p95 batch /
  the 95th percentile call time (the slow tail);
- **alternatives** on the same queries with the same supports: ``labelprop`` (eval/methods.py), the
  few-shot U-Net (trained on the k supports per query: training and prediction timed apart), the
  UniverSeg-style comparator when ``--universeg DIR`` is given; ratios SegICL / alternative;
- **store**: build, query p50 / p95 / p99 and recall@5 against exact search on ``--store-sizes``
  synthetic clustered vectors (eval/bench/bench_retrieval.py ``bench_index``, one thread, the index
  type the store chooses at that size unless ``--index-types``);
- **training**: steps/s of stage 1 and of the dense stage 2 on the tiny preset
  (eval/bench/bench_training.py ``bench_stage``; ``--skip-training``), DeepSpeed ZeRO-2 one vs two
  processes with ``--zero2``;
- **cost curves** (PNG): latency vs k (the pipeline up to ``config.k_max``, the propagation alone up
  to 16), vs image size (``--sizes``: a real query and its supports resized), vs store size;
- the machine: 1-minute load average before and after (a loud warning above 0.5 at the start;
  ``--wait-idle SECONDS`` waits for an idle machine first), threads, peak resident memory.

Writes ``perf.csv`` (one row per measurement: name, setting, p50, p95, p99, n, unit), ``perf.md``
(tables, ratios, the issue's targets beside each figure with met / not met) and ``perf_k.png``,
``perf_size.png``, ``perf_store.png`` under ``--out``.

    segicl benchmark perf --out docs/results/perf                  # the full run (run it on an idle machine)
    segicl benchmark perf --quick --out /tmp/perf                  # a subset in a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import itertools
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
IDLE_LOAD = 0.5
BATCHES = (1, 8, 16)
SEGMENT_KS = (0, 3, 5)
CURVE_KS = (0, 1, 3, 5, 8, 16)
PROPAGATION_KS = (1, 3, 5, 8, 16)
IMAGE_SIZES = (128, 256, 512, 1024)
CURVE_STORE_MIN = 10_000
# issue 20's targets: (row name, setting prefix, comparison, value, unit, text)
TARGETS = (
    ("segment.total", "k=3", "<=", 0.25, "s", "segment at k = 3 retrieved, p50 per 256-px image"),
    ("throughput", "batch=16", ">=", 10.0, "img/s", "throughput at batch 16"),
    ("store.query", "n=1000000", "<=", 2.0, "ms", "1M store query p50"),
    ("store.recall@5", "n=1000000", ">=", 0.95, "", "1M store recall@5"),
    ("store.build", "n=1000000", "<=", 60.0, "s", "1M store build"),
    ("zero2.ratio_to_linear", "", ">=", 0.8, "", "ZeRO-2, two processes / linear"),
)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from eval.bench.bench_retrieval import DEFAULT_DATA

    parser.add_argument("--out", type=Path, required=True, help="output folder (perf.csv, perf.md, plots)")
    parser.add_argument("--data", action="append", type=Path, default=None, metavar="DIR",
                        help=f"dataset folder, or a folder of them (repeat for several; default {DEFAULT_DATA})")
    parser.add_argument("--images", type=int, default=None, help="test images per dataset (default 2; --quick 1)")
    parser.add_argument("--checkpoint", default=None, help="SegICL checkpoint (default: the shipped one)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default: each query as often, >= 20 calls; --quick >= 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; --quick 1)")
    parser.add_argument("--batches", type=_int_list, default=list(BATCHES), help="throughput batch sizes, comma list")
    parser.add_argument("--sizes", type=_int_list, default=list(IMAGE_SIZES), help="image sides of the size curve (px)")
    parser.add_argument("--store-sizes", type=_int_list, default=None,
                        help="synthetic store sizes (default 100000,1000000; --quick 10000,100000); the store "
                             f"curve adds {CURVE_STORE_MIN} when the sizes go above it")
    parser.add_argument("--store-queries", type=int, default=None, help="queries per store size (default 1000; --quick 200)")
    parser.add_argument("--index-types", default=None,
                        help="comma list of flat,hnsw,ivfpq (default: the type the store chooses at each size)")
    parser.add_argument("--universeg", type=Path, default=None, metavar="DIR", help="a saved UniverSeg-style comparator")
    parser.add_argument("--skip-training", action="store_true", help="no training steps/s")
    parser.add_argument("--train-steps", type=int, default=6, help="steps per training stage")
    parser.add_argument("--zero2", action="store_true", help="also DeepSpeed ZeRO-2 one vs two processes (slow)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help=f"first wait up to SECONDS for the 1-min load average to drop below {IDLE_LOAD}")
    parser.add_argument("--quick", action="store_true", help="a small subset: fewer repeats, small stores, no training")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ------------------------------------------------------------------------------------ measuring
def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


class Results:
    """The rows of perf.csv: one per measurement (name, setting, p50, p95, p99, n, unit)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, setting: str, values: Sequence[float] | float, unit: str, scale: float = 1.0) -> dict:
        vals = [float(v) * scale for v in (values if isinstance(values, (list, tuple, np.ndarray)) else [values])]
        row = {"name": name, "setting": setting, "p50": pct(vals, 50), "p95": pct(vals, 95), "p99": pct(vals, 99),
               "n": len(vals), "unit": unit}
        self.rows.append(row)
        return row

    def add_row(self, name: str, setting: str, p50: float, p95: float, p99: float, n: int, unit: str) -> dict:
        row = {"name": name, "setting": setting, "p50": float(p50), "p95": float(p95), "p99": float(p99), "n": int(n),
               "unit": unit}
        self.rows.append(row)
        return row

    def get(self, name: str, setting: str | None = None) -> dict | None:
        for r in self.rows:
            if r["name"] == name and (setting is None or r["setting"] == setting or r["setting"].startswith(setting + " ")):
                return r
        return None

    def write_csv(self, path: Path) -> None:
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["name", "setting", "p50", "p95", "p99", "n", "unit"])
            w.writeheader()
            for r in self.rows:
                w.writerow({**r, **{k: f"{r[k]:.6g}" for k in ("p50", "p95", "p99")}})
        os.replace(tmp, path)


class Probe:
    """Seconds spent in wrapped callables since the last :meth:`reset` (nested ones counted in each)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.calls[name] += 1

        return timed


@contextlib.contextmanager
def instrument(pipe: Any, probe: Probe) -> Iterator[Probe]:
    """Time the pipeline's parts from outside: its bound methods (instance attributes shadow them) and
    the module-level functions segicl/pipeline.py calls, restored on exit."""
    import segicl.pipeline as sp

    saved_attrs: list[tuple[Any, str, Any]] = []
    saved_globals = {name: getattr(sp, name) for name in ("fine_propagation", "decide", "apply")}
    missing = object()

    def patch(obj: Any, attr: str, name: str) -> None:
        saved_attrs.append((obj, attr, vars(obj).get(attr, missing)))
        setattr(obj, attr, probe.wrap(name, getattr(obj, attr)))

    try:
        patch(pipe, "encode", "encoder")
        patch(pipe, "match", "encoder.match")
        patch(pipe, "decode", "decoder")
        for dec in (pipe.decoder, pipe.route_decoder):
            if dec is not None:
                patch(dec, "predict", "decoder.step")
        sp.fine_propagation = probe.wrap("propagation", saved_globals["fine_propagation"])
        sp.decide = probe.wrap("postprocess", saved_globals["decide"])
        sp.apply = probe.wrap("postprocess", saved_globals["apply"])
        yield probe
    finally:
        for obj, attr, before in reversed(saved_attrs):  # the instance attributes go: the class's methods show again
            if before is missing:
                vars(obj).pop(attr, None)
            else:
                vars(obj)[attr] = before
        for name, fn in saved_globals.items():
            setattr(sp, name, fn)


def timed_calls(fn: Callable[[int], Any], warmup: int, repeats: int) -> tuple[list[float], list[Any]]:
    """``fn(i)`` for i in range(warmup + repeats); the seconds and results of the timed calls."""
    secs, outs = [], []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        out = fn(i)
        dt = time.perf_counter() - t
        if i >= warmup:
            secs.append(dt)
            outs.append(out)
    return secs, outs


def rss_mb() -> float:
    from eval.bench.bench_retrieval import _rss_mb

    return _rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def wait_idle(seconds: float, poll: float = 5.0) -> float:
    """Wait until the 1-min load average is below IDLE_LOAD or ``seconds`` pass; the load then."""
    end = time.monotonic() + seconds
    load = load1()
    while load >= IDLE_LOAD and time.monotonic() < end:
        print(f"[perf] waiting for an idle machine: 1-min load {load:.2f} (>= {IDLE_LOAD}), "
              f"{end - time.monotonic():.0f} s left", flush=True)
        time.sleep(min(poll, max(0.0, end - time.monotonic())))
        load = load1()
    return load


def section(title: str) -> float:
    print(f"\n[perf] == {title} (load {load1():.2f}, rss {rss_mb():.0f} MB)", flush=True)
    return time.perf_counter()


def done(t0: float) -> None:
    print(f"[perf]    done in {time.perf_counter() - t0:.1f} s", flush=True)


# ------------------------------------------------------------------------------------ the data
class Workload:
    """The queries (test images carrying their dataset's first label) and the support store."""

    def __init__(self, data: Sequence[Path], images: int, seed: int):
        from eval.cli import _expand_data
        from segicl.data import load_dataset

        self.datasets = [load_dataset(p) for p in _expand_data(list(data))]
        self.queries = []
        for ds in self.datasets:
            label = ds.tasks()[0].label_value
            split = "test" if "test" in ds.splits else next(iter(ds.splits))
            stems = ds.stems(split)
            order = [stems[int(i)] for i in np.random.default_rng(seed).permutation(len(stems))]
            chosen = list(itertools.islice((s for s in order if label in ds.labels_present(s)), images)) or order[:images]
            self.queries += [ds.sample(s, label) for s in chosen]
        if not self.queries:
            raise SystemExit("segicl benchmark perf: no query images under --data")
        self.store = None
        self.support_cache: dict[tuple[int, int], list] = {}

    def build_store(self) -> float:
        from retrieval.store import SupportStore

        split = "train" if all("train" in ds.splits for ds in self.datasets) else "all"
        t = time.perf_counter()
        self.store = SupportStore.build([ds.root for ds in self.datasets], split=split, progress=False)
        return time.perf_counter() - t

    def retrieve(self, q: Any, k: int) -> tuple[list, dict[str, float]]:
        """Embed, search and read the k supports of ``q``; the supports and the seconds of each part."""
        if not k:
            return [], {"embed": 0.0, "search": 0.0, "read": 0.0}
        store = self.store
        t0 = time.perf_counter()
        qv = store.embed([q.image])
        t1 = time.perf_counter()
        hits = store.search(query_embeddings=qv[0], embedder_id=store.embedder_id, k=k, dataset=q.dataset,
                            label=q.label_value, exclude_stems=[q.stem], exclude_groups=[q.group])
        t2 = time.perf_counter()
        sup = [h.sample(q.label_value) for h in hits]
        t3 = time.perf_counter()
        return sup, {"embed": t1 - t0, "search": t2 - t1, "read": t3 - t2}

    def supports(self, qi: int, k: int) -> list:
        """The k retrieved supports of query ``qi`` (cached: for the timings without retrieval)."""
        key = (qi, k)
        if key not in self.support_cache:
            self.support_cache[key] = self.retrieve(self.queries[qi], k)[0] if k else []
        return self.support_cache[key]


# ------------------------------------------------------------------------------------ sections
def settings_of(pipe: Any) -> list[tuple[str, dict[str, int]]]:
    sc = pipe.config.scheduler
    default = (f"default ({sc.num_inference_steps} steps, {sc.num_samples} sample{'s' if sc.num_samples > 1 else ''})", {})
    if (sc.num_inference_steps, sc.num_samples) == (10, 1):
        return [default]
    return [default, ("10 steps, 1 sample", {"num_inference_steps": 10, "num_samples": 1})]


def bench_segment(pipe: Any, work: Workload, res: Results, ks: Sequence[int], warmup: int, repeats: int, seed: int) -> None:
    import torch

    probe = Probe()
    parts = ("embed", "search", "read", "encoder", "encoder.match", "decoder", "decoder.step", "propagation",
             "postprocess", "other", "pipeline", "total")
    for label, kwargs in settings_of(pipe):
        for k in ks:
            per: dict[str, list[float]] = defaultdict(list)
            paths: dict[str, int] = defaultdict(int)

            def one(i, k=k, kwargs=kwargs, per=per, paths=paths):
                q = work.queries[i % len(work.queries)]
                probe.reset()
                t0 = time.perf_counter()
                sup, rt = work.retrieve(q, k)
                t1 = time.perf_counter()
                out = pipe([q.image], text=q.instruction, supports=[[(s.image, s.mask) for s in sup]],
                           generator=torch.Generator().manual_seed(seed), **kwargs)
                t2 = time.perf_counter()
                if i < warmup:
                    return None
                s = dict(probe.seconds)
                vals = {**rt, "encoder": s.get("encoder", 0.0), "encoder.match": s.get("encoder.match", 0.0),
                        "decoder": s.get("decoder", 0.0), "propagation": s.get("propagation", 0.0),
                        "postprocess": s.get("postprocess", 0.0), "pipeline": t2 - t1, "total": t2 - t0}
                steps = probe.calls.get("decoder.step", 0)
                vals["decoder.step"] = s.get("decoder.step", 0.0) / steps if steps else float("nan")
                vals["other"] = vals["pipeline"] - sum(vals[p] for p in ("encoder", "decoder", "propagation", "postprocess"))
                for p in parts:
                    per[p].append(vals[p])
                paths[out.paths[0]] += 1
                return None

            with instrument(pipe, probe):
                timed_calls(one, warmup, repeats)
            setting = f"k={k} {label}"
            for p in parts:
                vals = [v for v in per[p] if v == v]
                if vals:
                    res.add(f"segment.{p}", setting, vals, "s")
            print(f"[perf]    segment k={k} {label}: total p50 {pct(per['total'], 50):.3f} s, pipeline "
                  f"{pct(per['pipeline'], 50):.3f} s, decoder {pct(per['decoder'], 50):.3f} s, paths {dict(paths)}", flush=True)


def bench_throughput(pipe: Any, work: Workload, res: Results, batches: Sequence[int], k: int, warmup: int,
                     repeats: int, seed: int) -> None:
    import torch

    nq = len(work.queries)
    for b in batches:
        idx = [i % nq for i in range(b)]
        images = [work.queries[i].image for i in idx]
        texts = [work.queries[i].instruction for i in idx]
        sups = [[(s.image, s.mask) for s in work.supports(i, k)] for i in idx]
        secs, _ = timed_calls(lambda _i, images=images, texts=texts, sups=sups, b=b: pipe(
            images, text=texts, supports=sups, batch_size=b, generator=torch.Generator().manual_seed(seed)),
            warmup, repeats)
        res.add_row("throughput", f"batch={b} k={k}", b / pct(secs, 50), b / pct(secs, 95), b / pct(secs, 99),
                    len(secs), "img/s")
        print(f"[perf]    batch {b}: {b / pct(secs, 50):.2f} img/s", flush=True)


def bench_alternatives(work: Workload, res: Results, ks: Sequence[int], warmup: int, repeats: int,
                       universeg: Path | None, seed: int, quick: bool) -> None:
    import dataclasses

    from eval.methods import LabelPropagation, UniverSegMethod, derive_seed
    from eval.suite import load_eval_config
    from eval.unet import UNetConfig, train_unet

    config = load_eval_config(None)
    methods: list[tuple[str, Any]] = [("labelprop", LabelPropagation(config.get("labelprop")))]
    if universeg is not None:
        methods.append(("universeg", UniverSegMethod(universeg, name=f"universeg:{universeg}")))
    nq = len(work.queries)
    for k in [k for k in ks if k >= 1]:
        for name, method in methods:
            secs, _ = timed_calls(lambda i, k=k, method=method: method.predict(
                work.queries[i % nq], work.supports(i % nq, k), work.queries[i % nq].instruction, seed), warmup, repeats)
            res.add(f"alt.{name}", f"k={k}", secs, "s")
            print(f"[perf]    {name} k={k}: {pct(secs, 50):.4f} s", flush=True)
        # the few-shot U-Net trains on the k supports of each query, then predicts it
        ucfg = UNetConfig.from_dict(config.get("unet_fewshot"))
        if warmup:  # the first training pays for imports and allocator warm-up
            train_unet(work.supports(0, k), dataclasses.replace(ucfg, steps=2), 0).predict(work.queries[0].image)
        n_unet = max(1, repeats // 4) if not quick else 1
        train_s, pred_s = [], []
        for i in range(n_unet):
            q, sup = work.queries[i % nq], work.supports(i % nq, k)
            t = time.perf_counter()
            model = train_unet(sup, ucfg, derive_seed(seed, "perf", i, k))
            train_s.append(time.perf_counter() - t)
            model.predict(q.image)  # warm-up of the prediction
            for _ in range(max(1, repeats // n_unet)):
                t = time.perf_counter()
                model.predict(q.image)
                pred_s.append(time.perf_counter() - t)
        res.add("alt.unet_fewshot.train", f"k={k} {ucfg.steps} steps", train_s, "s")
        res.add("alt.unet_fewshot.predict", f"k={k}", pred_s, "s")
        res.add("alt.unet_fewshot", f"k={k} train + predict", [t + pct(pred_s, 50) for t in train_s], "s")
        print(f"[perf]    unet_fewshot k={k}: train {pct(train_s, 50):.2f} s, predict {pct(pred_s, 50):.4f} s", flush=True)


def bench_store(res: Results, sizes: Sequence[int], types: Sequence[str] | None, dim: int, queries: int) -> None:
    import faiss

    from eval.bench.bench_retrieval import bench_index
    from retrieval.index import choose_index_type

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for n in sizes:
            for row in bench_index([n], list(types or [choose_index_type(n)]), dim, clusters=1000, n_queries=queries):
                setting = f"n={n} {row['index']} dim={dim}"
                res.add("store.build", setting, row["build_s"], "s")
                res.add_row("store.query", setting, row["query_ms_p50"], row["query_ms_p95"], row["query_ms_p99"],
                            queries, "ms")
                res.add("store.recall@5", setting, row["recall@5"], "")
                res.add("store.index_mb", setting, row["index_mb"], "MB")
    finally:
        faiss.omp_set_num_threads(threads)


def bench_train(res: Results, data: Sequence[Path], steps: int, zero2: bool) -> None:
    import torch

    from eval.bench.bench_training import bench_stage, bench_zero2
    from segicl.pipeline import default_checkpoint

    threads = torch.get_num_threads()
    stages = [("stage1", REPO / "configs" / "train" / "tiny_stage1.yaml", []),
              ("stage2", REPO / "configs" / "train" / "tiny_dense.yaml", [f"model.init={default_checkpoint()}"])]
    with tempfile.TemporaryDirectory() as cache:
        for stage, config, sets in stages:
            args = argparse.Namespace(stage=stage, config=config, steps=steps, threads=1, workers=0,
                                      set=[*sets, f"data.cache_dir={cache}"], data=list(data))
            try:
                out = bench_stage(args)
            except Exception as e:  # a stage that cannot run here is reported, not fatal
                print(f"[perf]    training {stage} failed: {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                torch.set_num_threads(threads)
            if out.get("steps_per_s"):
                name = "dense stage 2" if stage == "stage2" else stage
                res.add(f"train.{stage}", f"{name} tiny, batch {out['batch_size']}, {out['steps']} steps, 1 thread",
                        out["steps_per_s"], "steps/s")
                print(f"[perf]    {stage}: {out['steps_per_s']} steps/s", flush=True)
        if zero2:
            args = argparse.Namespace(stage="stage1", config=REPO / "configs" / "train" / "tiny_stage1.yaml",
                                      steps=max(steps, 8), threads=1, set=[f"data.cache_dir={cache}"], data=list(data),
                                      timeout=1200)
            try:
                out = bench_zero2(args)
                res.add("zero2.1proc", "stage1 tiny", out["1proc"]["steps_per_s"], "steps/s")
                res.add("zero2.2proc", "stage1 tiny", out["2proc"]["steps_per_s"], "steps/s")
                res.add("zero2.ratio_to_linear", "stage1 tiny (2-proc / 1-proc steps/s at a fixed per-process batch)",
                        out["ratio_2proc_over_1proc_steps_per_s"], "")
            except Exception as e:
                print(f"[perf]    ZeRO-2 failed: {type(e).__name__}: {str(e)[:400]}", flush=True)


def _resized(sample: Any, side: int) -> Any:
    import dataclasses

    from PIL import Image

    img = sample.image.resize((side, side), Image.Resampling.BICUBIC)
    mask = np.asarray(Image.fromarray(sample.mask.astype(np.uint8) * 255).resize((side, side), Image.Resampling.NEAREST)) > 0
    return dataclasses.replace(sample, image=img, mask=mask)


def bench_curves(pipe: Any, work: Workload, res: Results, sizes: Sequence[int], warmup: int, repeats: int,
                 seed: int) -> None:
    import dataclasses

    import torch

    from eval.methods import LabelPropagation
    from eval.suite import load_eval_config
    from segicl.native import fine_propagation

    labelprop = LabelPropagation(load_eval_config(None).get("labelprop"))
    fc = pipe.config.fine
    blend_cfg = dataclasses.replace(fc, max_size=fc.blend_size)
    nq = len(work.queries)

    def run_pipe(q, sup):
        return pipe([q.image], text=q.instruction, supports=[[(s.image, s.mask) for s in sup]],
                    generator=torch.Generator().manual_seed(seed))

    for k in [k for k in CURVE_KS if k <= pipe.config.k_max]:
        secs, _ = timed_calls(lambda i, k=k: run_pipe(work.queries[i % nq], work.supports(i % nq, k)), warmup, repeats)
        res.add("curve_k.segicl", f"k={k}", secs, "s")
    for k in PROPAGATION_KS:
        avail = min(len(work.supports(i, k)) for i in range(nq))
        if avail < k:
            print(f"[perf]    propagation curve stops before k={k}: only {avail} supports retrievable", flush=True)
            break
        secs, _ = timed_calls(lambda i, k=k: labelprop.predict(work.queries[i % nq], work.supports(i % nq, k), "", seed),
                              warmup, repeats)
        res.add("curve_k.labelprop", f"k={k}", secs, "s")
        secs, _ = timed_calls(lambda i, k=k: fine_propagation(
            work.queries[i % nq].image, [(s.image, s.mask) for s in work.supports(i % nq, k)], pipe.config.matching,
            blend_cfg), warmup, repeats)
        res.add("curve_k.propagation", f"k={k} blend {fc.blend_size} px", secs, "s")
    q0, sup0 = work.queries[0], work.supports(0, min(3, pipe.config.k_max))
    for side in sizes:
        q, sup = _resized(q0, side), [_resized(s, side) for s in sup0]
        secs, _ = timed_calls(lambda _i, q=q, sup=sup: run_pipe(q, sup), warmup, repeats)
        res.add("curve_size.segicl", f"{side} px k={len(sup)}", secs, "s")
        secs, _ = timed_calls(lambda _i, q=q, sup=sup: labelprop.predict(q, sup, "", seed), warmup, repeats)
        res.add("curve_size.labelprop", f"{side} px k={len(sup)}", secs, "s")
        print(f"[perf]    {side} px: segicl {res.get('curve_size.segicl', f'{side} px')['p50']:.3f} s, "
              f"labelprop {res.rows[-1]['p50']:.4f} s", flush=True)


# ------------------------------------------------------------------------------------ output
def _setting_value(setting: str, key: str) -> float:
    """The number after ``key`` in a setting ("k=3 ..." -> 3 for "k="; "512 px" -> 512 for "px")."""
    for tok in setting.split():
        if key.endswith("=") and tok.startswith(key):
            return float(tok[len(key):])
    if key == "px":
        return float(setting.split()[0])
    raise ValueError(f"{key!r} not in {setting!r}")


def plots(res: Results, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    specs = (
        ("perf_k.png", "latency vs k (supports given, retrieval excluded)", "k (supports)", "k=",
         ("curve_k.segicl", "curve_k.labelprop", "curve_k.propagation")),
        ("perf_size.png", "latency vs image size (k = 3, query and supports resized)", "image side (px)", "px",
         ("curve_size.segicl", "curve_size.labelprop")),
        ("perf_store.png", "store query vs store size (k = 5, one thread)", "store size (vectors)", "n=",
         ("store.query",)),
    )
    for fname, title, xlabel, key, names in specs:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        drawn = False
        for name in names:
            groups: dict[str, list[dict]] = {}
            for r in res.rows:
                if r["name"] == name:  # one line per setting once the x value is taken out (e.g. per index type)
                    rest = " ".join(t for t in r["setting"].split()
                                    if not (t.startswith(key) if key.endswith("=") else t == key or t.isdigit()))
                    groups.setdefault(rest, []).append(r)
            every = [r for rows in groups.values() for r in rows]
            notes = {}
            if len({_setting_value(r["setting"], key) for r in every}) == len(every) and len(groups) > 1:
                # one point per x (the store's index type changes with its size): one line, each point named
                notes = {id(r): rest for rest, rows in groups.items() for r in rows}
                groups = {"": sorted(every, key=lambda r: _setting_value(r["setting"], key))}
            for rest, rows in groups.items():
                xs = [_setting_value(r["setting"], key) for r in rows]
                label = name.split(".", 1)[1] + (f" {rest}" if rest and len(groups) > 1 else "")
                ax.errorbar(xs, [r["p50"] for r in rows], yerr=[[0] * len(rows), [r["p95"] - r["p50"] for r in rows]],
                            marker="o", capsize=3, label=f"{label} (p50, bar to p95)")
                for x, r in zip(xs, rows):
                    if notes.get(id(r)):
                        ax.annotate(notes[id(r)].split()[0], (x, r["p50"]), textcoords="offset points", xytext=(4, -10),
                                    fontsize=7)
                ax.set_ylabel(rows[0]["unit"])
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        if key in ("px", "n="):
            ax.set_xscale("log")
            ticks = sorted({_setting_value(r["setting"], key) for r in res.rows if r["name"] in names})
            ax.set_xticks(ticks, [f"{t:g}" if key == "px" else f"{t / 1000:g}k" for t in ticks])
            ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    return made


def _fmt(v: float, unit: str = "") -> str:
    if v != v:
        return "n/a"
    if unit == "s" and v < 0.1:
        return f"{v * 1e3:.1f} ms"
    if unit == "s":
        return f"{v:.3f} s"
    if unit in ("ms", "img/s", "steps/s", "MB"):
        return f"{v:.3g} {unit}"
    return f"{v:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def targets_table(res: Results) -> list[str]:
    lines = []
    for name, setting, op, goal, unit, text in TARGETS:
        row = None
        for r in res.rows:
            if r["name"] == name and setting in r["setting"]:
                row = r
                break
        if row is None:
            lines.append((text, f"{op} {goal:g} {unit}".strip(), "not measured", "-"))
            continue
        v = row["p50"]
        met = v <= goal if op == "<=" else v >= goal
        by = v / goal if op == "<=" else goal / v if v else float("inf")
        verdict = "met" if met else f"not met ({by:.1f}x off)"
        lines.append((f"{text} ({row['setting']})", f"{op} {goal:g} {unit}".strip(), _fmt(v, unit), verdict))
    return _table(["target (issue 20)", "goal", "measured (p50)", ""], lines)


def markdown(res: Results, meta: dict[str, Any], pngs: Sequence[str]) -> str:
    md = ["# Performance: `segicl benchmark perf`", "",
          f"`{meta['command']}`", "",
          f"{meta['date']}, {meta['machine']}; {meta['versions']}.", ""]
    if meta["warning"]:
        md += [f"> **WARNING: {meta['warning']}**", ""]
    md += ["## Machine", "",
           f"- 1-min load average: {meta['load_before']:.2f} at the start, {meta['load_after']:.2f} at the end "
           f"(idle means < {IDLE_LOAD})",
           f"- torch threads {meta['torch_threads']}, store queries on 1 faiss thread, {os.cpu_count()} CPUs visible",
           f"- peak resident memory {meta['peak_rss_mb']:.0f} MB; checkpoint `{meta['checkpoint']}`",
           f"- queries: {meta['queries']}; support store: {meta['store']}",
           f"- p50 / p95 over {meta['repeats']} timed calls after {meta['warmup']} warm-up call(s); wall time "
           f"{meta['wall_s']:.0f} s", ""]
    md += ["## Targets", ""] + targets_table(res) + [""]

    seg = [r for r in res.rows if r["name"].startswith("segment.")]
    if seg:
        settings = list(dict.fromkeys(r["setting"] for r in seg))
        parts = list(dict.fromkeys(r["name"] for r in seg))
        by = {(r["name"], r["setting"]): r for r in seg}
        md += ["## Segment latency", "",
               "One query at a time: embed + search the store, read the k supports, the pipeline call "
               "(`encoder` includes its `match`; `decoder` is all steps, `decoder.step` one step). p50 (p95).", ""]
        rows = []
        for p in parts:
            cells = [f"{_fmt(by[(p, s)]['p50'], 's')} ({_fmt(by[(p, s)]['p95'], 's')})" if (p, s) in by else ""
                     for s in settings]
            rows.append([p.split(".", 1)[1], *cells])
        for name, text in (("load.again", "load (checkpoint, again)"), ("load", "load (checkpoint, first: imports)")):
            load = res.get(name)
            if load:
                rows.insert(0, [text, *([_fmt(load["p50"], "s")] + [""] * (len(settings) - 1))])
        md += _table(["part", *settings], rows) + [""]

    thr = [r for r in res.rows if r["name"] == "throughput"]
    if thr:
        md += ["## Batch throughput", "", "One pipeline call per batch (supports retrieved beforehand); p95 column: "
               "batch / the 95th-percentile call time.", ""]
        md += _table(["batch", "img/s (p50)", "img/s (p95 call)", "s per image (p50)"],
                     [[r["setting"], f"{r['p50']:.2f}", f"{r['p95']:.2f}", _fmt(1 / r["p50"], "s")] for r in thr]) + [""]

    alts = [r for r in res.rows if r["name"].startswith("alt.")]
    if alts:
        md += ["## Alternatives", "",
               "The same queries and the same retrieved supports; SegICL is the pipeline call alone (retrieval "
               "excluded, as for the others). Ratio = SegICL / the alternative (> 1: SegICL is slower).", ""]
        rows = []
        for r in alts:
            k = r["setting"].split()[0]
            ours = res.get("segment.pipeline", k)
            whole = r["name"].count(".") == 1  # a method's whole cost, not one of its parts (U-Net train / predict)
            ratio = f"{ours['p50'] / r['p50']:.2g}" if whole and ours and r["p50"] > 0 else ""
            rows.append([r["name"][4:], r["setting"], _fmt(r["p50"], r["unit"]), _fmt(r["p95"], r["unit"]), r["n"],
                         _fmt(ours["p50"], "s") if whole and ours else "", ratio])
        md += _table(["method", "setting", "p50", "p95", "n", "SegICL pipeline p50", "SegICL / it"], rows) + [""]

    store = [r for r in res.rows if r["name"] in ("store.build", "store.query", "store.recall@5", "store.index_mb")]
    if store:
        md += ["## Support store", "",
               "Synthetic clustered vectors (eval/bench/bench_retrieval.py `bench_index`), single queries at k = 5, "
               "one thread; recall@5 against exact search.", ""]
        settings = list(dict.fromkeys(r["setting"] for r in store))
        by = {(r["name"], r["setting"]): r for r in store}

        def cell(name, s, fmt):
            r = by.get((name, s))
            return fmt(r) if r else ""

        md += _table(["store", "build", "query p50", "query p95", "query p99", "recall@5", "index size"], [
            [s, cell("store.build", s, lambda r: _fmt(r["p50"], "s")),
             cell("store.query", s, lambda r: f"{r['p50']:.3f} ms"), cell("store.query", s, lambda r: f"{r['p95']:.3f} ms"),
             cell("store.query", s, lambda r: f"{r['p99']:.3f} ms"), cell("store.recall@5", s, lambda r: f"{r['p50']:.4f}"),
             cell("store.index_mb", s, lambda r: f"{r['p50']:.1f} MB")] for s in settings]) + [""]
        real = res.get("store.build_real")
        if real:
            md += [f"The real store of the run ({real['setting']}) was built in {_fmt(real['p50'], 's')}.", ""]

    train = [r for r in res.rows if r["name"].startswith(("train.", "zero2."))]
    md += ["## Training", ""]
    if train:
        md += _table(["what", "setting", "value"], [[r["name"], r["setting"], _fmt(r["p50"], r["unit"])] for r in train])
        if not any(r["name"].startswith("zero2.") for r in train):
            md += ["", "DeepSpeed ZeRO-2 one vs two processes: not measured (`--zero2`)."]
        md += [""]
    else:
        md += ["Not measured (`--skip-training` or `--quick`).", ""]

    curves = [r for r in res.rows if r["name"].startswith("curve_")]
    if curves:
        md += ["## Cost curves", "", "Supports given (retrieval excluded); `propagation` is segicl/native.py at the "
               "pipeline's blend size, `labelprop` the eval method (64 px).", ""]
        md += _table(["curve", "setting", "p50", "p95", "n"],
                     [[r["name"], r["setting"], _fmt(r["p50"], r["unit"]), _fmt(r["p95"], r["unit"]), r["n"]]
                      for r in curves]) + [""]
        md += [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(md)


def command_line(args: argparse.Namespace) -> str:
    """The command as given (the options that differ from their defaults, when called from Python)."""
    argv = sys.argv[1:]
    if argv[:2] == ["benchmark", "perf"]:
        return " ".join(["segicl", *argv])
    defaults = vars(add_arguments(argparse.ArgumentParser()).parse_args(["--out", "x"]))
    opts = []
    for key, value in vars(args).items():
        if key in defaults and (value != defaults[key] or key == "out"):
            flag = "--" + key.replace("_", "-")
            if value is True:
                opts.append(flag)
            elif isinstance(value, list):
                opts += [flag, ",".join(map(str, value))] if key != "data" else sum(([flag, str(v)] for v in value), [])
            else:
                opts += [flag, str(value)]
    return " ".join(["segicl benchmark perf", *opts])


# ------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    import torch

    from eval.bench.bench_retrieval import DEFAULT_DATA
    from eval.methods import load_segicl

    t_start = time.perf_counter()
    quick = args.quick
    repeats = args.repeats  # default: every query as often, at least 20 calls (--quick: each query once, at least 5)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    images = args.images or (1 if quick else 2)
    store_sizes = args.store_sizes or ([10_000, 100_000] if quick else [100_000, 1_000_000])
    if max(store_sizes) > CURVE_STORE_MIN and CURVE_STORE_MIN not in store_sizes:
        store_sizes = sorted({CURVE_STORE_MIN, *store_sizes})
    store_queries = args.store_queries or (200 if quick else 1000)
    types = [t.strip() for t in args.index_types.split(",")] if args.index_types else None
    if (repeats is not None and repeats < 1) or warmup < 0 or images < 1 or any(b < 1 for b in args.batches) or any(s < 16 for s in args.sizes):
        raise SystemExit("segicl benchmark perf: --repeats, --images and --batches must be >= 1, --warmup >= 0, --sizes >= 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or [DEFAULT_DATA]

    load_before = wait_idle(args.wait_idle) if args.wait_idle > 0 else load1()
    warning = ""
    if load_before > IDLE_LOAD:
        warning = (f"the 1-min load average was {load_before:.2f} at the start (> {IDLE_LOAD}): the machine was not idle, "
                   "these timings are not representative (rerun idle, e.g. with --wait-idle 600)")
        print("\n" + "!" * 100 + f"\n[perf] WARNING: {warning}\n" + "!" * 100 + "\n", file=sys.stderr, flush=True)
    res = Results()

    t0 = section("load: the checkpoint")
    t = time.perf_counter()
    pipe, ckpt = load_segicl(args.checkpoint)
    res.add("load", "checkpoint, first (imports included)", time.perf_counter() - t, "s")
    t = time.perf_counter()
    load_segicl(args.checkpoint)
    res.add("load.again", "checkpoint, second load in the process", time.perf_counter() - t, "s")
    done(t0)

    t0 = section("data: queries and the real support store")
    work = Workload(data, images, args.seed)
    build_s = work.build_store()
    store_desc = f"{len(work.store)} train images of {len(work.datasets)} dataset(s), {work.store.embedder_spec} embedder, " \
                 f"{work.store.index_type}"
    res.add("store.build_real", store_desc, build_s, "s")
    nq = len(work.queries)
    repeats = repeats or nq * math.ceil((5 if quick else 20) / nq)
    for q in work.queries:  # warm caches: the datasets' indexes (Hit.sample), the files' pages
        work.retrieve(q, min(max(SEGMENT_KS), pipe.config.k_max))
    queries_desc = (f"{nq} test image(s) ({images} per dataset) of " + ", ".join(ds.name for ds in work.datasets))
    print(f"[perf]    {queries_desc}; store: {store_desc}, built in {build_s:.1f} s", flush=True)
    done(t0)

    kmax = pipe.config.k_max
    t0 = section("segment latency, k = 0, 3, 5 retrieved")
    bench_segment(pipe, work, res, [k for k in SEGMENT_KS if k <= kmax], warmup, repeats, args.seed)
    done(t0)

    t0 = section(f"batch throughput, batches {args.batches}")
    bench_throughput(pipe, work, res, args.batches, min(3, kmax), 1 if warmup else 0,
                     max(2, repeats // 4) if not quick else 2, args.seed)
    done(t0)

    t0 = section("alternatives on the same queries and supports")
    bench_alternatives(work, res, [k for k in SEGMENT_KS if k <= kmax], warmup, repeats, args.universeg, args.seed, quick)
    done(t0)

    t0 = section(f"support store, synthetic, sizes {store_sizes}")
    bench_store(res, store_sizes, types, int(work.store.dim), store_queries)
    done(t0)

    if not (args.skip_training or quick):
        t0 = section("training steps/s")
        bench_train(res, data, args.train_steps, args.zero2)
        done(t0)

    t0 = section("cost curves: k, image size")
    bench_curves(pipe, work, res, args.sizes, warmup, max(2, repeats // 2), args.seed)
    done(t0)

    load_after = load1()
    res.add("machine.load1_before", "1-min load average", load_before, "")
    res.add("machine.load1_after", "1-min load average", load_after, "")
    res.add("machine.peak_rss", "peak resident memory", peak_rss_mb(), "MB")
    res.write_csv(args.out / "perf.csv")
    pngs = plots(res, args.out)
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    with contextlib.suppress(ImportError):
        import faiss

        versions += f", faiss {faiss.__version__}"
    meta = {"command": command_line(args),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "versions": versions, "warning": warning, "load_before": load_before, "load_after": load_after,
            "torch_threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(), "checkpoint": ckpt,
            "queries": queries_desc, "store": store_desc, "repeats": repeats, "warmup": warmup,
            "wall_s": time.perf_counter() - t_start}
    text = markdown(res, meta, pngs)
    tmp = args.out / "perf.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.out / "perf.md")
    print(text)
    if warning:
        print(f"[perf] WARNING: {warning}", file=sys.stderr, flush=True)
    print(f"[perf] wrote {args.out / 'perf.csv'}, {args.out / 'perf.md'} and {len(pngs)} plot(s) in "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    return 0
