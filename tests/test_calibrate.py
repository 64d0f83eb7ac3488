"""segicl/calibrate.py: a task's path chosen on its own labelled examples, leave-one-out."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from segicl import calibrate
from segicl.config import SegICLConfig
from tests.conftest import REPO

TRUTH = np.zeros((8, 8), bool)
TRUTH[2:6, 2:6] = True


class FakePipe:
    """Segments perfectly without the blend, half the object with it, nothing zero-shot; records its calls."""

    def __init__(self):
        self.config = SegICLConfig()
        self.calls = []

    def __call__(self, images, text, supports, generator=None, **kwargs):
        self.calls.append((self.config.fine.blend, [len(s) for s in supports]))
        if not any(supports):
            masks = [np.zeros_like(TRUTH) for _ in images]
        elif self.config.fine.blend == 0:
            masks = [TRUTH.copy() for _ in images]
        else:
            masks = [np.pad(TRUTH[:, :4], ((0, 0), (0, 4))) for _ in images]
        return SimpleNamespace(masks=masks)


def _examples(n=3):
    return [(f"img{i}", TRUTH, [("s", TRUTH), ("t", TRUTH)]) for i in range(n)]


def test_choose_switches_only_with_evidence_and_restores_the_config():
    pipe = FakePipe()
    d = calibrate.choose(pipe, _examples(), "seg")
    assert d.path == "no_blend" and d.n == 3
    assert d.dice == pytest.approx({"default": 2 * 8 / (8 + 16), "no_blend": 1.0, "zero_shot": 0.0})
    assert pipe.config.fine.blend == SegICLConfig().fine.blend  # restored after the candidate ran
    assert sorted(pipe.calls) == sorted([(0.5, [2, 2, 2]), (0.0, [2, 2, 2]), (0.5, [0, 0, 0])])
    # a candidate that wins by less than the margin does not replace the default
    assert calibrate.choose(FakePipe(), _examples(), margin=0.5).path == "default"
    assert calibrate.choose(FakePipe(), []).path == "default"  # nothing to decide on
    with pytest.raises(ValueError, match="include 'default'"):
        calibrate.choose(FakePipe(), _examples(), candidates=["no_blend"])


def test_config_validates_calibration():
    cfg = SegICLConfig().to_dict()
    cfg["calibration"] = {"mode": "sometimes"}
    with pytest.raises(ValueError, match="calibration.mode"):
        SegICLConfig.from_dict(cfg).validate()
    cfg["calibration"] = {"mode": "auto", "candidates": ["default", "nonsense"]}
    with pytest.raises(ValueError, match="calibration.candidates"):
        SegICLConfig.from_dict(cfg).validate()


def test_evaluate_calibrates_each_task_on_train_items_and_records_it(tmp_path):
    """The real pipeline: decided once per task and k, written to run.json, never on the evaluated split."""
    from segicl.cli import main

    out = tmp_path / "eval"
    demo = REPO / "segicl" / "assets" / "demo" / "hc18_fetal_head_us"
    assert main(["evaluate", "--data", str(demo), "--methods", "segicl", "--k", "0,2", "--supports", "random",
                 "--limit", "2", "--steps", "2", "--calibration", "auto", "--no-progress", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    (key, dec), = run["calibration"]["segicl"].items()  # k = 0 has nothing to calibrate
    assert key == "hc18_fetal_head_us/255/k2/random" and dec["n"] == SegICLConfig().calibration.examples
    assert set(dec["dice"]) == {"default", "no_blend", "zero_shot"} and dec["path"] in dec["dice"]
    assert all(0 <= v <= 1 for v in dec["dice"].values()) and "calibration.mode = auto" in run["methods"]["segicl"]
