"""``segicl train {stage1,stage2,stage3,vlsm,universeg,click}``: build a task from a config and run it through the shared loop.

Examples::

    segicl train stage1 --config configs/train/tiny_stage1.yaml --out runs/stage1
    segicl train stage2 --config configs/train/tiny_stage2.yaml --set model.init=runs/stage1/model
    segicl train vlsm --config configs/vlsm/clipseg_tiny.yaml --mode coop --data ../shared/data \\
        --exclude kvasir_seg,cvc_clinicdb --max-steps 500
    segicl train universeg --config configs/train/tiny_universeg.yaml --exclude kvasir_seg  # the comparator
    segicl train stage1 --config configs/train/tiny_stage1.yaml --resume          # after a kill
    accelerate launch --config_file configs/accelerate/ddp.yaml -m segicl.cli train stage1 --config ...

The config's ``train:`` block drives the loop (see docs/training.md); ``--set a.b=value`` edits any
key (the value is parsed as YAML). The run folder gets ``config.yaml`` (the resolved config),
``log.csv``, ``tb/``, ``checkpoints/`` and, at the end, ``model/`` (the task's ``save_pretrained``).
Heavy imports happen inside :func:`main`, so ``segicl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("stage1", "stage2", "stage3", "vlsm", "universeg", "click")


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser, stage: str | None = None) -> argparse.ArgumentParser:
    if stage is None:
        parser.add_argument("stage", choices=STAGES, help="what to train")
    parser.add_argument("--config", type=Path, required=True, help="YAML config (configs/train/*.yaml, configs/vlsm/*.yaml)")
    parser.add_argument("--data", nargs="+", action="extend", type=Path, default=None, metavar="DIR",
                        help="dataset folders or roots holding them (default: the config's data.root)")
    parser.add_argument("--exclude", type=_str_list, default=None, metavar="A,B",
                        help="datasets to leave out (leave-one-dataset-out), e.g. kvasir_seg,cvc_clinicdb")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<stage>/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run folder that holds an earlier run (deletes its checkpoints/, model/, log.csv)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides train.steps / epochs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted, value parsed as YAML (repeatable): --set train.lr=3e-4")
    parser.add_argument("--deepspeed", type=Path, default=None,
                        help="DeepSpeed JSON for a single process without accelerate launch (configs/deepspeed/zero2.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if stage in (None, "vlsm"):
        parser.add_argument("--model", default=None, help="vlsm: clipseg, cris, biomedclipseg, biomedclipseg_d (default: the config's)")
        parser.add_argument("--mode", default=None, help="vlsm: e2e, decoder, coop, cocoop, vpt, maple, shared_separate, "
                            "shared_attention, adapter_{dense,shallow}_{v,vl,vlc} (default: the config's, else e2e)")
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``segicl.commands`` plugin group: ``segicl train <stage> ...``."""
    parser = subparsers.add_parser("train", help="train SegICL (stage1, stage2, stage3) or a baseline (vlsm, universeg)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    helps = {"stage1": "condition encoder + diffusion decoder on (image, mask) pairs",
             "stage2": "multimodal encoder on in-context episodes (frozen stage-1 parts)",
             "stage3": "decoder adapted to the encoder's predicted tokens S (frozen encoders)",
             "vlsm": "a VLSM baseline (CLIPSeg, CRIS, BiomedCLIPSeg) in a tuning mode",
             "universeg": "the UniverSeg-style in-context comparator on real + pseudo tasks",
             "click": "the interactive network (clicks, boxes, scribbles + context prior) with simulated users"}
    for stage in STAGES:
        sub = stages.add_parser(stage, help=helps[stage], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(sub, stage)
        sub.set_defaults(func=main, stage=stage)


# ---------------------------------------------------------------------------------- config
def set_key(config: dict, dotted: str, value: Any) -> None:
    """``set_key(cfg, "train.lr", 1e-3)``; intermediate mappings are created."""
    keys = dotted.split(".")
    node = config
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ValueError(f"--set {dotted}: {k!r} is not a mapping in the config")
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        set_key(config, key.strip(), _parse_value(text))
    return config


def _parse_value(text: str) -> Any:
    """YAML, except that YAML 1.1 leaves ``3e-4`` a string: numbers written so become floats."""
    import yaml

    if not text.strip():
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: Path) -> dict:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping")
    return data


def resolve(args: argparse.Namespace) -> tuple[dict, list[Path], list[str], Path]:
    """(config, data dirs, exclude, out dir) from the arguments and the config file."""
    config = apply_overrides(copy.deepcopy(load_config(args.config)), args.overrides)
    data = config.setdefault("data", {}) or {}
    config["data"] = data
    train = config.setdefault("train", {}) or {}
    config["train"] = train
    if args.stage == "vlsm":
        if args.model:
            config["model"] = args.model
        if args.mode:
            config["mode"] = args.mode
        config.setdefault("mode", "e2e")
    if args.max_steps is not None:
        train["steps"] = train["max_steps"] = int(args.max_steps)
        train.pop("epochs", None)
        train.pop("max_epochs", None)
    train.setdefault("seed", int(config.get("seed", 0)))
    if args.data:
        data_dirs = [Path(d) for d in args.data]
    elif data.get("root"):
        roots = data["root"] if isinstance(data["root"], list) else [data["root"]]
        data_dirs = [Path(os.path.expandvars(os.path.expanduser(str(r)))) for r in roots]
    else:
        raise SystemExit(f"segicl train {args.stage}: no data: pass --data DIR or set data.root in {args.config}")
    for d in data_dirs:
        if not d.exists():
            raise SystemExit(f"segicl train {args.stage}: data folder {d} not found")
    exclude = list(args.exclude) if args.exclude is not None else list(data.get("exclude") or [])
    data["exclude"] = exclude
    if data.get("cache_dir"):
        data["cache_dir"] = os.path.expandvars(os.path.expanduser(str(data["cache_dir"])))
    if args.out is not None:
        out = args.out
    elif train.get("out_dir"):
        out = Path(train["out_dir"])
    else:
        name = Path(args.config).stem + (f"-{config['model']}-{config['mode']}" if args.stage == "vlsm" else "")
        out = Path("runs") / args.stage / name
    train["out_dir"] = str(out)
    if getattr(args, "deepspeed", None):
        train["deepspeed"] = str(args.deepspeed)
    if args.no_progress:
        train["progress"] = False
    return config, data_dirs, exclude, out


def build_task(stage: str, config: dict, data_dirs: Sequence[Path], exclude: Sequence[str]):
    """(task, train_dataset, val_fn) of a stage; the stage modules are imported lazily."""
    import importlib

    module_name, fn_name = {
        "stage1": ("training.stage1", "build_stage1_task"),
        "stage2": ("training.stage2", "build_stage2_task"),
        "stage3": ("training.stage3", "build_stage3_task"),
        "vlsm": ("training.vlsm_task", "build_vlsm_task"),
        "universeg": ("training.universeg_task", "build_universeg_task"),
        "click": ("training.click_task", "build_click_task"),
    }[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise SystemExit(
                f"segicl train {stage}: {module_name} is not available in this checkout "
                f"({module_name.replace('.', '/')}.py with {fn_name}(config, data_dirs, exclude) is missing)"
            ) from exc
        raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise SystemExit(f"segicl train {stage}: {module_name} has no {fn_name}(config, data_dirs, exclude)")
    return fn(config, list(data_dirs), list(exclude))


def main(args: argparse.Namespace) -> int:
    import json

    import yaml

    from segicl.data import DataError
    from training.loop import CheckpointError, LoopConfig, list_checkpoints, train

    config, data_dirs, exclude, out = resolve(args)
    loop_cfg = LoopConfig.from_dict(config["train"])  # fail on a bad train block before building the model
    earlier = [p for p in (*list_checkpoints(out)[-1:], out / "model") if p.exists()]
    if earlier and not args.resume:
        if not getattr(args, "overwrite", False):
            raise SystemExit(f"segicl train {args.stage}: {out}: holds an earlier run ({earlier[0].relative_to(out)}); "
                             "pass --resume to continue it or --overwrite to start over")
    try:
        task, train_set, val_fn = build_task(args.stage, config, data_dirs, exclude)
    except DataError as exc:
        raise SystemExit(f"segicl train {args.stage}: {exc}") from None
    if earlier and not args.resume:  # --overwrite: the earlier run goes only once the new one is ready to start
        import shutil

        for name in ("checkpoints", "model", "log.csv", "tb"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"stage": args.stage, "data_dirs": [str(d) for d in data_dirs], **config},
                                                    sort_keys=False))
    try:
        result = train(task, train_set, val_fn, loop_cfg, resume=bool(args.resume))
    except CheckpointError as exc:
        raise SystemExit(f"segicl train {args.stage}: {exc}") from None
    summary = {k: result[k] for k in ("step", "epoch", "stopped_early", "out_of_time", "model_dir", "steps_per_s")}
    summary["val"] = {k: round(v, 4) for k, v in result["val"].items() if "/" not in k}
    print(json.dumps(summary, default=str))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``python -m training.cli STAGE --config ...`` (the same options as ``segicl train``)."""
    return add_arguments(argparse.ArgumentParser(prog="python -m training.cli")).parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
