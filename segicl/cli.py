"""The ``segicl`` command line.

Subcommands are plugins declared in pyproject.toml under ``[project.entry-points."segicl.commands"]``.
Each entry point is a ``register(subparsers)`` function that adds its parser and sets
``func=main`` on it; plugin modules keep heavy imports (torch, faiss) inside ``main`` so that
``segicl --help`` is fast. This indirection keeps the library free of static imports of
``training`` and ``eval``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

ORDER = ["demo", "segment", "annotate", "index", "evaluate", "train", "benchmark", "data"]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    from segicl import __version__

    parser = argparse.ArgumentParser(
        prog="segicl",
        description="In-context medical image segmentation: text + a few example image/mask pairs "
        "(given or retrieved from a FAISS support store) -> mask, probability and uncertainty.",
    )
    parser.add_argument("--version", action="version", version=f"segicl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    eps = {ep.name: ep for ep in entry_points(group="segicl.commands")}
    for name in sorted(eps, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        eps[name].load()(subparsers)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segicl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
