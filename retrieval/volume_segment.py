"""``segicl segment`` on 3D volumes (NIfTI, DICOM series folders, .mha / .nrrd): slice by slice.

    segicl segment --image ct.nii.gz --support atlas.nii.gz:atlas_labels.nii.gz --label 2 --out seg/
    segicl segment --images 'scans/*.nii.gz' --support atlas.nii.gz:atlas_labels.nii.gz --label 2 \\
        --window abdomen --out seg/ --resume

Each volume is windowed to 8 bits once (``--window``: a CT preset, ``LEVEL,WIDTH`` or percentiles),
sliced along ``--axis`` (default: the lowest-resolution axis) in display orientation, and every slice
segmented with the same supports: 2D pairs (``--support IMG:MASK``), slices of labelled volumes
(``--support VOL:LABELS``: ``--k`` slices carrying ``--label``, spread over its extent), and/or
``--k`` slices retrieved per slice from ``--store``. Per volume it writes ``<stem>_mask.nii.gz``
(the label value where predicted, on the input's voxel grid with its affine and header),
``<stem>_uncertainty.nii.gz`` (float32 std over the diffusion samples) and ``<stem>_overlay.png``
(the slice with the most foreground); plus ``volumes.csv`` (one row per input: status, outputs,
foreground volume in mL) and ``segment.json`` (settings, supports used), both rewritten after every
volume, so an interrupted batch leaves valid files and ``--resume`` skips the finished volumes.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CSV_FIELDS = ("image", "stem", "status", "mask", "uncertainty", "shape", "spacing_mm", "axis", "slices",
              "foreground_ml", "mean_uncertainty", "seconds", "error")


class _Fail(Exception):
    """A one-line problem that stops the command (printed as ``segicl segment: ...``)."""


def uses_volumes(args: argparse.Namespace) -> bool:
    """True when any query or support of a ``segicl segment`` call is a volume."""
    from segicl.volumes import is_volume_path

    return bool(getattr(args, "images", None)) or any(is_volume_path(p) for p in args.image or []) or any(
        is_volume_path(spec.rpartition(":")[0]) for spec in args.support)


def expand_inputs(image: list[Path], images: list[str]) -> list[Path]:
    """Query volumes: each ``--image`` and, for each ``--images``, the volume files and DICOM series
    sub-folders of a folder, or the matches of a glob pattern; sorted, duplicates dropped."""
    from segicl.volumes import VOLUME_EXTS, is_volume_path

    out = list(image)
    for spec in images:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if not q.name.startswith(".") and (
                q.is_dir() or q.name.lower().endswith(VOLUME_EXTS)))
            if not found and any(q.is_file() for q in p.iterdir()):
                found = [p]  # the folder itself is one DICOM series
        else:
            found = sorted(Path(q) for q in glob.glob(spec) if is_volume_path(q))
        if not found:
            raise _Fail(f"--images {spec}: no volumes found")
        out += found
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _volume_supports(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int | None]:
    """Support pairs sampled from ``--support VOL:LABELS`` and the label value they carry."""
    from segicl.volumes import is_volume_path, read_label_volume, read_volume, support_slices

    specs = [s for s in args.support if is_volume_path(s.rpartition(":")[0])]
    if not specs:
        return [], None
    if args.label is not None and not str(args.label).isdigit():
        raise _Fail(f"--label {args.label!r}: with volume supports the label is a value of the label map (an integer)")
    pairs, label = [], int(args.label) if args.label is not None else None
    per_volume = [args.k // len(specs) + (i < args.k % len(specs)) for i in range(len(specs))]
    for spec, k in zip(specs, per_volume):
        img_s, _, lab_s = spec.rpartition(":")
        if not lab_s:
            raise _Fail(f"--support {spec!r}: expected VOLUME:LABELS")
        image = read_volume(img_s)
        labels = read_label_volume(lab_s, like=image)
        if label is None:
            present = sorted(set(np.unique(labels.data).tolist()) - {0})
            if len(present) != 1:
                raise _Fail(f"{lab_s}: holds labels {present}; pass --label N")
            label = present[0]
        axis = image.slice_axis(args.axis)
        for img, mask, index in support_slices(image, labels, label, k, axis, args.window):
            pairs.append({"image": img, "mask": mask, "source": "volume", "image_path": img_s, "mask_path": lab_s,
                          "slice": index, "axis": axis, "score": None})
    return pairs, label


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from segicl.io import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    atomic_write_bytes(path, buf.getvalue().encode())


def segment_volumes(args: argparse.Namespace, load_pipeline: Callable[[str | None], Any]) -> int:
    """``segicl segment`` when the queries or supports are volumes; returns the exit status."""
    try:
        return _run(args, load_pipeline)
    except _Fail as exc:
        print(f"segicl segment: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, load_pipeline: Callable[[str | None], Any]) -> int:
    import torch

    from retrieval.cli import _given_supports, _save_png, _unique_stems, overlay, settings_report
    from retrieval.store import StoreError, SupportStore
    from segicl.data import DataError
    from segicl.io import atomic_write_bytes
    from segicl.volumes import (
        VolumeError,
        is_volume_path,
        read_volume,
        stack_slices,
        volume_slices,
        window_range,
        write_like,
    )

    queries = expand_inputs(list(args.image or []), list(args.images or []))
    flat = [p for p in queries if not is_volume_path(p)]
    if flat:
        raise _Fail(f"{flat[0]}: a 2D image among volume queries; segment 2D images and volumes in separate calls")
    if not queries:
        raise _Fail("volume supports given but no query (--image VOLUME or --images DIR|GLOB)")
    try:  # every input checked before the model loads and before the output folder exists
        window_range(np.zeros(2), args.window)
        if args.axis not in (None, "auto", "axial", "coronal", "sagittal", "0", "1", "2"):
            raise ValueError(f"--axis must be auto, axial, coronal, sagittal, 0, 1 or 2, got {args.axis!r}")
        preloaded = {p: read_volume(p) for p in args.image or []}  # --images entries are read one at a time
        given = _given_supports([s for s in args.support if not is_volume_path(s.rpartition(":")[0])], args.label)
        vol_sup, label = _volume_supports(args)
    except (VolumeError, DataError, ValueError) as exc:
        raise _Fail(str(exc)) from None
    store = None
    if args.store is not None:
        try:
            store = SupportStore.load(args.store)
        except StoreError as exc:
            raise _Fail(str(exc)) from None
    supports = given + vol_sup
    k_store = args.k if store is not None else 0
    pipe = load_pipeline(args.checkpoint)
    k_max = getattr(getattr(pipe, "config", None), "k_max", None)
    if k_max is not None and len(supports) + k_store > k_max:
        raise _Fail(f"{len(supports) + k_store} supports per slice ({len(given)} given, {len(vol_sup)} from volumes, "
                    f"{k_store} retrieved) but the model takes at most k_max={k_max}; lower --k")
    args.out.mkdir(parents=True, exist_ok=True)
    report = settings_report(args, pipe, len(supports) + k_store)
    report.update({"window": args.window or "percentile", "axis": args.axis or "auto", "label_value": label or 1})
    rows: list[dict[str, Any]] = []
    failed = 0
    for path, stem in zip(queries, _unique_stems([Path(f"{_stem(q)}.vol") for q in queries])):
        names = {"mask": f"{stem}_mask.nii.gz", "uncertainty": f"{stem}_uncertainty.nii.gz",
                 "overlay": f"{stem}_overlay.png"}
        row: dict[str, Any] = {"image": str(path), "stem": stem, "mask": names["mask"], "uncertainty": names["uncertainty"]}
        if args.resume and all((args.out / names[n]).is_file() for n in ("mask", "uncertainty")):
            rows.append({**row, "status": "skipped (done)"})
            _write_csv(args.out / "volumes.csv", rows)
            continue
        t0 = time.perf_counter()
        try:
            vol = preloaded.pop(path, None) or read_volume(path)
        except VolumeError as exc:
            print(f"segicl segment: {exc}", file=sys.stderr)
            rows.append({**row, "status": "error", "mask": "", "uncertainty": "", "error": str(exc)})
            _write_csv(args.out / "volumes.csv", rows)
            failed += 1
            continue
        axis = vol.slice_axis(args.axis)
        slices = volume_slices(vol, axis, args.window)
        masks, uncs, used = _segment_slices(args, pipe, slices, supports, store, stem, torch)
        label_map = stack_slices(np.stack(masks), vol.affine, axis).astype(np.uint8) * np.uint8(label or 1)
        unc = stack_slices(np.stack(uncs), vol.affine, axis).astype(np.float32)
        write_like(vol, label_map, args.out / names["mask"], dtype=np.uint8)
        write_like(vol, unc, args.out / names["uncertainty"], dtype=np.float32)
        best = int(np.argmax([m.sum() for m in masks]))
        _save_png(overlay(slices[best], masks[best], used[best] if used[best] else []), args.out / names["overlay"])
        voxel_ml = float(np.prod(vol.spacing)) / 1000.0
        row.update({"status": "done", "shape": "x".join(map(str, vol.shape)),
                    "spacing_mm": "x".join(f"{s:.4g}" for s in vol.spacing), "axis": axis, "slices": len(slices),
                    "foreground_ml": round(float(label_map.astype(bool).sum()) * voxel_ml, 3),
                    "mean_uncertainty": round(float(unc.mean()), 6), "seconds": round(time.perf_counter() - t0, 2)})
        rows.append(row)
        report["queries"].append({
            "image": str(path), "stem": stem, "shape": list(vol.shape), "spacing_mm": list(vol.spacing),
            "axis": axis, "slices": len(slices), "outputs": names, "overlay_slice": best,
            "foreground_ml": row["foreground_ml"], "mean_uncertainty": row["mean_uncertainty"],
            "supports": [{k: v for k, v in s.items() if k not in ("image", "mask")} for s in supports],
            "retrieved_per_slice": k_store})
        _write_csv(args.out / "volumes.csv", rows)
        atomic_write_bytes(args.out / "segment.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(args.out / "segment.json", (json.dumps(report, indent=1) + "\n").encode())
    done = sum(r["status"] == "done" for r in rows)
    print(f"{args.out}: {done} volume(s) segmented, {len(rows) - done - failed} skipped, {failed} failed; "
          f"volumes.csv lists the outputs")
    return 1 if failed else 0


def _stem(path: Path) -> str:
    from segicl.volumes import volume_stem

    return volume_stem(Path(str(path).rstrip("/")))


def _segment_slices(args, pipe, slices, supports, store, stem, torch, batch: int = 8):
    """Masks (N of (H, W) bool), uncertainties and the supports used per slice."""
    from retrieval.cli import _to_hw

    gen = torch.Generator().manual_seed(int(args.seed))
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(slices), desc=stem, unit="slice")
    masks, uncs, used = [], [], []
    for start in range(0, len(slices), batch):
        chunk = slices[start:start + batch]
        per_slice = []
        for img in chunk:
            sup = list(supports)
            if store is not None and args.k > 0:
                for h in store.search(img, k=args.k, dataset=args.dataset, label=args.label):
                    if h.label_value is None:
                        raise _Fail(f"{h.dataset}/{h.stem} carries labels {h.label_values}; pass --label")
                    s = h.sample(h.label_value)
                    sup.append({"image": s.image, "mask": s.mask, "source": "store", "score": h.score})
            per_slice.append(sup)
        any_sup = any(per_slice)
        out = pipe(images=chunk, text=[args.text] * len(chunk) if args.text else None,
                   supports=[[(s["image"], s["mask"]) for s in sup] for sup in per_slice] if any_sup else None,
                   num_inference_steps=args.steps, num_samples=args.samples, generator=gen)
        for i, img in enumerate(chunk):
            masks.append(_to_hw(out.masks[i], img.size, "mask").astype(bool))
            unc = getattr(out, "uncertainty", None)
            uncs.append(_to_hw(unc[i], img.size, "prob").astype(np.float32) if unc is not None
                        else np.zeros((img.size[1], img.size[0]), np.float32))
            used.append(per_slice[i])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not all(math.isfinite(float(u.mean())) for u in uncs):
        raise _Fail(f"{stem}: the model returned non-finite uncertainty")
    return masks, uncs, used
