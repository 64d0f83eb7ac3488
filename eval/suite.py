"""The evaluation suite: every method on the same queries, supports and seeds; files for a paper.

One run (``run_suite``)::

    for dataset in --data:                        one support provider (and FAISS store) per dataset
        for task (label) in dataset.tasks():      multi-class datasets are evaluated per label
            queries = stems(--split)[:--limit]
            for method in --methods:              models are built once and reused
                method.prepare(dataset, label)    (the supervised U-Net trains here)
                for (k, supports, draw) in jobs(method):
                    for query in queries:          -> one row of results.csv

Jobs: a method with supports runs every k in ``--k`` (k >= its ``min_k``) under every policy in
``--supports`` and every draw; k = 0 has policy ``none``. A method without supports (VLSM,
supervised U-Net) runs once per query (every draw only if it is stochastic).

Supports always come from the *train* split of the query's dataset, never from the evaluated split,
and never share the query's group (patient / case / sequence):

- ``random``: per (seed, dataset, label, draw) a uniform random order of the train items that
  contain the label; a query takes the first k of that order outside its own group. Support sets
  are therefore shared by the queries of one draw and nested across k (the k = 1 set is inside
  the k = 3 set), so the Dice-vs-k curve compares like with like, a few-shot U-Net trains once per
  set, and the spread over draws measures sensitivity to the choice of supports.
- ``retrieved``: the k nearest train items of the query in the FAISS support store of
  :mod:`retrieval` built on that train split, filtered to the dataset and label, with the query's
  stem and group excluded. Deterministic: draws differ only in the method seed.
- ``shuffled`` (an ablation, issue 16): the supports of *another task*: random train items of the
  next evaluated dataset (in ``--data`` order; its first label), or of the dataset's next label when
  only one dataset is evaluated. The instruction stays the query's. A model that reads its supports
  must lose here; one that ignores them scores as with its own.

Volume datasets (nnU-Net raw folders of 3D cases): the slices are queries as above; per case the slice
predictions are also stacked back into a volume for 3D Dice / HD95 / NSD in mm (eval/volume_eval.py,
volumes.csv), for the cases whose slices were all evaluated.

Seeds: the seed of a prediction is ``derive_seed(seed, dataset, label, stem, draw)``, so the same
run seed gives the same results.csv whatever the order or subset of the run (``seconds`` aside).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from eval import report, volume_eval
from eval.methods import Method, build_method, derive_seed, method_class, parse_spec
from eval.metrics import (
    DEFAULT_NSD_TOLERANCE,
    DEFAULT_NSD_TOLERANCE_MM,
    UNCERTAINTY_METRICS,
    compute_metrics,
    uncertainty_metrics,
)
from segicl import CONFIGS_DIR, REPO_DIR
from segicl.data import Sample, SegDataset, load_dataset

DEFAULT_CONFIG = CONFIGS_DIR / "eval" / "default.yaml"
POLICIES = ("random", "retrieved", "shuffled")


# ------------------------------------------------------------------------------------- config
def load_eval_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read an eval config (YAML); ``None`` reads ``configs/eval/default.yaml``."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval config not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an eval config must be a mapping")
    return data


@dataclass
class SuiteConfig:
    """What one ``segicl evaluate`` run does (the CLI flags, parsed)."""

    data: list[Path]  # dataset folders
    out: Path  # output folder
    methods: list[str] = field(default_factory=lambda: ["segicl"])  # method specs (eval.methods)
    split: str = "test"  # the evaluated split (never a support source)
    ks: list[int] = field(default_factory=lambda: [0, 1, 3, 5])  # numbers of supports
    supports: list[str] = field(default_factory=lambda: ["random"])  # support policies
    draws: int = 1  # support draws per (k, policy)
    checkpoint: str | None = None  # SegICL checkpoint dir, "preset:<name>", None = default
    checkpoints: dict[str, str] | None = None  # leave-one-dataset-out: dataset name -> checkpoint
    steps: int | None = None  # SegICL inference steps (None: config)
    samples: int | None = None  # SegICL diffusion samples (None: config)
    seed: int = 0
    embedder: str | None = None  # support-store embedder spec for ``retrieved`` (None: retrieval's default)
    limit: int | None = None  # first N items of the split per task
    config: dict[str, Any] = field(default_factory=dict)  # eval config (configs/eval/*.yaml)
    config_path: str | None = None
    command: str = ""  # the command line, for run.json
    progress: bool = True  # tqdm progress bar

    def validate(self, injected: Sequence[str] = ()) -> None:
        """Raise ValueError on inconsistent settings before any work starts.

        Args:
            injected: names of ready-made methods (not parsed as specs).
        """
        if not self.data:
            raise ValueError("no dataset given (--data DIR)")
        if not self.methods:
            raise ValueError("no method given (--methods)")
        for spec in self.methods:
            if spec not in injected:
                parse_spec(spec)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"duplicate methods in {self.methods}")
        if not self.ks or any(k < 0 for k in self.ks):
            raise ValueError(f"--k needs non-negative integers, got {self.ks}")
        unknown = sorted(set(self.supports) - set(POLICIES))
        if unknown or not self.supports:
            raise ValueError(f"unknown support policies {unknown}; choose from {POLICIES}")
        if self.draws < 1:
            raise ValueError(f"--draws must be >= 1, got {self.draws}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.split == "train":
            raise ValueError("supports come from the train split; evaluate another split (--split test or val)")


# ----------------------------------------------------------------------------- support policies
class SupportProvider:
    """Supports of one dataset, from its train split, with the query's group excluded."""

    policy = "none"

    def __init__(self, dataset: SegDataset, seed: int, split: str = "train"):
        self.dataset = dataset
        self.seed = seed
        self.split = split
        self._candidates: dict[int, list[str]] = {}

    def candidates(self, label_value: int) -> list[str]:
        """Train stems whose mask contains ``label_value`` (an empty support shows nothing)."""
        if label_value not in self._candidates:
            stems = self.dataset.stems(self.split)
            self._candidates[label_value] = [s for s in stems if label_value in self.dataset.labels_present(s)]
        return self._candidates[label_value]

    def stems(self, query: Sample, k: int, draw: int) -> list[str]:
        """The k support stems for ``query`` in ``draw``."""
        raise TypeError(f"{type(self).__name__} must implement stems()")

    def samples(self, query: Sample, k: int, draw: int, cache: dict[str, Sample]) -> list[Sample]:
        """The k support samples for ``query`` (``cache``: samples already read, by stem)."""
        out = []
        for s in self.stems(query, k, draw):
            if s not in cache:
                cache[s] = self.dataset.sample(s, query.label_value)
            out.append(cache[s])
        return out

    def _check(self, query: Sample, chosen: list[str], k: int) -> list[str]:
        if len(chosen) < k:
            raise ValueError(
                f"only {len(chosen)} {self.split} items of {self.dataset.name} contain "
                f"'{query.label}' outside the query's group; k={k} requested"
            )
        return chosen


class RandomSupports(SupportProvider):
    """Uniform random supports: one nested order per (seed, dataset, label, draw)."""

    policy = "random"

    def stems(self, query: Sample, k: int, draw: int) -> list[str]:
        cands = self.candidates(query.label_value)
        rng = np.random.default_rng(derive_seed(self.seed, "random_supports", self.dataset.name, query.label_value, draw))
        order = [cands[i] for i in rng.permutation(len(cands))]
        chosen = [s for s in order if s != query.stem and self.dataset.group(s) != query.group][:k]
        return self._check(query, chosen, k)


class RetrievedSupports(SupportProvider):
    """The k nearest train items in the FAISS support store (retrieval/), one store per dataset."""

    policy = "retrieved"

    def __init__(self, dataset: SegDataset, seed: int, split: str = "train", store: Any = None,
                 store_factory: Callable[[SegDataset, str], Any] | None = None):
        super().__init__(dataset, seed, split)
        self._store = store
        self._factory = store_factory or build_store

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = self._factory(self.dataset, self.split)
        return self._store

    def stems(self, query: Sample, k: int, draw: int) -> list[str]:
        if k == 0:
            return []
        return self._check(query, retrieve_stems(self.store, query, k), k)


class ShuffledSupports(SupportProvider):
    """Random supports of another task (the ``other`` dataset's label ``other_label``): the shuffle ablation."""

    policy = "shuffled"

    def __init__(self, dataset: SegDataset, seed: int, other: SegDataset, other_label: int, split: str = "train"):
        super().__init__(other, seed, split)
        self.query_dataset, self.other_label = dataset.name, int(other_label)

    def samples(self, query: Sample, k: int, draw: int, cache: dict[str, Sample]) -> list[Sample]:
        cands = self.candidates(self.other_label)
        rng = np.random.default_rng(derive_seed(self.seed, "shuffled_supports", self.query_dataset, query.label_value, draw))
        chosen = [cands[i] for i in rng.permutation(len(cands))[:k]]
        if len(chosen) < k:
            raise ValueError(f"only {len(chosen)} {self.split} items of {self.dataset.name} for shuffled supports; k={k}")
        key = f"shuffled:{self.dataset.name}:{self.other_label}:"
        for s in chosen:
            if key + s not in cache:
                cache[key + s] = self.dataset.sample(s, self.other_label)
        return [cache[key + s] for s in chosen]


def shuffled_provider(datasets: Sequence[SegDataset], i: int, seed: int) -> ShuffledSupports:
    """Supports of another task for the queries of ``datasets[i]``: the next dataset's first label, or the
    next label of the same dataset when it is evaluated alone."""
    ds = datasets[i]
    if len(datasets) > 1:
        other = datasets[(i + 1) % len(datasets)]
        return ShuffledSupports(ds, seed, other, other.tasks()[0].label_value)
    labels = [t.label_value for t in ds.tasks()]
    if len(labels) < 2:
        raise ValueError(f"--supports shuffled needs two datasets, or a dataset with two labels ({ds.name} has one)")
    return _NextLabel(ds, seed, labels)


class _NextLabel(ShuffledSupports):
    """Shuffled supports inside one dataset: the query of label i gets supports of label i + 1."""

    def __init__(self, dataset: SegDataset, seed: int, labels: list[int]):
        super().__init__(dataset, seed, dataset, labels[0])
        self.labels = labels

    def samples(self, query: Sample, k: int, draw: int, cache: dict[str, Sample]) -> list[Sample]:
        self.other_label = self.labels[(self.labels.index(query.label_value) + 1) % len(self.labels)]
        return super().samples(query, k, draw, cache)


def build_store(dataset: SegDataset, split: str, embedder: str | None = None) -> Any:
    """A FAISS support store over ``dataset``'s ``split`` (``embedder``: a spec; None = retrieval's default)."""
    from retrieval.store import SupportStore

    return SupportStore.build([dataset.root], split=split, embedder=embedder)


def retrieve_stems(store: Any, query: Sample, k: int) -> list[str]:
    """Nearest k support stems of ``query`` in ``store``: same dataset and label, other stem and group."""
    hits = store.search(
        query.image,
        k=k,
        dataset=query.dataset,
        label=query.label_value,
        exclude_stems=[query.stem],
        exclude_groups=[query.group],
    )
    stems = []
    for hit in hits:
        stem = hit["stem"] if isinstance(hit, dict) else hit.stem
        if stem not in stems:
            stems.append(stem)
    return stems


# -------------------------------------------------------------------------------------- runner
@dataclass
class Job:
    """One (k, policy, draw) cell of a method on a task."""

    k: int | None  # None: the method takes no supports
    policy: str  # random / retrieved / none / train
    draw: int


def jobs_for(method: Method | type[Method], cfg: SuiteConfig) -> list[Job]:
    """The (k, policy, draw) cells a method (instance or class) is evaluated on (module docstring)."""
    if not method.uses_supports:
        return [Job(None, method.source, d) for d in range(cfg.draws if method.stochastic else 1)]
    jobs = []
    for k in sorted(set(cfg.ks)):
        if k < method.min_k:
            continue
        policies = ["none"] if k == 0 else cfg.supports
        for policy in policies:
            jobs += [Job(k, policy, d) for d in range(cfg.draws)]
    return jobs


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\r", " ").replace("\n", " ")
    return text[:500]


def _check_prediction(prob: Any, unc: Any, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape != mask.shape:
        raise ValueError(f"prediction shape {prob.shape} differs from the mask's stored shape {mask.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("prediction contains NaN or inf")
    if unc is not None:
        unc = np.asarray(unc, dtype=np.float32)
        if unc.shape != mask.shape:
            raise ValueError(f"uncertainty shape {unc.shape} differs from the mask's stored shape {mask.shape}")
        if not np.isfinite(unc).all():
            raise ValueError("uncertainty contains NaN or inf")
    return prob, unc


class Runner:
    """Holds the state of one suite run: datasets, methods, support providers, output rows."""

    def __init__(self, cfg: SuiteConfig, methods: dict[str, Method] | None = None,
                 store_factory: Callable[[SegDataset, str], Any] | None = None):
        cfg.validate(injected=list(methods or {}))
        self.store_factory = store_factory or functools.partial(build_store, embedder=cfg.embedder)
        self.cfg = cfg
        self.threshold = float(cfg.config.get("threshold", 0.5))
        self.nsd_tolerance = float(cfg.config.get("nsd_tolerance", DEFAULT_NSD_TOLERANCE))
        self.nsd_tolerance_mm = float(cfg.config.get("nsd_tolerance_mm", DEFAULT_NSD_TOLERANCE_MM))  # 3D metrics
        qcfg = cfg.config.get("qualitative") or {}
        self.n_qualitative = int(qcfg.get("images_per_dataset", 3))
        self.max_supports_shown = int(qcfg.get("max_supports", 3))
        self.injected = dict(methods or {})
        self.methods: dict[str, Method] = {}
        self.provenance: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.volume_rows: list[dict[str, Any]] = []  # 3D metrics per case of volume datasets (eval/volume_eval.py)
        self.qualitative: list[dict[str, Any]] = []
        self._segicl_ckpt: str | None = None

    # ------------------------------------------------------------------------------ methods
    def method(self, spec: str, dataset: str) -> Method:
        """The method for ``spec`` on ``dataset``: built once and reused (per dataset under LOO)."""
        if spec in self.injected:
            return self.injected[spec]
        kind, _ = parse_spec(spec)
        ckpt = self.cfg.checkpoint
        if kind == "segicl" and self.cfg.checkpoints is not None:
            if dataset not in self.cfg.checkpoints:
                raise ValueError(f"no leave-one-out checkpoint for held-out dataset {dataset}")
            ckpt = self.cfg.checkpoints[dataset]
            if spec in self.methods and self._segicl_ckpt != ckpt:
                self.methods.pop(spec).close()  # one SegICL model in memory at a time
        if spec not in self.methods:
            method, prov = build_method(spec, self.cfg.config, self.cfg.seed, ckpt, self.cfg.steps, self.cfg.samples)
            self.methods[spec] = method
            if kind == "segicl":
                self._segicl_ckpt = ckpt
                prov = {f"{spec}@{dataset}" if self.cfg.checkpoints is not None else spec: v for v in prov.values()}
            self.provenance.update(prov)
        return self.methods[spec]

    def qualitative_spec(self) -> str:
        """The method shown in qualitative.png: SegICL if evaluated, else the first with supports."""
        for spec in self.cfg.methods:
            if spec not in self.injected and parse_spec(spec)[0] == "segicl":
                return spec
        for spec in self.cfg.methods:
            if (self.injected.get(spec) or method_class(spec)).uses_supports:
                return spec
        return self.cfg.methods[0]

    # ---------------------------------------------------------------------------------- run
    def run(self, writer: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Evaluate everything; each row is passed to ``writer`` as soon as it exists."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        datasets = [load_dataset(p) for p in cfg.data]
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets with the same name: {names}")
        plan = []
        for ds in datasets:
            for task in ds.tasks():
                plan.append((ds, task, ds.stems(cfg.split)[: cfg.limit]))
        total = sum(len(stems) * len(self._planned_jobs(spec)) for _, _, stems in plan for spec in cfg.methods)
        bar = tqdm(total=total, desc="evaluate", unit="item", disable=not cfg.progress, dynamic_ncols=True)
        qual_spec = self.qualitative_spec()
        for i, ds in enumerate(datasets):
            providers: dict[str, SupportProvider] = {
                "random": RandomSupports(ds, cfg.seed),
                "retrieved": RetrievedSupports(ds, cfg.seed, store_factory=self.store_factory),
            }
            if "shuffled" in cfg.supports:
                providers["shuffled"] = shuffled_provider(datasets, i, cfg.seed)
            qual_task = ds.tasks()[0].label_value
            for _ds, task, stems in (p for p in plan if p[0] is ds):
                bar.set_postfix_str(f"{ds.name}/{task.label_name}")
                queries = [ds.sample(s, task.label_value) for s in stems]
                support_cache: dict[str, Sample] = {}
                qual_stems = self._qualitative_stems(queries) if task.label_value == qual_task else set()
                for spec in cfg.methods:
                    self._run_method(spec, ds, task, queries, providers, support_cache,
                                     qual_stems if spec == qual_spec else set(), writer, bar)
        bar.close()
        for m in self.methods.values():
            m.close()
        return self.rows

    def _planned_jobs(self, spec: str) -> list[Job]:
        """Jobs of a spec known before its model is built (from the injected method or its class)."""
        return jobs_for(self.injected.get(spec) or method_class(spec), self.cfg)

    def _qualitative_stems(self, queries: list[Sample]) -> set[str]:
        with_fg = [q.stem for q in queries if q.mask.any()]
        rest = [q.stem for q in queries if not q.mask.any()]
        return set((with_fg + rest)[: self.n_qualitative])

    def _run_method(self, spec, ds, task, queries, providers, support_cache, qual_stems, writer, bar) -> None:
        cfg = self.cfg
        text = ds.instruction(task.label_value)
        try:
            method = self.method(spec, ds.name)
            jobs = jobs_for(method, cfg)
            method.prepare(ds, task.label_value, "train")
            setup_error = None
        except Exception as exc:  # noqa: BLE001 - a failing method must not stop the suite
            setup_error = _one_line(exc)
            traceback.print_exc(file=sys.stderr)
            jobs = self._planned_jobs(spec)
        qual_job = self._qualitative_job(jobs)
        for job in jobs:
            if setup_error is None and hasattr(method, "set_support_source") and job.policy in providers:
                provider = providers[job.policy]  # calibration examples (train items) get supports as the queries do
                method.set_support_source(job.policy, lambda item, k, p=provider: p.samples(item, k, 0, support_cache))
            stacker = volume_eval.CaseStacker(
                ds, task.label_name, spec, "" if job.k is None else job.k, job.policy, job.draw,
                [q.stem for q in queries], self.nsd_tolerance_mm) if getattr(ds, "is_volume", False) else None
            for query in queries:
                row = {
                    "dataset": ds.name, "label": task.label_name, "label_value": task.label_value,
                    "stem": query.stem, "method": spec, "k": "" if job.k is None else job.k,
                    "supports": job.policy, "draw": job.draw, "support_stems": "",
                    **{m: math.nan for m in ("dice", "iou", "hd95", "nsd", "seconds")},
                    **dict.fromkeys(UNCERTAINTY_METRICS), "error": "",
                }  # fmt: skip
                prob = unc = pred = None
                supports: list[Sample] = []
                if setup_error is not None:
                    row["error"] = setup_error
                else:
                    try:
                        if job.k:
                            supports = providers[job.policy].samples(query, job.k, job.draw, support_cache)
                            row["support_stems"] = ";".join(s.stem for s in supports)
                        seed = derive_seed(cfg.seed, ds.name, task.label_value, query.stem, job.draw)
                        t0 = time.perf_counter()
                        prob, unc = method.predict(query, supports, text, seed)
                        row["seconds"] = time.perf_counter() - t0
                        prob, unc = _check_prediction(prob, unc, query.mask)
                        pred = prob >= self.threshold
                        row.update(compute_metrics(pred, query.mask, nsd_tolerance=self.nsd_tolerance))
                        row.update(uncertainty_metrics(unc, pred, query.mask))
                    except Exception as exc:  # noqa: BLE001 - recorded in results.csv, the run goes on
                        row["error"] = _one_line(exc)
                        prob = unc = None
                self.rows.append(row)
                if stacker is not None:
                    stacker.add(query.stem, None if row["error"] else pred, query.mask, row["error"])
                if writer is not None:
                    writer(row)
                if query.stem in qual_stems and job == qual_job:
                    self._add_qualitative(spec, ds, task, query, supports, prob, unc, job)
                bar.update(1)
            if stacker is not None:
                self.volume_rows += stacker.finish()

    def _qualitative_job(self, jobs: list[Job]) -> Job | None:
        """The cell shown in qualitative.png: draw 0 at the largest k, under the first listed policy."""
        first = [j for j in jobs if j.draw == 0]
        if not first:
            return None
        k_max = max(j.k or 0 for j in first)
        at_k = [j for j in first if (j.k or 0) == k_max]
        return next((j for j in at_k if j.policy == self.cfg.supports[0]), at_k[0])

    def _add_qualitative(self, spec, ds, task, query, supports, prob, unc, job) -> None:
        k_txt = "" if job.k is None else f" k={job.k} {job.policy}"
        self.qualitative.append({
            "title": f"{ds.name}\n{task.label_name}\n{query.stem}\n{spec}{k_txt}",
            "image": query.image, "supports": [(s.image, s.mask) for s in supports[: self.max_supports_shown]],
            "prob": prob, "uncertainty": unc, "mask": query.mask, "threshold": self.threshold,
        })  # fmt: skip


# ------------------------------------------------------------------------------------ outputs
class _CsvAppender:
    """Writes results.csv row by row (a crashed run keeps what it measured)."""

    def __init__(self, path: Path):
        import csv

        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.fh)
        self.writer.writerow(report.RESULT_COLUMNS)

    def __call__(self, row: dict[str, Any]) -> None:
        self.writer.writerow([report.format_value(row.get(c)) for c in report.RESULT_COLUMNS])
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def hash_dir(path: str | Path) -> str:
    """SHA-256 over a directory's files (relative paths and contents, sorted); of the file for a file."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _checkpoint_hashes(cfg: SuiteConfig) -> dict[str, str | None]:
    ckpts = dict(cfg.checkpoints) if cfg.checkpoints is not None else {"segicl": cfg.checkpoint}
    out: dict[str, str | None] = {}
    for name, ck in ckpts.items():
        out[name] = hash_dir(ck) if ck is not None and Path(ck).exists() else None
    return out


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("segicl", "torch", "monai", "numpy", "scipy", "diffusers", "transformers", "faiss-cpu", "open_clip_torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10)
        out["git_commit"] = commit.stdout.strip() or None
        out["git_dirty"] = str(bool(dirty.stdout.strip())) if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def write_outputs(runner: Runner, wall: float, started: str) -> dict[str, Path]:
    """summary.csv, summary.md, dice_vs_k.png, qualitative.png, loo.* (under LOO), uncertainty.* (when a
    method measured an uncertainty), volumes.csv (3D metrics per case of volume datasets) and run.json."""
    cfg = runner.cfg
    out = Path(cfg.out)
    bcfg = cfg.config.get("bootstrap") or {}
    resamples = int(bcfg.get("resamples", 2000))
    confidence = float(bcfg.get("confidence", 0.95))
    summary = report.summarize(runner.rows, resamples, confidence, int(bcfg.get("seed", 0)))
    paths = {"results": out / "results.csv", "summary": report.write_csv(summary, out / "summary.csv", report.SUMMARY_COLUMNS)}
    md = [f"# SegICL evaluation ({cfg.split} split)\n", f"`{cfg.command}`\n" if cfg.command else "",
          "## Dice per dataset (mean over labels)\n", report.dataset_markdown(summary),
          "\n## Per label: mean ± std [bootstrap interval]\n",
          report.markdown_table(summary, runner.nsd_tolerance, confidence)]
    if cfg.checkpoints is not None:
        loo = report.loo_summary(summary)
        paths["loo"] = report.write_csv(loo, out / "loo.csv", report.LOO_COLUMNS)
        md += ["\n## Leave-one-dataset-out: mean Dice over held-out datasets\n", report.loo_markdown(loo)]
    uncertainty = report.uncertainty_summary(runner.rows)
    if uncertainty:
        paths["uncertainty"] = report.write_csv(uncertainty, out / "uncertainty.csv", report.UNCERTAINTY_COLUMNS)
        paths["uncertainty_png"] = report.plot_uncertainty(report.uncertainty_points(runner.rows),
                                                           out / "uncertainty.png")
        md += ["\n## Uncertainty: does it flag the bad images and the wrong pixels?\n",
               report.uncertainty_markdown(uncertainty)]
    if runner.volume_rows:
        paths["volumes"] = report.write_csv(runner.volume_rows, out / "volumes.csv", volume_eval.VOLUME_COLUMNS)
        md += ["\n## 3D per case (volume datasets): Dice, HD95 and NSD in mm\n",
               volume_eval.volume_markdown(volume_eval.volume_summary(runner.volume_rows), runner.nsd_tolerance_mm)]
    paths["summary_md"] = out / "summary.md"
    paths["summary_md"].write_text("\n".join(x for x in md if x), encoding="utf-8")
    if summary:
        paths["dice_vs_k"] = report.plot_dice_vs_k(summary, out / "dice_vs_k.png")
    if runner.qualitative:
        paths["qualitative"] = report.plot_qualitative(runner.qualitative, out / "qualitative.png", runner.max_supports_shown)
    cfg_json = {k: v for k, v in asdict(cfg).items() if k not in ("config", "out", "data")}
    run = {
        "command": cfg.command,
        "argv": sys.argv,
        "started": started,
        "wall_seconds": wall,
        "seed": cfg.seed,
        "settings": {**cfg_json, "data": [str(p) for p in cfg.data], "out": str(cfg.out)},
        "eval_config": cfg.config,
        "checkpoint_sha256": _checkpoint_hashes(cfg),
        "methods": runner.provenance,
        "calibration": {spec: {f"{d}/{lab}/k{k}/{pol}": dec.to_dict() for (d, lab, k, pol), dec in m.decisions.items()}
                        for spec, m in runner.methods.items() if getattr(m, "decisions", None)},
        "training": {spec: m.training_log for spec, m in runner.methods.items() if getattr(m, "training_log", None)},
        "versions": _versions(),
        "rows": len(runner.rows),
        "errors": sum(1 for r in runner.rows if r["error"]),
        **({"volume_rows": len(runner.volume_rows)} if runner.volume_rows else {}),
    }
    paths["run"] = out / "run.json"
    paths["run"].write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")
    return paths


def run_suite(cfg: SuiteConfig, methods: dict[str, Method] | None = None,
              store_factory: Callable[[SegDataset, str], Any] | None = None) -> dict[str, Path]:
    """Run the suite and write every output file into ``cfg.out``.

    Args:
        cfg: the run settings.
        methods: ready-made methods by spec (tests inject them); the others are built from specs.
        store_factory: builds the support store of a dataset's train split for ``retrieved``
            (default: :func:`build_store`).

    Returns:
        The written files by name (results, summary, summary_md, dice_vs_k, qualitative, run, loo,
        uncertainty, uncertainty_png, volumes).
    """
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    runner = Runner(cfg, methods, store_factory)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    appender = _CsvAppender(Path(cfg.out) / "results.csv")
    try:
        runner.run(appender)
    finally:
        appender.close()
    return write_outputs(runner, time.perf_counter() - t0, started)


# ------------------------------------------------------------------------ leave-one-dataset-out
LOO_JSON_FILES = ("config.json", "train_config.json", "training.json", "run.json", "train_args.json")


def find_loo_checkpoint(checkpoints: str | Path, dataset: str) -> Path:
    """The checkpoint trained without ``dataset`` under ``checkpoints``.

    Looks for a sub-folder named ``<dataset>``, ``without_<dataset>``, ``loo_<dataset>`` or
    ``exclude_<dataset>``, else a sub-folder whose config/run JSON records ``"exclude"`` equal to
    exactly ``[dataset]`` (what ``segicl train --exclude <dataset>`` writes).

    Raises:
        FileNotFoundError: none, or more than one, matches.
    """
    root = Path(checkpoints)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoints folder not found")
    for name in (dataset, f"without_{dataset}", f"loo_{dataset}", f"exclude_{dataset}"):
        if (root / name).is_dir():
            return root / name
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for fname in LOO_JSON_FILES:
            f = sub / fname
            if not f.is_file():
                continue
            try:
                meta = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            excl = _find_exclude(meta)
            if excl is not None and sorted(excl) == [dataset]:
                found.append(sub)
                break
    if len(found) != 1:
        what = "no checkpoint" if not found else f"{len(found)} checkpoints ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{root}: {what} trained without {dataset} (expected a sub-folder {dataset}/ "
                                f"or one whose JSON config records exclude: [{dataset}])")
    return found[0]


def _find_exclude(meta: Any) -> list[str] | None:
    """The ``exclude`` list anywhere in a nested JSON object (top level first)."""
    if isinstance(meta, dict):
        if "exclude" in meta and isinstance(meta["exclude"], list | str):
            v = meta["exclude"]
            return [v] if isinstance(v, str) else [str(x) for x in v]
        for v in meta.values():
            r = _find_exclude(v)
            if r is not None:
                return r
    return None


def loo_checkpoints(cfg: SuiteConfig, checkpoints: str | Path) -> dict[str, str]:
    """Dataset name -> held-out checkpoint for every dataset of ``cfg.data``."""
    out = {}
    for p in cfg.data:
        name = load_dataset(p).name
        out[name] = str(find_loo_checkpoint(checkpoints, name))
    return out
