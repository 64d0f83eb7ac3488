"""The evaluation suite end to end on a few real images with tiny models (CPU, seconds).

One module-scoped run evaluates a tiny random VLSM, both MONAI U-Nets, an in-context stand-in that
uses its supports and seed, and a method that always fails, on kvasir_seg (1 label) and
wbc_blood_smear (2 labels); the tests then read its files.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import report
from eval.methods import Method, derive_seed
from eval.suite import SuiteConfig, jobs_for, load_eval_config, run_suite
from segicl import CONFIGS_DIR
from segicl.data import Sample, load_dataset
from segicl.data.transforms import resize_prob

DATASETS = ("kvasir_seg", "wbc_blood_smear")
LIMIT = 2
KS = [0, 1, 2]
DRAWS = 2


class MeanSupportMask(Method):
    """In-context stand-in: the mean of the support masks (resized), jittered by the seed."""

    name = "mean_support"
    uses_supports = True
    stochastic = True

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        h, w = query.mask.shape
        if supports:
            prob = np.mean([resize_prob(s.mask.astype(np.float32), (h, w)) for s in supports], axis=0)
        else:
            prob = np.full((h, w), 0.4, dtype=np.float32)
        prob = np.clip(prob + np.random.default_rng(seed).normal(0, 0.05, prob.shape), 0, 1).astype(np.float32)
        return prob, prob * (1 - prob)


class Broken(Method):
    """Fails on every second image (by stem parity), like a model that crashes on some inputs."""

    name = "broken"

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        if int(derive_seed(query.stem)) % 2 == 0:
            raise RuntimeError("simulated failure\non two lines")
        return np.zeros(query.mask.shape, dtype=np.float32), None


class FakeStore:
    """Support store stand-in for ``retrieved``: train items in a fixed order per query."""

    def __init__(self, ds, split):
        self.ds = ds
        self.stems = ds.stems(split)

    def search(self, image, k, dataset, label, exclude_stems, exclude_groups):
        order = sorted(self.stems, key=lambda s: derive_seed(s, image.size))
        keep = [s for s in order if s not in exclude_stems and self.ds.group(s) not in exclude_groups
                and label in self.ds.labels_present(s)]
        return [{"stem": s, "score": 1.0} for s in keep[:k]]


@pytest.fixture(scope="module")
def vlsm_dir(tmp_path_factory) -> Path:
    vlsm = pytest.importorskip("segicl.vlsm")
    model = vlsm.build_vlsm("clipseg", "zero_shot", CONFIGS_DIR / "vlsm" / "clipseg_tiny.yaml")
    return model.save_pretrained(tmp_path_factory.mktemp("vlsm") / "clipseg_tiny")


def _config(shared_data: Path, out: Path, methods: list[str], **kw) -> SuiteConfig:
    return SuiteConfig(
        data=[shared_data / d for d in DATASETS], out=out, methods=methods, ks=KS,
        supports=kw.pop("supports", ["random", "retrieved"]), draws=DRAWS, seed=kw.pop("seed", 7), limit=LIMIT,
        config=load_eval_config(CONFIGS_DIR / "eval" / "tiny.yaml"), progress=False, **kw,
    )  # fmt: skip


def _injected() -> dict[str, Method]:
    return {"mean_support": MeanSupportMask(), "broken": Broken()}


@pytest.fixture(scope="module")
def run(shared_data: Path, vlsm_dir: Path, tmp_path_factory) -> tuple[SuiteConfig, dict[str, Path]]:
    out = tmp_path_factory.mktemp("eval_run")
    methods = [f"vlsm:{vlsm_dir}", "unet_supervised", "unet_fewshot", "mean_support", "broken"]
    cfg = _config(shared_data, out, methods)
    return cfg, run_suite(cfg, _injected(), store_factory=FakeStore)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_every_output_file_with_documented_columns(run) -> None:
    cfg, paths = run
    for name in ("results.csv", "summary.csv", "summary.md", "dice_vs_k.png", "qualitative.png", "run.json"):
        assert (cfg.out / name).is_file(), name
    cols, rows = _read(cfg.out / "results.csv")
    assert cols == report.RESULT_COLUMNS
    scols, summary = _read(cfg.out / "summary.csv")
    assert scols == report.SUMMARY_COLUMNS
    md = (cfg.out / "summary.md").read_text()
    for spec in cfg.methods:
        assert f"| {spec} |" in md
    for png in ("dice_vs_k.png", "qualitative.png"):
        with Image.open(cfg.out / png) as im:
            assert im.width > 300 and im.height > 200
    meta = json.loads((cfg.out / "run.json").read_text())
    for key in ("command", "versions", "checkpoint_sha256", "seed", "wall_seconds", "eval_config", "methods"):
        assert key in meta
    assert meta["seed"] == 7 and meta["wall_seconds"] > 0 and meta["versions"]["torch"]
    assert meta["rows"] == len(rows)


def test_one_row_per_cell(run, shared_data: Path) -> None:
    cfg, _ = run
    _, rows = _read(cfg.out / "results.csv")
    n_tasks = sum(len(load_dataset(shared_data / d).tasks()) for d in DATASETS)  # kvasir 1 + wbc 2
    injected = _injected()
    per_task = 0
    for spec in cfg.methods:
        from eval.methods import method_class

        per_task += len(jobs_for(injected.get(spec) or method_class(spec), cfg)) * LIMIT
    assert len(rows) == n_tasks * per_task
    keys = {(r["dataset"], r["label"], r["stem"], r["method"], r["k"], r["supports"], r["draw"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["label"] for r in rows if r["dataset"] == "wbc_blood_smear"} == {"cytoplasm", "nucleus"}
    fewshot = {(r["k"], r["supports"]) for r in rows if r["method"] == "unet_fewshot"}
    assert fewshot == {("1", "random"), ("2", "random"), ("1", "retrieved"), ("2", "retrieved")}  # no k = 0
    assert {r["supports"] for r in rows if r["method"] == "unet_supervised"} == {"train"}
    assert {(r["k"], r["supports"]) for r in rows if r["method"] == "mean_support" and r["k"] == "0"} == {("0", "none")}


def test_supports_come_from_train_split_outside_the_query_group(run, shared_data: Path) -> None:
    cfg, _ = run
    _, rows = _read(cfg.out / "results.csv")
    datasets = {d: load_dataset(shared_data / d) for d in DATASETS}
    by_draw: dict[tuple, dict[int, list[str]]] = {}
    for r in rows:
        if not r["support_stems"]:
            assert r["k"] in ("", "0")
            continue
        ds = datasets[r["dataset"]]
        stems = r["support_stems"].split(";")
        assert len(stems) == int(r["k"])
        for s in stems:
            assert ds.split_of(s) == "train"
            assert ds.group(s) != ds.group(r["stem"])
            assert ds.labels[int(r["label_value"])] == r["label"]
            assert int(r["label_value"]) in ds.labels_present(s)  # supports show the structure
        if r["supports"] == "random":
            by_draw.setdefault((r["dataset"], r["label"], r["stem"], r["method"], r["draw"]), {})[int(r["k"])] = stems
    for sets in by_draw.values():  # random sets are nested across k
        assert sets[2][:1] == sets[1]
    # different draws give different random supports; the same draw is shared by the methods
    a = {(r["stem"], r["draw"], r["k"]): r["support_stems"] for r in rows if r["method"] == "unet_fewshot" and r["supports"] == "random"}
    b = {(r["stem"], r["draw"], r["k"]): r["support_stems"] for r in rows if r["method"] == "mean_support" and r["supports"] == "random"}
    assert a == b
    assert any(a[(s, "0", k)] != a[(s, "1", k)] for (s, _, k) in a)


def test_failing_method_records_error_and_run_goes_on(run) -> None:
    cfg, _ = run
    _, rows = _read(cfg.out / "results.csv")
    broken = [r for r in rows if r["method"] == "broken"]
    failed = [r for r in broken if r["error"]]
    assert failed and len(failed) < len(broken)
    for r in failed:
        assert r["error"] == "RuntimeError: simulated failure on two lines"
        assert all(r[m] == "nan" for m in ("dice", "iou", "hd95", "nsd"))
    ok = [r for r in rows if r["method"] != "broken"]
    assert ok and not any(r["error"] for r in ok)
    assert all(0.0 <= float(r["dice"]) <= 1.0 and float(r["seconds"]) >= 0 for r in ok)
    _, summary = _read(cfg.out / "summary.csv")
    errors = {(s["dataset"], s["label"]): int(s["errors"]) for s in summary if s["method"] == "broken"}
    assert sum(errors.values()) == len(failed)


def test_summary_interval_contains_mean(run) -> None:
    cfg, _ = run
    _, summary = _read(cfg.out / "summary.csv")
    checked = 0
    for s in summary:
        for m in ("dice", "iou", "hd95", "nsd"):
            mean, lo, hi = (float(s[f"{m}_{x}"]) for x in ("mean", "ci_low", "ci_high"))
            if math.isfinite(mean):
                assert lo <= mean <= hi
                checked += 1
        assert int(s["n"]) <= LIMIT
    assert checked > 40


def test_same_seed_same_results(run, shared_data: Path, vlsm_dir: Path, tmp_path: Path) -> None:
    """A second run with the same seed reproduces results.csv (all but the timing column)."""
    cfg, _ = run
    again = _config(shared_data, tmp_path / "again", list(cfg.methods))
    run_suite(again, _injected(), store_factory=FakeStore)

    def strip(path: Path) -> list[list[str]]:
        with open(path, newline="") as fh:
            return [row[:-2] + row[-1:] for row in csv.reader(fh)]  # drop "seconds"

    assert report.RESULT_COLUMNS[-2] == "seconds"
    assert strip(cfg.out / "results.csv") == strip(tmp_path / "again" / "results.csv")
    assert (cfg.out / "summary.csv").read_text().count("\n") == (tmp_path / "again" / "summary.csv").read_text().count("\n")


def test_uncertainty_columns_only_for_methods_that_measure_it(run) -> None:
    """mean_support returns p(1-p); the VLSM, the U-Nets and broken return none: their cells stay empty."""
    cfg, paths = run
    _, rows = _read(cfg.out / "results.csv")
    for r in rows:
        measured = r["method"] == "mean_support"
        assert (r["unc_mean"] != "") == measured and (r["unc_auroc"] != "") == measured, r
        if measured and r["unc_mean"] != "nan":
            assert 0.0 <= float(r["unc_mean"]) <= 0.25
    cols, unc = _read(paths["uncertainty"])
    assert cols == report.UNCERTAINTY_COLUMNS
    assert {u["method"] for u in unc} == {"mean_support"}
    assert len(unc) == len(DATASETS) * (1 + (len(KS) - 1) * 2)  # k = 0 (none) + k in {1, 2} x 2 policies
    assert "## Uncertainty" in (cfg.out / "summary.md").read_text()
    assert paths["uncertainty_png"].is_file()


# ------------------------------------------------------------------ uncertainty against the truth
def _corrupted(query: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth with a per-image share (2-40 %) of pixels flipped, and where they were flipped.

    Test oracles read the query mask (a real method must not): the error share differs by image, so
    the images' Dice differ and an uncertainty can be tested against the truth.
    """
    rate = 0.02 + 0.38 * (derive_seed("rate", query.stem, query.label_value) % 1000) / 1000
    rng = np.random.default_rng(derive_seed("flips", query.stem, query.label_value))
    wrong = rng.random(query.mask.shape) < rate
    return (query.mask ^ wrong).astype(np.float32), wrong


class ErrorAware(Method):
    """Uncertainty high (0.6-1) exactly on its wrong pixels and low (0-0.3) on the right ones."""

    name = "error_aware"

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        prob, wrong = _corrupted(query)
        u = np.random.default_rng(seed).random(prob.shape)
        return prob, np.where(wrong, 0.6 + 0.4 * u, 0.3 * u).astype(np.float32)


class RandomUncertainty(Method):
    """The same predictions as ErrorAware, with uncertainty unrelated to the errors."""

    name = "random_unc"

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        prob, _ = _corrupted(query)
        return prob, np.random.default_rng(seed).random(prob.shape).astype(np.float32)


class ZeroUncertainty(Method):
    """Like SegICL with num_samples=1: a map of zeros (the std of one sample)."""

    name = "zero_unc"

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        prob, _ = _corrupted(query)
        return prob, np.zeros_like(prob)


class NoUncertainty(Method):
    """No uncertainty at all (like the VLSM and U-Net baselines)."""

    name = "no_unc"

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int):
        return _corrupted(query)[0], None


UNC_METHODS = {"error_aware": ErrorAware(), "random_unc": RandomUncertainty(), "zero_unc": ZeroUncertainty(),
               "no_unc": NoUncertainty()}  # fmt: skip


def _unc_config(shared_data: Path, out: Path, methods: list[str], limit: int) -> SuiteConfig:
    return SuiteConfig(data=[shared_data / d for d in DATASETS], out=out, methods=methods, ks=[0], limit=limit,
                       config=load_eval_config(CONFIGS_DIR / "eval" / "tiny.yaml"), progress=False)


@pytest.fixture(scope="module")
def unc_run(shared_data: Path, tmp_path_factory) -> tuple[SuiteConfig, dict[str, Path]]:
    cfg = _unc_config(shared_data, tmp_path_factory.mktemp("eval_unc"), list(UNC_METHODS), limit=6)
    return cfg, run_suite(cfg, UNC_METHODS)


def test_uncertainty_on_the_wrong_pixels_ranks_pixels_and_images(unc_run) -> None:
    cfg, paths = unc_run
    _, rows = _read(cfg.out / "results.csv")
    aware = [r for r in rows if r["method"] == "error_aware"]
    assert len(aware) == 6 * 3  # kvasir (1 label) + wbc (2 labels), 6 images each, one draw
    assert all(float(r["unc_auroc"]) == 1.0 for r in aware)  # every error above every correct pixel
    assert len({r["dice"] for r in aware}) > 10  # the images differ in quality
    _, unc = _read(paths["uncertainty"])
    by = {(u["dataset"], u["method"]): u for u in unc}
    assert set(by) == {(d, m) for d in DATASETS for m in ("error_aware", "random_unc")}  # zero/no: no row
    for d in DATASETS:
        u = by[(d, "error_aware")]
        assert int(u["n"]) == (6 if d == "kvasir_seg" else 12) and int(u["n_tail"]) == 1
        assert float(u["dice_gap"]) > 0.1  # the least uncertain images are segmented better
        assert float(u["dice_least_uncertain"]) > float(u["dice_most_uncertain"])
        assert float(u["spearman_rho"]) < -0.8
        assert float(u["unc_auroc_mean"]) == 1.0
    md = (cfg.out / "summary.md").read_text()
    assert "## Uncertainty" in md and "| error_aware |" in md.split("## Uncertainty")[1]


def test_random_uncertainty_is_at_chance(unc_run) -> None:
    cfg, paths = unc_run
    _, rows = _read(cfg.out / "results.csv")
    aurocs = [float(r["unc_auroc"]) for r in rows if r["method"] == "random_unc"]
    assert len(aurocs) == 18 and all(0.45 < a < 0.55 for a in aurocs)
    _, unc = _read(paths["uncertainty"])
    for u in unc:
        if u["method"] == "random_unc":
            assert abs(float(u["unc_auroc_mean"]) - 0.5) < 0.02


def test_zero_or_no_uncertainty_leaves_columns_empty_and_no_section(unc_run, shared_data: Path, tmp_path: Path) -> None:
    cfg, _ = unc_run
    _, rows = _read(cfg.out / "results.csv")
    for r in rows:
        if r["method"] in ("zero_unc", "no_unc"):
            assert r["unc_mean"] == "" and r["unc_auroc"] == "" and not r["error"]
            assert float(r["dice"]) < 1.0  # evaluated as usual
    alone = _unc_config(shared_data, tmp_path / "alone", ["zero_unc", "no_unc"], limit=2)
    paths = run_suite(alone, UNC_METHODS)
    assert "uncertainty" not in paths and "uncertainty_png" not in paths
    assert not (alone.out / "uncertainty.csv").exists() and not (alone.out / "uncertainty.png").exists()
    assert "Uncertainty" not in (alone.out / "summary.md").read_text()
    cols, rows = _read(alone.out / "results.csv")
    assert cols == report.RESULT_COLUMNS and rows
    assert all(r["unc_mean"] == "" and r["unc_auroc"] == "" for r in rows)


def test_shuffled_supports_come_from_another_task(shared_data: Path, tmp_path: Path) -> None:
    """The shuffle ablation: kvasir queries get wbc supports (the next dataset), and vice versa; a method
    that reads its supports answers differently than with its own."""
    cfg = _config(shared_data, tmp_path, ["mean_support"], supports=["random", "shuffled"])
    run_suite(cfg, _injected())
    _, rows = _read(tmp_path / "results.csv")
    kvasir, wbc = (load_dataset(shared_data / d) for d in DATASETS)
    wbc_train, kvasir_train = set(wbc.stems("train")), set(kvasir.stems("train"))
    shuffled = [r for r in rows if r["supports"] == "shuffled"]
    assert shuffled and not any(r["error"] for r in shuffled)
    for r in shuffled:
        other = wbc_train if r["dataset"] == "kvasir_seg" else kvasir_train
        assert all(s in other for s in r["support_stems"].split(";"))
    own = {(r["dataset"], r["label"], r["stem"], r["k"]): float(r["dice"]) for r in rows if r["supports"] == "random"}
    assert any(abs(own[(r["dataset"], r["label"], r["stem"], r["k"])] - float(r["dice"])) > 1e-3 for r in shuffled)
