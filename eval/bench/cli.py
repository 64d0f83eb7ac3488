"""``segicl benchmark NAME``: one module of eval/bench/ per benchmark (heavy imports inside each ``main``)."""

from __future__ import annotations

import argparse

BENCHMARKS = {
    "all": ("eval.bench.bench_all",
            "rerun every table of README.md and docs/results/ from configs/bench/all.yaml (--quick: a subset)"),
    "resolution": ("eval.bench.bench_resolution",
                   "oracle Dice at each working size beside the propagation and the model (CSV + Markdown)"),
    "embedders": ("eval.bench.bench_embedders",
                  "support-store embedders compared by the Dice of segmentation with the supports they retrieve"),
    "folds": ("eval.bench.bench_folds",
              "leave-dataset-group-out: train stage 1 per fold, score the held-out datasets in context"),
    "interactive": ("eval.bench.bench_interactive",
                    "a robot user segments datasets image after image: interactions per image with and without a growing context"),
    "vlsm-quality": ("eval.bench.bench_vlsm_quality",
                     "VLSM comparators trained and scored per dataset, P0-P9, tuning modes, zero-shot folds (CSV + Markdown)"),
    "perf": ("eval.bench.bench_perf",
             "latency breakdown, throughput, alternatives, store, training steps/s and cost curves (CSV + Markdown + PNG)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``segicl.commands`` plugin group."""
    import importlib

    parser = subparsers.add_parser("benchmark", help="benchmarks that print tables and write CSV / Markdown",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, (module, text) in BENCHMARKS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=text, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
