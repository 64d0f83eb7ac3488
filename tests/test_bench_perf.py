"""`segicl benchmark perf --quick` on the shipped demo sample with tiny sizes: every section is written
and every figure is positive and finite (no timing thresholds: the machine is shared)."""

from __future__ import annotations

import csv
import math

from segicl.cli import main
from tests.conftest import REPO


def test_perf_benchmark_writes_every_section(tmp_path, capsys):
    demo = REPO / "segicl" / "assets" / "demo"
    out = tmp_path / "perf"
    assert main(["benchmark", "perf", "--quick", "--data", str(demo), "--store-sizes", "2000", "--store-queries", "50",
                 "--repeats", "2", "--warmup", "1", "--skip-training", "--sizes", "128,256", "--batches", "1,2",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "perf.csv")))
    names = {r["name"] for r in rows}
    for name in ("load", "store.build_real", "segment.total", "segment.encoder", "segment.decoder", "segment.decoder.step",
                 "segment.postprocess", "segment.embed", "segment.search", "throughput", "alt.labelprop",
                 "alt.unet_fewshot.train", "alt.unet_fewshot", "store.build", "store.query", "store.recall@5",
                 "curve_k.segicl", "curve_k.labelprop", "curve_size.segicl", "machine.peak_rss"):
        assert name in names, name
    settings = {(r["name"], r["setting"].split()[0]) for r in rows}
    assert {("segment.total", f"k={k}") for k in (0, 3, 5)} <= settings
    assert {("throughput", "batch=1"), ("throughput", "batch=2")} <= settings
    assert {("curve_size.segicl", "128"), ("curve_size.segicl", "256")} <= settings
    for r in rows:
        if r["name"].startswith("machine.load"):
            continue  # the load average may be 0
        for col in ("p50", "p95", "p99"):
            v = float(r[col])
            assert math.isfinite(v) and v >= 0, r
        assert int(r["n"]) >= 1
        if r["name"] in ("segment.total", "segment.pipeline", "store.query", "alt.labelprop", "load"):
            assert float(r["p50"]) > 0 and float(r["p95"]) >= float(r["p50"]), r
        if r["name"] == "throughput":  # img/s: p95 is batch / the 95th-percentile call time, the slow tail
            assert float(r["p50"]) >= float(r["p95"]) > 0, r
    segment_n = {int(r["n"]) for r in rows if r["name"] == "segment.total"}
    assert segment_n == {2}  # the warm-up call is not counted
    md = (out / "perf.md").read_text()
    for heading in ("## Machine", "## Targets", "## Segment latency", "## Batch throughput", "## Alternatives",
                    "## Support store", "## Training", "## Cost curves"):
        assert heading in md, heading
    assert "SegICL / it" in md and "1-min load average" in md and "peak resident memory" in md
    for png in ("perf_k.png", "perf_size.png", "perf_store.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    assert "[perf] == segment latency" in capsys.readouterr().out


def test_instrument_times_the_parts_and_restores_the_pipeline():
    import segicl.pipeline as sp
    from eval.bench.bench_perf import Probe, instrument

    class Decoder:
        def predict(self, x):
            return x + 1

    class Pipe:
        decoder, route_decoder = Decoder(), None

        def encode(self, x):
            return self.match(x) * 2

        def match(self, x):
            return x

        def decode(self, x, steps):
            return [self.decoder.predict(x) for _ in range(steps)]

    pipe, probe = Pipe(), Probe()
    before = (sp.fine_propagation, sp.decide, sp.apply)
    with instrument(pipe, probe):
        assert pipe.decode(pipe.encode(1), 3) == [3, 3, 3]
        assert sp.apply is not before[2]
    assert dict(probe.calls) == {"encoder": 1, "encoder.match": 1, "decoder": 1, "decoder.step": 3}
    assert all(v >= 0 for v in probe.seconds.values())
    assert not vars(pipe) and not vars(pipe.decoder)  # the class's methods again
    assert (sp.fine_propagation, sp.decide, sp.apply) == before
