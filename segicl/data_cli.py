"""``segicl data``: inspect and convert dataset folders (nnU-Net v2 raw <-> the project's 2D layout).

Examples::

    segicl data info ~/nnUNet_raw/Dataset003_Liver
    segicl data convert ~/nnUNet_raw/Dataset003_Liver data/liver_2d --window liver   # slices, groups = case
    segicl data convert ../shared/data/busbra_breast_us runs/Dataset501_BUSBRA       # 2D PNG nnU-Net dataset

The direction follows the source: an nnU-Net raw folder (dataset.json with channel_names, imagesTr/)
becomes a 2D-layout folder, a 2D-layout folder (images/, masks/) an nnU-Net raw folder. Outputs are
written to a temporary folder and renamed into place, so a failed conversion leaves nothing behind.

A module of its own, not ``segicl/data/``: that package imports torch, and registering a subcommand
must stay light (``segicl --help``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    c = sub.add_parser("convert", help="nnU-Net raw -> 2D layout, or 2D layout -> nnU-Net raw (2D PNG)")
    c.add_argument("src", type=Path, help="nnU-Net raw dataset folder or 2D-layout dataset folder")
    c.add_argument("out", type=Path, help="output folder (replaced if it exists)")
    c.add_argument("--axis", default=None, help="3D cases: slice along auto (lowest resolution, default), axial, "
                                                "coronal, sagittal or a data axis 0-2")
    c.add_argument("--window", default=None, help="3D cases: CT preset (abdomen, liver, lung, bone, brain, "
                                                  "mediastinum), LEVEL,WIDTH, or percentile (default)")
    c.add_argument("--keep-empty", action="store_true", help="3D cases: keep slices without any label")
    c.add_argument("--val-fraction", type=float, default=0.2, help="share of imagesTr cases in val (default 0.2)")
    c.add_argument("--seed", type=int, default=0, help="seed of the train / val case split (default 0)")
    c.set_defaults(func=convert)
    i = sub.add_parser("info", help="cases, labels (tasks) and the case split of an nnU-Net raw folder")
    i.add_argument("src", type=Path)
    i.add_argument("--val-fraction", type=float, default=0.2)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point (``segicl.commands``): ``segicl data convert`` and ``segicl data info``."""
    parser = subparsers.add_parser("data", help="inspect or convert dataset folders (nnU-Net raw <-> 2D layout)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(prog="segicl data")).parse_args(argv)


def convert(args: argparse.Namespace) -> int:
    from segicl.data.dataset import DataError
    from segicl.data.nnunet import is_nnunet_raw, nnunet_to_2d, to_nnunet

    if args.out.resolve() == args.src.resolve():
        print(f"segicl data convert: {args.out}: the output must differ from the source", file=sys.stderr)
        return 1
    try:
        if is_nnunet_raw(args.src):
            nnunet_to_2d(args.src, args.out, axis=args.axis, window=args.window, keep_empty=args.keep_empty,
                         val_fraction=args.val_fraction, seed=args.seed)
            kind = "2D layout"
        elif (args.src / "images").is_dir() and (args.src / "masks").is_dir():
            to_nnunet(args.src, args.out)
            kind = "nnU-Net raw (2D PNG)"
        else:
            raise DataError(f"{args.src}: neither an nnU-Net raw folder (dataset.json + imagesTr/) nor a 2D-layout "
                            "folder (images/ + masks/)")
    except (DataError, ValueError) as exc:
        print(f"segicl data convert: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: written as {kind} from {args.src}")
    return 0


def info(args: argparse.Namespace) -> int:
    from segicl.data.dataset import DataError
    from segicl.data.nnunet import load_nnunet

    try:
        ds = load_nnunet(args.src)
        splits = ds.case_splits(args.val_fraction, args.seed)
    except (DataError, ValueError) as exc:
        print(f"segicl data info: {exc}", file=sys.stderr)
        return 1
    print(f"dataset    {ds.name} ({ds.root})")
    print(f"modality   {ds.modality}   files *{ds.file_ending}   {'2D' if ds.is_2d else '3D'}")
    print(f"tasks      {', '.join(f'{t.label_value}: {t.label_name}' for t in ds.tasks())}")
    unlabelled = sum(c.split == "test" and c.label is None for c in ds.cases)
    print("cases      " + ", ".join(f"{s} {len(v)}" for s, v in splits.items()) + f", unlabelled test {unlabelled}")
    return 0
