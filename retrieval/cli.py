"""``segicl index`` (build / inspect a FAISS support store) and ``segicl segment`` (inference).

Examples::

    segicl index build --data ../shared/data/kvasir_seg --data ../shared/data/cvc_clinicdb --out stores/polyp
    segicl index build --data ../shared/data --out stores/all --embedder pixel   # every dataset below
    segicl index info stores/polyp

    segicl segment --image a.jpg --image b.jpg --out seg/ --store stores/polyp --k 3 --label polyp
    segicl segment --image a.jpg --out seg/ --support s1.jpg:s1.png --support s2.jpg:s2.png \\
        --text "Segment the polyp in this endoscopy image."
    segicl segment --image a.jpg --out seg/          # zero-shot (k = 0)
    segicl segment --image ct.nii.gz --support atlas.nii.gz:atlas_labels.nii.gz --label 2 --window abdomen --out seg/

``segment`` writes per query ``<stem>.png`` (0/255 mask at the input's resolution),
``<stem>_prob.png`` (probability x 255), ``<stem>_overlay.png`` (the image with the mask outline
and a strip of the supports used, each with its mask outline) and one ``segment.json`` listing the
supports used for each query with their retrieval scores.

Heavy imports (torch, faiss, the model) happen inside the command functions, so ``segicl --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------ index


def register_index(subparsers: argparse._SubParsersAction) -> None:
    """Entry point (``segicl.commands``): ``segicl index build`` and ``segicl index info``."""
    parser = subparsers.add_parser("index", help="build or inspect a FAISS support store",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")
    b = sub.add_parser("build", help="embed the support images of dataset folders and index them")
    b.add_argument("--data", action="append", type=Path, required=True, metavar="DIR",
                   help="dataset folder (repeat for several); a folder holding dataset folders is expanded")
    b.add_argument("--split", default="train", help="split to index (train, val, test, all; default train)")
    b.add_argument("--out", type=Path, required=True, metavar="STORE", help="store folder to write")
    b.add_argument("--embedder", default=None,
                   help="pixel[:size], openclip:<dir|model@file>, segicl[:<checkpoint dir>] (default: pixel, 16 x 16 "
                        "downsampled pixels)")
    b.add_argument("--index-type", default=None, choices=["flat", "hnsw", "ivfpq"], help="default: chosen by size")
    b.add_argument("--add", action="store_true", help="add to an existing store at --out instead of replacing it")
    b.add_argument("--batch-size", type=int, default=32, help="images embedded per batch (default 32)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=index_build)
    i = sub.add_parser("info", help="print a store's manifest summary (checks its checksums)")
    i.add_argument("store", type=Path, metavar="STORE")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=index_info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def expand_data(paths: list[Path]) -> list[Path]:
    """Dataset folders: a path with images/ (or an nnU-Net raw folder) is one; otherwise its dataset sub-folders, sorted."""
    from segicl.data import find_datasets, is_dataset_folder

    out: list[Path] = []
    for p in paths:
        if (p / "images").is_dir() or is_dataset_folder(p):
            out.append(p)
        else:
            found = find_datasets(p)
            if not found:
                raise SystemExit(f"segicl index: {p}: neither a dataset folder nor a folder of dataset folders")
            out.extend(found)
    return out


def index_build(args: argparse.Namespace) -> int:
    import time

    from retrieval.store import StoreError, SupportStore
    from segicl.data import DataError

    t0 = time.perf_counter()
    try:
        dirs = expand_data(args.data)
        if not args.add and (args.out / "manifest.json").is_file():
            print(f"segicl index build: {args.out}: replacing the existing store (--add adds to it instead)",
                  file=sys.stderr)
        if args.add and (args.out / "manifest.json").is_file():
            store = SupportStore.load(args.out)
            if args.embedder and store.embedder.spec != args.embedder:
                raise StoreError(f"{args.out}: built with embedder {store.embedder_spec!r}, not {args.embedder!r}")
            added = store.add(dirs, split=args.split, batch_size=args.batch_size, progress=not args.no_progress)
        else:
            store = SupportStore.build(dirs, split=args.split, embedder=args.embedder, index_type=args.index_type,
                                       batch_size=args.batch_size, progress=not args.no_progress)
            added = len(store)
        store.save(args.out)
    except (StoreError, DataError, ValueError) as exc:
        print(f"segicl index build: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a read-only --out
        print(f"segicl index build: {exc.filename or args.out}: cannot write the store ({exc.strerror})", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    print(f"{args.out}: {len(store)} supports ({added} added) from {len(dirs)} dataset(s), embedder "
          f"{store.embedder_id}, index {store.index_type}, {dt:.1f} s")
    return 0


def index_info(args: argparse.Namespace) -> int:
    from retrieval.store import StoreError, SupportStore

    try:
        store = SupportStore.load(args.store)
    except StoreError as exc:
        print(f"segicl index info: {exc}", file=sys.stderr)
        return 1
    info = store.info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"store      {args.store}")
    print(f"supports   {info['count']}")
    print(f"embedder   {info['embedder']['spec']} (id {info['embedder']['id']}, dim {info['embedder']['dim']})")
    print(f"index      {info['index_type']}")
    print(f"created    {info['created']}  versions {info['versions']}")
    for ds, n in info["datasets"].items():
        labels = ", ".join(f"{name}: {c}" for name, c in info["labels"].get(ds, {}).items())
        print(f"  {ds:24s} {n:6d}  ({labels})")
    return 0


# ------------------------------------------------------------------------------------------ segment


def register_segment(subparsers: argparse._SubParsersAction) -> None:
    """Entry point (``segicl.commands``): ``segicl segment``."""
    p = subparsers.add_parser(
        "segment", help="segment images with given or retrieved supports (or zero-shot)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment query images from a text instruction and k example (image, mask) pairs:\n"
                    "given with --support, retrieved from a support store with --store, or none (zero-shot).",
        epilog="""examples:
  segicl segment --image a.jpg --image b.jpg --out seg/ --store stores/polyp --k 3 --label polyp
  segicl segment --image a.jpg --out seg/ --support s1.jpg:s1.png --support s2.jpg:s2.png \\
      --text "Segment the polyp in this endoscopy image."
  segicl segment --image a.jpg --out seg/          # zero-shot (k = 0)
  segicl segment --image ct.nii.gz --support atlas.nii.gz:atlas_labels.nii.gz --label 2 --window abdomen --out seg/

writes per query <stem>.png (0/255 mask at the input's resolution), <stem>_prob.png (probability x 255),
<stem>_overlay.png (the mask outline over the image, the supports used below), and segment.json (the
settings used, the path that made each mask, the supports with their scores). A volume gets
<stem>_mask.nii.gz (on its voxel grid, its affine and header), <stem>_uncertainty.nii.gz, <stem>_overlay.png
and a row of volumes.csv; see docs/volumes.md.""")
    p.add_argument("--image", action="append", type=Path, default=[], metavar="PATH",
                   help="query image (repeat); a volume (.nii, .nii.gz, .mha, .mhd, .nrrd, a DICOM series folder) is "
                        "segmented slice by slice (retrieval/volume_segment.py)")
    p.add_argument("--images", action="append", default=[], metavar="DIR|GLOB",
                   help="volumes: every volume file and DICOM series sub-folder of DIR, or a quoted glob (repeat)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out (refused by default)")
    p.add_argument("--text", default=None, help="instruction, e.g. 'Segment the polyp in this endoscopy image.'")
    p.add_argument("--support", action="append", default=[], metavar="IMG:MASK",
                   help="a support pair (repeat); the mask is binarised as > 0, or == the --label value")
    p.add_argument("--store", type=Path, default=None, help="support store to retrieve supports from")
    p.add_argument("--k", type=int, default=3, help="supports retrieved from --store per query (default 3)")
    p.add_argument("--label", default=None, help="label name or mask value the supports must carry")
    p.add_argument("--dataset", default=None, help="retrieve only from this dataset of the store")
    p.add_argument("--checkpoint", default=None, help="SegICL checkpoint dir (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--samples", type=int, default=None, help="diffusion samples for the uncertainty (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = p.add_argument_group("volumes")
    v.add_argument("--window", default=None, metavar="NAME|L,W",
                   help="intensity window to 8 bits: a CT preset (abdomen, liver, mediastinum, lung, bone, brain), "
                        "LEVEL,WIDTH in HU, or percentile (default: 0.5-99.5 percentiles of the volume; MRI)")
    v.add_argument("--axis", default=None, help="slice along: auto (the lowest-resolution axis, default), axial, "
                                                "coronal, sagittal, or a data axis 0-2")
    v.add_argument("--resume", action="store_true", help="skip volumes whose outputs already exist in --out")
    p.set_defaults(func=segment)


def load_pipeline(checkpoint: str | None):
    """The SegICL pipeline (a separate function so tests can substitute a fake one)."""
    from segicl.pipeline import SegICLPipeline, default_checkpoint

    return SegICLPipeline.from_pretrained(checkpoint or default_checkpoint())


def _read_mask(path: Path, label: str | None, image_path: Path | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """A support mask as bool (H, W). Colour masks are refused (a swapped IMG:MASK looks like one); grey
    RGB, several foreground values and empty masks are used with a one-line note on stderr."""
    from segicl.data import DataError, open_image

    arr = np.asarray(open_image(path))
    if size is not None and arr.shape[:2] != (size[1], size[0]):
        raise DataError(f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} differs from {image_path} size {size[0]}x{size[1]}")
    if arr.ndim == 3:
        if arr.shape[-1] >= 3:
            if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
                raise DataError(f"{path}: colour mask (R, G, B differ: an image given as the mask?); "
                                "expected a greyscale or label mask")
            print(f"segicl segment: {path}: RGB mask with equal channels, read as greyscale", file=sys.stderr)
        arr = arr[..., 0]
    if label is not None and str(label).isdigit():
        mask = arr == int(label)
    else:
        values = np.unique(arr[arr > 0])
        if len(values) > 1:
            shown = ", ".join(str(v) for v in values[:4]) + (", ..." if len(values) > 4 else "")
            print(f"segicl segment: {path}: mask holds {len(values)} non-zero values ({shown}); all are the "
                  "foreground (pass --label VALUE to pick one)", file=sys.stderr)
        mask = arr > 0
    if not mask.any():
        print(f"segicl segment: {path}: empty mask (no foreground pixel"
              + (f" == {label}" if label is not None and str(label).isdigit() else "")
              + "): this support shows only background", file=sys.stderr)
    return mask


def _read_image(path: Path):
    from segicl.data import open_image

    img = open_image(path)
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def _given_supports(specs: list[str], label: str | None) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        img_s, sep, mask_s = spec.rpartition(":")
        if not sep or not img_s or not mask_s:
            raise SystemExit(f"segicl segment: --support {spec!r}: expected IMG:MASK")
        img = _read_image(Path(img_s))
        mask = _read_mask(Path(mask_s), label, Path(img_s), img.size)
        out.append({"image": img, "mask": mask, "source": "given", "image_path": img_s, "mask_path": mask_s, "score": None})
    return out


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem
        if stem in seen:
            seen[stem] += 1
            stem = f"{stem}-{seen[p.stem]}"
        else:
            seen[stem] = 1
        out.append(stem)
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, bool)
    if not m.any():
        return m
    p = np.pad(m, 1, mode="edge")
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = m & ~interior
    # thicken to ~2 px so it stays visible on large images
    e = np.pad(edge, 1)
    return e[1:-1, 1:-1] | e[:-2, 1:-1] | e[2:, 1:-1] | e[1:-1, :-2] | e[1:-1, 2:]


def _draw(image, mask: np.ndarray, colour: tuple[int, int, int]):
    from PIL import Image

    rgb = np.array(image.convert("RGB"))
    rgb[_outline(mask)] = colour
    return Image.fromarray(rgb)


def overlay(image, mask: np.ndarray, supports: list[dict[str, Any]], strip_height: int = 96,
            truth: np.ndarray | None = None, caption: str | None = None):
    """The image with the mask outline (red) and, when known, the ground-truth outline (cyan), a
    legend line (``caption``: method, k, Dice ...) in the corner, above a strip of the supports
    (green outlines, retrieval score)."""
    from PIL import Image, ImageDraw

    main = _draw(image, truth, (40, 220, 255)) if truth is not None else image.convert("RGB")  # a copy
    main = _draw(main, mask, (255, 40, 40))
    legend = "red: prediction" + (", cyan: ground truth" if truth is not None else "") + (
        ", green: supports" if supports else "")
    draw = ImageDraw.Draw(main)
    for row, text in enumerate(t for t in (caption, legend) if t):
        draw.text((3, 2 + 11 * row), text, fill=(255, 255, 0))
    if not supports:
        return main
    tiles = []
    for s in supports:
        t = _draw(s["image"], s["mask"], (40, 255, 40))
        w = max(1, round(t.size[0] * strip_height / t.size[1]))
        t = t.resize((w, strip_height), Image.Resampling.BILINEAR)
        if s.get("score") is not None:
            ImageDraw.Draw(t).text((3, 2), f"{s['score']:.3f}", fill=(255, 255, 0))
        tiles.append(t)
    strip_w = sum(t.size[0] for t in tiles) + 4 * (len(tiles) - 1)
    width = max(main.size[0], strip_w)
    canvas = Image.new("RGB", (width, main.size[1] + 4 + strip_height), (0, 0, 0))
    canvas.paste(main, (0, 0))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, main.size[1] + 4))
        x += t.size[0] + 4
    return canvas


def _save_png(img, path: Path) -> None:
    import io

    from segicl.io import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _to_hw(arr: np.ndarray, size_wh: tuple[int, int], kind: str) -> np.ndarray:
    """``arr`` at the image's (H, W); resized (nearest for masks, bilinear otherwise) if it differs."""
    from PIL import Image

    arr = np.asarray(arr)
    if arr.shape == (size_wh[1], size_wh[0]):
        return arr
    if kind == "mask":
        return np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize(size_wh, Image.Resampling.NEAREST)) > 127
    return np.asarray(Image.fromarray(arr.astype(np.float32)).resize(size_wh, Image.Resampling.BILINEAR))


def segment(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from retrieval.embedders import EmbedderError
    from retrieval.store import StoreError, SupportStore
    from retrieval.volume_segment import segment_volumes, uses_volumes
    from segicl.data import DataError
    from segicl.io import atomic_write_bytes

    if uses_volumes(args):
        return segment_volumes(args, lambda checkpoint: load_pipeline(checkpoint))
    if not args.image:
        print("segicl segment: no query: pass --image PATH (or --images DIR|GLOB for volumes)", file=sys.stderr)
        return 1
    if args.k < 0:
        print(f"segicl segment: --k {args.k}: the number of retrieved supports must be >= 0", file=sys.stderr)
        return 1
    for p in args.image:
        if not p.is_file():
            print(f"segicl segment: {p}: image not found", file=sys.stderr)
            return 1
    stems = _unique_stems(args.image)
    problem = _out_problem(args.out, [f"{s}{x}.png" for s in stems for x in ("", "_prob", "_overlay")] + ["segment.json"],
                           args.overwrite)
    if problem:
        print(f"segicl segment: {problem}", file=sys.stderr)
        return 1
    try:  # every input read before the model loads and before the output folder exists
        for p in args.image:
            _read_image(p)
        given = _given_supports(args.support, args.label)
    except DataError as exc:
        print(f"segicl segment: {exc}", file=sys.stderr)
        return 1
    if args.store is None and args.label is not None and not args.support:
        print("segicl segment: --label without --store or --support has no effect", file=sys.stderr)
    if args.store is not None and args.k == 0:
        print("segicl segment: --k 0 with --store retrieves no supports (zero-shot)"
              + ("; --label / --dataset have no effect" if args.label or args.dataset else ""), file=sys.stderr)
    if given and args.text is None:
        print("segicl segment: --support without --text: the instruction is empty (the supports alone define the task)",
              file=sys.stderr)
    store = None
    if args.store is not None:
        try:
            store = SupportStore.load(args.store)
        except StoreError as exc:
            print(f"segicl segment: {exc}", file=sys.stderr)
            return 1
        try:
            store.embedder  # noqa: B018 - resolves the stored embedder now: a changed one is refused before any work
        except (StoreError, EmbedderError) as exc:
            print(f"segicl segment: {args.store}: {exc}", file=sys.stderr)
            return 1
        if args.k > 0 and (args.label is not None or args.dataset is not None):
            allowed = store.allowed_mask(args.dataset, args.label)
            if allowed is not None and not allowed.any():
                names = sorted({n for r in store.records for v, n in r.label_names.items() if v in r.label_values})
                what = " and ".join(f"{flag} {v!r}" for flag, v in (("--dataset", args.dataset), ("--label", args.label)) if v)
                print(f"segicl segment: {args.store}: no support matches {what} (labels in the store: {', '.join(names)})",
                      file=sys.stderr)
                return 1
        if args.k > len(store):
            print(f"segicl segment: --k {args.k} but {args.store} holds {len(store)} supports; using at most "
                  f"{len(store)} per query", file=sys.stderr)
    try:
        pipe = load_pipeline(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:  # missing, truncated or modified checkpoint files
        print(f"segicl segment: {exc}", file=sys.stderr)
        return 1
    k_max = getattr(getattr(pipe, "config", None), "k_max", None)
    n_sup = len(given) + (args.k if store is not None else 0)
    if k_max is not None and n_sup > k_max:
        print(f"segicl segment: {n_sup} supports per query ({len(given)} given + k={args.k if store else 0}) but the "
              f"model takes at most k_max={k_max}", file=sys.stderr)
        return 1
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"segicl segment: {args.out}: cannot create the output folder ({exc.strerror})", file=sys.stderr)
        return 1
    report = settings_report(args, pipe, args.k if store is not None else len(given))
    t_start = time.perf_counter()
    bar = None
    if not args.no_progress and len(args.image) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(args.image), desc="segmenting", unit="img")
    for path, stem in zip(args.image, stems):
        image = _read_image(path)
        supports = list(given)
        text = args.text
        if store is not None and args.k > 0:
            hits = store.search(image, k=args.k, dataset=args.dataset, label=args.label,
                                exclude_stems=_same_file_stems(store, path))
            if len(hits) < min(args.k, len(store)):
                print(f"segicl segment: {path}: only {len(hits)} of {args.k} supports pass the filters", file=sys.stderr)
            for h in hits:
                if h.label_value is None:
                    print(f"segicl segment: {h.dataset}/{h.stem} carries labels {h.label_values}; pass --label",
                          file=sys.stderr)
                    return 1
                s = h.sample(h.label_value)
                supports.append({"image": s.image, "mask": s.mask, "source": "store", "score": h.score,
                                 "dataset": h.dataset, "stem": h.stem, "label": h.label,
                                 "image_path": str(h.image_path), "mask_path": str(h.mask_path)})
            if text is None and hits:
                text = f"Segment the {hits[0].label} in this {hits[0].modality} image."
        gen = torch.Generator().manual_seed(int(args.seed))
        out = pipe(images=[image], text=[text] if text else None,
                   supports=[[(s["image"], s["mask"]) for s in supports]] if supports else None,
                   num_inference_steps=args.steps, num_samples=args.samples, generator=gen)
        size = image.size
        mask = _to_hw(out.masks[0], size, "mask").astype(bool)
        prob = np.clip(_to_hw(out.probabilities[0], size, "prob").astype(np.float32), 0, 1)
        unc = getattr(out, "uncertainty", None)
        names = {"mask": f"{stem}.png", "prob": f"{stem}_prob.png", "overlay": f"{stem}_overlay.png"}
        _save_png(Image.fromarray((mask * 255).astype(np.uint8)), args.out / names["mask"])
        _save_png(Image.fromarray(np.round(prob * 255).astype(np.uint8)), args.out / names["prob"])
        _save_png(overlay(image, mask, supports), args.out / names["overlay"])
        entry = {"image": str(path), "stem": stem, "size_wh": list(size), "text": text, "outputs": names,
                 "path": (getattr(out, "paths", None) or [None])[0],  # encoder / route / fine (native resolution): what made the mask
                 "foreground_fraction": round(float(mask.mean()), 6),
                 "supports": [{k: v for k, v in s.items() if k not in ("image", "mask")} for s in supports]}
        if getattr(out, "postprocess", None):
            entry["postprocess"] = out.postprocess[0]
        if unc is not None:
            entry["mean_uncertainty"] = round(float(np.mean(unc[0])), 6)
        report["queries"].append(entry)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    atomic_write_bytes(args.out / "segment.json", (json.dumps(report, indent=1) + "\n").encode())
    print(f"{args.out}: {len(args.image)} mask(s) written, segment.json lists the supports used")
    return 0


def settings_report(args: argparse.Namespace, pipe: Any, k: int) -> dict[str, Any]:
    """The head of segment.json: the values used, not the options given (None = the checkpoint's default)."""
    from segicl import __version__

    cfg = getattr(pipe, "config", None)
    sched = getattr(cfg, "scheduler", None)
    if args.checkpoint is None:
        from segicl.pipeline import default_checkpoint

        checkpoint = str(default_checkpoint())
    else:
        checkpoint = str(Path(args.checkpoint).resolve())
    return {
        "segicl_version": __version__, "checkpoint": checkpoint,
        "store": str(args.store) if args.store else None, "k": k,
        "label": args.label, "seed": args.seed,
        "steps": args.steps or getattr(sched, "num_inference_steps", None),
        "samples": args.samples or getattr(sched, "num_samples", None),
        "matching": getattr(getattr(cfg, "matching", None), "mode", None),
        "fine": getattr(getattr(cfg, "fine", None), "mode", None),
        "postprocess": getattr(getattr(cfg, "postprocess", None), "mode", None),
        "queries": []}


def _out_problem(out: Path, names: list[str], overwrite: bool) -> str | None:
    """Why ``out`` cannot take this run's outputs (None when it can): not a folder, not writable, or
    holding files of an earlier run that would be replaced (allowed with ``--overwrite``)."""
    import os

    if out.exists() and not out.is_dir():
        return f"{out}: exists and is not a folder"
    if out.is_dir():
        clash = [n for n in names if (out / n).exists()]
        if clash and not overwrite:
            return (f"{out}: holds the outputs of an earlier run ({', '.join(clash[:2])}"
                    f"{', ...' if len(clash) > 2 else ''}); pass --overwrite or choose another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{out}: cannot write there ({parent} is not a writable folder)"
    return None


def _same_file_stems(store, path: Path) -> list[str]:
    """Stems of store entries that are this very file (never use the query as its own support)."""
    try:
        rp = str(Path(path).resolve())
    except OSError:
        return []
    return [r.stem for r in store.records if r.image_path == rp]

