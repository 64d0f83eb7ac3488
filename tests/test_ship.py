"""training.ship: a trained pipeline shipped with its provenance; re-shipped with new settings."""

from __future__ import annotations

import json

import pytest

from segicl.pipeline import SegICLPipeline
from training.ship import main


def test_ship_records_runs_and_a_reship_keeps_them_and_the_weights(tmp_path):
    model = SegICLPipeline.from_preset("tiny").save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,loss,val/dice\n10,0.5,\n20,0.4,0.7\n")
    out = tmp_path / "shipped"
    assert main(["--model", str(model), "--out", str(out), "--runs", str(run), "--note", "first"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["training"][0]["last_step"] == 20 and first["training"][0]["last_val"] == {"val/dice": 0.7}
    assert SegICLPipeline.from_pretrained(out).config.matching.mode == "none"

    assert main(["--model", str(out), "--out", str(out), "--matching", "route", "--note", "eval: better"]) == 0
    second = json.loads((out / "manifest.json").read_text())
    assert second["training"] == first["training"] and second["note"] == "first"
    assert second["revisions"][-1]["matching.mode"] == "route" and second["revisions"][-1]["note"] == "eval: better"
    for f, digest in first["files"].items():  # same weights; only the config changed
        assert (second["files"][f] == digest) == (f != "config.json"), f
    assert SegICLPipeline.from_pretrained(out).config.matching.mode == "route"
    with pytest.raises(SystemExit):
        main(["--model", str(out), "--out", str(tmp_path / "x")])  # neither runs nor new settings
