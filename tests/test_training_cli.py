"""``segicl train``: the vlsm stage end to end on the shipped demo data (a model load_vlsm reads),
config overrides, resume through the CLI, clear errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from segicl.cli import main as segicl_main
from tests.conftest import REPO
from training import cli

torch.set_num_threads(1)
DEMO = REPO / "segicl" / "assets" / "demo"
CLIPSEG = REPO / "configs" / "vlsm" / "clipseg_tiny.yaml"


def test_train_vlsm_end_to_end_writes_a_loadable_model(tmp_path, monkeypatch):
    from segicl.vlsm import load_vlsm

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    argv = ["train", "vlsm", "--config", str(CLIPSEG), "--max-steps", "5", "--data", "segicl/assets/demo",
            "--out", str(out), "--no-progress", "--set", "train.batch_size=4", "--set", "train.log_every=1"]
    assert segicl_main(argv) == 0
    model = load_vlsm(out / "model")
    assert model.mode == "e2e" and model.image_size == 64
    prob = model.predict([__import__("PIL.Image", fromlist=["Image"]).new("RGB", (80, 60))], ["polyp"])[0]
    assert prob.shape == (60, 80)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and all(float(r["loss"]) > 0 for r in rows)
    saved = (out / "config.yaml").read_text()
    assert "batch_size: 4" in saved and "mode: e2e" in saved
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000005"]
    # resume to 7 steps: continues at 5, keeps the log
    assert segicl_main(argv[:5] + ["7"] + argv[6:] + ["--resume"]) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6, 7]


def test_overrides_and_defaults(tmp_path):
    args = cli.parse_args(["vlsm", "--config", str(CLIPSEG), "--data", str(DEMO), "--mode", "coop",
                           "--exclude", "hc18_fetal_head_us,busbra_breast_us", "--max-steps", "9",
                           "--set", "train.lr=3e-4", "--set", "data.augment={hflip: 0.0}", "--set", "new.key=[1, 2]"])
    config, dirs, exclude, out = cli.resolve(args)
    assert config["mode"] == "coop" and config["model"] == "clipseg"
    assert config["train"]["lr"] == 3e-4 and config["data"]["augment"] == {"hflip": 0.0} and config["new"]["key"] == [1, 2]
    assert config["train"]["max_steps"] == config["train"]["steps"] == 9 and "max_epochs" not in config["train"]
    assert exclude == ["hc18_fetal_head_us", "busbra_breast_us"] and dirs == [DEMO]
    assert out.as_posix() == "runs/vlsm/clipseg_tiny-clipseg-coop"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.apply_overrides({}, ["oops"])
    if not Path("../shared/data").is_dir():  # the config's default data.root, relative to the working directory
        pytest.skip("../shared/data not found beside the working directory (the config's default data.root)")
    args = cli.parse_args(["stage1", "--config", str(REPO / "configs" / "train" / "tiny_stage1.yaml")])
    config, dirs, exclude, out = cli.resolve(args)
    assert dirs[0].as_posix() == "../shared/data" or dirs[0].name == "data"
    assert config["model"]["preset"] == "tiny" and config["train"]["seed"] == 0 and exclude == []


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="not found"):
        cli.resolve(cli.parse_args(["vlsm", "--config", str(CLIPSEG), "--data", str(tmp_path / "nope")]))
    with pytest.raises(SystemExit, match="no data"):
        cli.resolve(cli.parse_args(["vlsm", "--config", str(CLIPSEG)]))
    monkeypatch.setitem(sys.modules, "training.stage1", None)  # as if stage1.py were missing
    with pytest.raises(SystemExit, match="training.stage1 is not available"):
        cli.build_task("stage1", {}, [DEMO], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"model": "clipseg", "train": {"batch_size": 2}}))
    with pytest.raises(ValueError, match="steps"):
        cli.main(cli.parse_args(["vlsm", "--config", str(bad), "--data", str(DEMO), "--out", str(tmp_path / "o")]))
