"""3D metrics per case for volume datasets (nnU-Net raw folders with 3D cases) in ``segicl evaluate``.

The suite predicts volumes slice by slice, as every other dataset (one row of results.csv per slice).
For a dataset whose samples are slices of 3D cases (``dataset.is_volume``,
:class:`segicl.data.nnunet_dataset.NnUNetSliceDataset`), :class:`CaseStacker` also collects each
slice's thresholded prediction and, once every slice of a case has been predicted, stacks them back on
the case's voxel grid (the exact inverse of the slicing) and computes :func:`eval.metrics.volume_metrics`
against the stacked ground truth with the case's voxel spacing: Dice, HD95 and NSD in millimetres,
MONAI's definitions. One row of ``volumes.csv`` per (dataset, label, case, method, k, supports, draw).

3D figures need *every* slice of a case. With ``--limit N`` the suite evaluates the first N slices of
the split per label; a case cut by the limit gets a row with empty metrics and the number of its
slices evaluated (``slices`` = "2/9"), and is left out of the means. A case with a failed slice
prediction gets the error and no metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from eval.metrics import DEFAULT_NSD_TOLERANCE_MM, volume_metrics
from eval.report import _nanmean

VOLUME_COLUMNS = ["dataset", "label", "case", "method", "k", "supports", "draw", "slices",
                  "dice3d", "hd95_mm", "nsd_mm", "error"]  # fmt: skip
"""Columns of volumes.csv: one row per (dataset, label, case, method, k, supports, draw)."""

VOLUME_GROUP = ["dataset", "label", "method", "k", "supports"]
VOLUME_SUMMARY_COLUMNS = [*VOLUME_GROUP, "cases", "incomplete", "errors", "dice3d_mean", "hd95_mm_mean",
                          "hd95_mm_nan", "nsd_mm_mean", "nsd_mm_nan"]  # fmt: skip


class CaseStacker:
    """Per-slice predictions of one (dataset, label, method, job) -> one 3D row per case.

    Args:
        dataset: a volume dataset (``case_of``, ``case_stems``, ``case_volume``, ``case_spacing``).
        label: the task's label name; ``method``, ``k``, ``supports``, ``draw``: the row's keys.
        queries: the evaluated stems, in order.
        nsd_tolerance_mm: NSD tolerance in mm.
    """

    def __init__(self, dataset: Any, label: str, method: str, k: Any, supports: str, draw: int,
                 queries: Sequence[str], nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM):
        self.ds, self.tol = dataset, float(nsd_tolerance_mm)
        self.key = {"dataset": dataset.name, "label": label, "method": method, "k": k, "supports": supports, "draw": draw}
        evaluated: dict[str, set[str]] = {}
        for stem in queries:
            evaluated.setdefault(dataset.case_of(stem), set()).add(stem)
        self.cases = list(evaluated)  # first-seen order
        self.total = {c: len(dataset.case_stems(c)) for c in self.cases}
        self.complete = {c for c in self.cases if evaluated[c] == set(dataset.case_stems(c))}
        self.evaluated = {c: len(evaluated[c]) for c in self.cases}
        self.pending: dict[str, dict[str, tuple[np.ndarray, np.ndarray] | None]] = {c: {} for c in self.complete}
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, stem: str, pred: np.ndarray | None, target: np.ndarray, error: str = "") -> None:
        """One slice's binary prediction (None with ``error`` when it failed) and its ground truth."""
        case = self.ds.case_of(stem)
        if case not in self.pending:
            return  # an incomplete case: no 3D figures
        self.pending[case][stem] = None if pred is None else (np.asarray(pred, bool), np.asarray(target, bool))
        if error and case not in self.rows:
            self.rows[case] = self._row(case, error=f"slice {stem}: {error}")
        if len(self.pending[case]) == self.total[case]:
            got = self.pending.pop(case)
            if case not in self.rows:
                self.rows[case] = self._finish(case, got)

    def _finish(self, case: str, got: dict[str, tuple[np.ndarray, np.ndarray] | None]) -> dict[str, Any]:
        stems = self.ds.case_stems(case)
        try:
            pred = self.ds.case_volume(case, [got[s][0] for s in stems])  # type: ignore[index]
            target = self.ds.case_volume(case, [got[s][1] for s in stems])  # type: ignore[index]
            m = volume_metrics(pred, target, self.ds.case_spacing(case), self.tol)
        except Exception as exc:  # noqa: BLE001 - recorded in volumes.csv, the run goes on
            return self._row(case, error=f"{type(exc).__name__}: {exc}"[:500])
        return self._row(case, dice3d=m["dice"], hd95_mm=m["hd95_mm"], nsd_mm=m["nsd_mm"])

    def _row(self, case: str, dice3d: float = math.nan, hd95_mm: float = math.nan, nsd_mm: float = math.nan,
             error: str = "") -> dict[str, Any]:
        return {**self.key, "case": case, "slices": f"{self.evaluated[case]}/{self.total[case]}",
                "dice3d": dice3d, "hd95_mm": hd95_mm, "nsd_mm": nsd_mm, "error": error}

    def finish(self) -> list[dict[str, Any]]:
        """Rows of every case, in order: metrics for complete cases, an explanation for the others."""
        out = []
        for case in self.cases:
            if case in self.rows:
                out.append(self.rows[case])
            elif case in self.complete:  # some slices never reported (the suite stopped early)
                out.append(self._row(case, error="not every slice was predicted"))
            else:
                out.append(self._row(case, error="3D metrics need every slice of the case (cut by --limit)"))
        return out


def volume_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means per (dataset, label, method, k, supports) over complete cases (draws of a case averaged first)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[c]) for c in VOLUME_GROUP), []).append(r)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if not r["error"]]
        per_case: dict[str, list[dict[str, Any]]] = {}
        for r in ok:
            per_case.setdefault(r["case"], []).append(r)
        s: dict[str, Any] = dict(zip(VOLUME_GROUP, key))
        s["cases"] = len(per_case)
        s["incomplete"] = len({r["case"] for r in members if r["error"].startswith("3D metrics need")})
        s["errors"] = len({r["case"] for r in members if r["error"] and not r["error"].startswith("3D metrics need")})
        for m in ("dice3d", "hd95_mm", "nsd_mm"):
            vals = np.array([_nanmean([float(r[m]) for r in v]) for v in per_case.values()], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            s[f"{m}_mean"] = float(finite.mean()) if finite.size else math.nan
            if m != "dice3d":
                s[f"{m}_nan"] = int(vals.size - finite.size)
        out.append(s)
    return out


def volume_markdown(summary: Sequence[dict[str, Any]], nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> str:
    """Markdown table of :func:`volume_summary` with a note on how the figures were made."""
    head = ["dataset", "label", "method", "k", "supports", "cases", "Dice 3D", "HD95 (mm)",
            f"NSD@{nsd_tolerance_mm:g}mm", "NaN HD95/NSD", "incomplete", "errors"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def f(v: float, digits: int = 3) -> str:
        return f"{v:.{digits}f}" if math.isfinite(v) else "–"

    for s in summary:
        cells = [s["dataset"], s["label"], s["method"], str(s["k"]) if s["k"] not in (None, "") else "–", s["supports"],
                 str(s["cases"]), f(s["dice3d_mean"]), f(s["hd95_mm_mean"], 2), f(s["nsd_mm_mean"]),
                 f"{s['hd95_mm_nan']}/{s['nsd_mm_nan']}", str(s["incomplete"]), str(s["errors"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nPer case: the slice predictions stacked back on the case's voxel grid, Dice, HD95 and NSD in mm with "
            "the case's spacing (MONAI; eval.metrics.volume_metrics), mean over cases (per case: rows in volumes.csv). "
            "3D figures need every slice of a case: 'incomplete' counts cases cut by --limit, left out of the means.\n")
    return "\n".join(lines) + "\n" + note
