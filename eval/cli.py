"""``segicl evaluate``: SegICL and every comparator on the same data; tables and plots for a paper.

Examples::

    segicl evaluate --data ../shared/data/kvasir_seg --data ../shared/data/acdc_cardiac_mri \\
        --methods segicl,vlsm:runs/clipseg_coop,unet_supervised,unet_fewshot \\
        --k 0,1,3,5 --supports random,retrieved --draws 3 --out runs/eval
    segicl evaluate --loo --checkpoints runs/loo --data ../shared/data/kvasir_seg ... --out runs/eval_loo

Heavy imports (torch, MONAI, faiss) happen inside :func:`main`, so ``segicl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``segicl evaluate``."""
    parser.add_argument("--data", action="append", type=Path, required=True, metavar="DIR",
                        help="dataset folder (repeat for several); a folder holding dataset folders is expanded")
    parser.add_argument("--split", default="test", help="split to evaluate (supports always come from train)")
    parser.add_argument("--methods", type=_str_list, default=["segicl"],
                        help="comma list: segicl, labelprop, vlsm:<saved model dir>, unet_supervised, unet_fewshot, "
                             "universeg:<saved model dir>")
    parser.add_argument("--k", type=_int_list, default=[0, 1, 3, 5], help="numbers of supports, e.g. 0,1,3,5")
    parser.add_argument("--supports", type=_str_list, default=["random"], help="random, retrieved and/or shuffled (another task's supports: an ablation)")
    parser.add_argument("--draws", type=int, default=1, help="support draws per (k, policy)")
    parser.add_argument("--checkpoint", default=None,
                        help="SegICL checkpoint dir (default: the shipped one; 'preset:tiny' = random tiny weights)")
    parser.add_argument("--loo", action="store_true",
                        help="leave-one-dataset-out: each dataset with the checkpoint trained without it")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="with --loo: folder of checkpoints, one per held-out dataset")
    parser.add_argument("--steps", type=int, default=None, help="SegICL denoising steps (default: eval config)")
    parser.add_argument("--samples", type=int, default=None, help="SegICL diffusion samples (default: eval config)")
    parser.add_argument("--matching", choices=["none", "route"], default=None,
                        help="SegICL matching.mode for this run (default: the checkpoint's config); route = with "
                             "supports, the decoder renders the label-propagation mask (segicl/matching.py)")
    parser.add_argument("--dense-condition", choices=["tokens", "mask"], default=None,
                        help="dense-layout checkpoints: what the decoder renders (default: the checkpoint's config): "
                             "tokens = the LM's condition map, mask = the tokens of its mask head's mask")
    parser.add_argument("--fine", choices=["none", "auto", "always"], default=None,
                        help="SegICL fine.mode for this run (default: the checkpoint's config, auto); auto = items "
                             "whose supports' masks a mask_size grid cannot hold are segmented at native "
                             "resolution (segicl/native.py); none = always the coarse model")
    parser.add_argument("--native-classifier", dest="native_classifier", choices=["forest", "vote"], default=None,
                        help="SegICL fine.classifier for this run (default: the checkpoint's config, forest): what "
                             "segments thin structures at native resolution (segicl/native.py)")
    parser.add_argument("--blend", type=float, default=None, metavar="W",
                        help="SegICL fine.blend for this run (default: the checkpoint's config, 0.5): weight of the "
                             "128 px propagation averaged into the model's probability for items that are not thin")
    parser.add_argument("--postprocess", choices=["none", "auto"], default=None,
                        help="SegICL postprocess.mode for this run (default: the checkpoint's config, auto); auto = "
                             "largest component / hole filling where the supports' masks are one piece / have no holes")
    parser.add_argument("--embedder", default=None, metavar="SPEC",
                        help="support-store embedder for --supports retrieved: pixel, hog, segicl[:<checkpoint dir>] "
                             "(default: the store's default, see docs/retrieval.md)")
    parser.add_argument("--calibration", choices=["none", "auto"], default=None,
                        help="SegICL: choose each task's path (defaults / without the blend / zero-shot) on its labelled "
                             "train items, leave-one-out (default: the checkpoint's calibration.mode)")
    parser.add_argument("--vlsm-prompt", default=None, metavar="LEVEL", choices=[f"p{i}" for i in range(10)],
                        help="VLSM methods: the text is the P0-P9 prompt of this level (p0..p9, as in training) instead "
                             "of the dataset's instruction (eval config vlsm.prompt_level)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items per task (quick runs)")
    parser.add_argument("--config", type=Path, default=None,
                        help="eval config YAML (default configs/eval/default.yaml): U-Net budgets, NSD tolerance, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (refused by default)")
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``segicl.commands`` plugin group."""
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate SegICL and the baselines; writes results.csv, summary.md, plots, run.json",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=main)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``segicl evaluate`` options (without the subcommand name)."""
    return add_arguments(argparse.ArgumentParser(prog="segicl evaluate")).parse_args(argv)


def _expand_data(paths: Sequence[Path]) -> list[Path]:
    """Dataset folders: a path with images/ (or an nnU-Net raw folder) is one; otherwise its dataset sub-folders, sorted."""
    from segicl.data import find_datasets, is_dataset_folder

    out: list[Path] = []
    for p in paths:
        if (p / "images").is_dir() or is_dataset_folder(p):
            out.append(p)
        elif p.is_dir():
            found = find_datasets(p)
            if not found:
                raise SystemExit(f"segicl evaluate: {p}: no dataset folders (images/ + masks/) found")
            out.extend(found)
        else:
            raise SystemExit(f"segicl evaluate: {p}: not a directory")
    return out


def main(args: argparse.Namespace) -> int:
    """Run the suite from parsed options; print where the outputs are."""
    from eval.suite import SuiteConfig, load_eval_config, loo_checkpoints, run_suite

    if args.loo and args.checkpoints is None:
        raise SystemExit("segicl evaluate: --loo needs --checkpoints DIR")
    if args.checkpoints is not None and not args.loo:
        raise SystemExit("segicl evaluate: --checkpoints is for --loo (use --checkpoint for one model)")
    if args.loo and args.checkpoint is not None:
        raise SystemExit("segicl evaluate: --loo takes --checkpoints DIR, not --checkpoint")
    eval_config = load_eval_config(args.config)
    for key in ("matching", "dense_condition", "fine", "native_classifier", "blend", "postprocess", "calibration"):  # SegICL settings overridden for this run
        if getattr(args, key) is not None:
            eval_config["segicl"] = {**(eval_config.get("segicl") or {}), key: getattr(args, key)}
    if getattr(args, "vlsm_prompt", None) is not None:
        eval_config["vlsm"] = {**(eval_config.get("vlsm") or {}), "prompt_level": args.vlsm_prompt}
    cfg = SuiteConfig(
        data=_expand_data(args.data),
        out=args.out,
        methods=args.methods,
        split=args.split,
        ks=args.k,
        supports=args.supports,
        draws=args.draws,
        checkpoint=args.checkpoint,
        steps=args.steps,
        samples=args.samples,
        seed=args.seed,
        embedder=args.embedder,
        limit=args.limit,
        config=eval_config,
        config_path=str(args.config) if args.config else None,
        command="segicl evaluate " + _describe(args),
        progress=not args.no_progress,
    )
    from segicl.data import DataError

    try:
        cfg.validate()
        if args.loo:
            cfg.checkpoints = loo_checkpoints(cfg, args.checkpoints)
        _check_out(args.out, args.overwrite)
        _check_data(cfg.data, cfg.split, cfg.limit)
    except (ValueError, FileNotFoundError) as exc:  # DataError is a ValueError
        raise SystemExit(f"segicl evaluate: {exc}") from exc
    try:
        paths = run_suite(cfg)
    except DataError as exc:  # a file changed after the check
        raise SystemExit(f"segicl evaluate: {exc} (results.csv in {args.out} holds the rows measured before)") from exc
    for name, path in paths.items():
        print(f"{name:>12}: {path}")
    return 0


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is not a writable folder or that holds an earlier run's results."""
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    earlier = [n for n in ("results.csv", "run.json", "summary.csv") if (out / n).exists()]
    if earlier and not overwrite:
        raise ValueError(f"{out}: holds the results of an earlier run ({earlier[0]}); pass --overwrite or choose another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot write there ({parent} is not a writable folder)")


def _check_data(dirs: Sequence[Path], split: str, limit: int | None) -> None:
    """Decode every image and mask the run can read (the queries and the train split) before any work,
    so a bad file stops the run with its name before the output folder exists."""
    from segicl.data import load_dataset

    for d in dirs:
        ds = load_dataset(d)
        stems = ds.stems(split)[:limit] + (ds.stems("train") if "train" in ds.splits and split != "train" else [])
        for stem in stems:
            ds.read_label_map(stem)
            ds.read_image(stem)


def _describe(args: argparse.Namespace) -> str:
    """The command line equivalent to ``args`` (canonical, whatever process parsed them; run.json has argv too)."""
    parts: list[str] = []
    for d in args.data:
        parts += ["--data", str(d)]
    parts += ["--split", args.split, "--methods", ",".join(args.methods), "--k", ",".join(map(str, args.k)),
              "--supports", ",".join(args.supports), "--draws", str(args.draws), "--seed", str(args.seed)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--checkpoints", args.checkpoints), ("--steps", args.steps),
                        ("--samples", args.samples), ("--limit", args.limit), ("--config", args.config),
                        ("--embedder", args.embedder),
                        ("--matching", args.matching), ("--dense-condition", args.dense_condition), ("--fine", args.fine),
                        ("--native-classifier", args.native_classifier), ("--blend", args.blend), ("--postprocess", args.postprocess),
                        ("--calibration", args.calibration), ("--vlsm-prompt", getattr(args, "vlsm_prompt", None))):
        if value is not None:
            parts += [flag, str(value)]
    if args.loo:
        parts.append("--loo")
    parts += ["--out", str(args.out)]
    return shlex.join(parts)
