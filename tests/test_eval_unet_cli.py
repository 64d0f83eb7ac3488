"""MONAI U-Net references and the ``segicl evaluate`` command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from eval import cli
from eval.methods import UNetFewShot, build_method, parse_spec
from eval.metrics import dice
from eval.unet import UNetConfig, train_unet
from segicl import CONFIGS_DIR
from segicl.data import load_dataset

TINY = {"size": 32, "channels": [8, 16], "strides": [2], "num_res_units": 0, "batch_size": 2}


def test_unet_config_validation() -> None:
    assert UNetConfig.from_dict({"channels": [4, 8, 16], "strides": [2, 2]}).channels == (4, 8, 16)
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match="strides"):
        UNetConfig.from_dict({"channels": [4, 8], "strides": [2, 2]})
    with pytest.raises(ValueError, match="at least one"):
        train_unet([], UNetConfig.from_dict(TINY), seed=0)


def test_unet_overfits_one_image_deterministically(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "kvasir_seg")
    sample = ds.sample(ds.stems("train")[0], 255)
    cfg = UNetConfig.from_dict({**TINY, "steps": 60, "lr": 1e-2, "hflip": False})
    model = train_unet([sample], cfg, seed=3)
    prob = model.predict(sample.image)
    assert prob.shape == sample.mask.shape and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    assert model.losses[-1] < model.losses[0] * 0.6
    assert dice(prob >= 0.5, sample.mask) > 0.6  # it learned its one example (at 32 px, resized back)
    again = train_unet([sample], cfg, seed=3).predict(sample.image)
    assert np.array_equal(prob, again)


def test_fewshot_unet_caches_by_support_set(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "hc18_fetal_head_us")
    train = [ds.sample(s, 255) for s in ds.stems("train")[:3]]
    query = ds.sample(ds.stems("test")[0], 255)
    method = UNetFewShot(UNetConfig.from_dict({**TINY, "steps": 2}), seed=0, cache_size=1)
    p1, unc = method.predict(query, train[:2], "text", seed=1)
    assert unc is None and len(method.cache) == 1
    p2, _ = method.predict(query, train[:2], "text", seed=99)  # same set: cached model, seed-free
    assert np.array_equal(p1, p2)
    method.predict(query, train[1:], "text", seed=1)
    assert len(method.cache) == 1  # LRU bound
    with pytest.raises(ValueError, match="at least one support"):
        method.predict(query, [], "text", seed=0)


def test_method_specs() -> None:
    assert parse_spec("vlsm:runs/a:b") == ("vlsm", "runs/a:b")
    assert parse_spec(" unet_fewshot ") == ("unet_fewshot", None)
    for bad, msg in (("vlsm", "saved model directory"), ("unet", "unknown method"), ("unet_fewshot:x", "no argument")):
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)
    with pytest.raises(FileNotFoundError, match="VLSM model directory"):
        build_method("vlsm:/no/such/dir", {})


def test_cli_runs_and_writes_outputs(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    args = cli.parse_args([
        "--data", str(shared_data / "busbra_breast_us"), "--methods", "unet_fewshot", "--k", "0,1",
        "--limit", "2", "--seed", "3", "--config", str(CONFIGS_DIR / "eval" / "tiny.yaml"), "--no-progress",
        "--out", str(out),
    ])  # fmt: skip
    assert cli.main(args) == 0
    assert "summary_md" in capsys.readouterr().out
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {r["k"] for r in rows} == {"1"}  # k = 0 is skipped for the few-shot U-Net
    meta = json.loads((out / "run.json").read_text())
    assert meta["command"].startswith("segicl evaluate --data") and "--seed 3" in meta["command"]
    assert meta["eval_config"]["unet_fewshot"]["steps"] == 3


def test_cli_rejects_bad_options(shared_data: Path, tmp_path: Path) -> None:
    base = ["--data", str(shared_data / "hc18_fetal_head_us"), "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, msg in (
        (["--loo"], "--loo needs --checkpoints"),
        (["--methods", "nonsense"], "unknown method"),
        (["--supports", "nearest"], "unknown support policies"),
        (["--split", "train"], "supports come from the train split"),
        (["--loo", "--checkpoints", str(tmp_path)], "no checkpoint trained without hc18_fetal_head_us"),
    ):
        with pytest.raises(SystemExit, match=msg):
            cli.main(cli.parse_args(base + extra))
    with pytest.raises(SystemExit):
        cli.parse_args(base + ["--k", "one"])
