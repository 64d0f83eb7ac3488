"""P0-P9 text prompts from a mask and its task (seed 000, Poudel et al.; medvlsm's prompts.json).

Levels, each adding one attribute to the one before (alternatives are lists)::

    p0  ""                                              empty prompt
    p1  "polyp"                                         class name
    p2  "round polyp"                                   + shape of the largest component
    p3  "pink round polyp"                              + colour (mean colour under the mask)
    p4  "small pink round polyp"                        + size (tiny/small/medium/large by area)
    p5  "one small pink round polyp"                    + number (connected components)
    p6  "one small pink round polyp, located in top left of the image"   + location (image thirds)
    p7  ["polyp which is <definition>", ...]            class name + each definition
    p8  ["one small pink round polyp which is <definition>", ...]
    p9  ["... which is <definition> located in top left of the image", ...]

The attributes are computed from the ground-truth mask (as in seed 000): they describe the answer,
so P2-P9 are oracle prompts, useful to measure how much a model reads its text. Where a dataset
ships prompts.json (kvasir_seg, cvc_clinicdb), :class:`PromptSampler` uses those alternatives.

Size thresholds were calibrated on the Kvasir/CVC prompts.json labels (their "small" masks cover
1.2-8 % of the image, "medium" 8-30 %, "large" over 30 %); "tiny" (< 1 %) is added for the small
structures of the other datasets.
"""

from __future__ import annotations

import colorsys
import random
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

LEVELS = tuple(f"p{i}" for i in range(10))
SIZE_THRESHOLDS = (0.01, 0.08, 0.30)  # area fraction: tiny < 1% <= small < 8% <= medium < 30% <= large
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LOCATIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))

DEFINITIONS: dict[str, list[str]] = {
    "polyp": [
        "a projecting growth of tissue",
        "often a bumpy flesh in rectum",
        "a small lump in the lining of colon",
        "a tissue growth that often resemble mushroom like stalks",
        "an abnormal growth of tissues projecting from a mucuos membrane",
    ],
    "foot ulcer": [
        "an open sore or wound on the foot",
        "a break in the skin of the foot that heals slowly",
        "a red or dark wound often found on the sole of a diabetic foot",
    ],
    "breast tumour": [
        "an abnormal mass of tissue in the breast",
        "a lump that looks like a dark region in a breast ultrasound",
        "a growth of abnormal cells in the breast",
    ],
    "fetal head": [
        "the head of the unborn baby",
        "an elliptical bright outline of the skull of the fetus",
        "the skull of the fetus seen in a prenatal ultrasound",
    ],
    "right ventricle cavity": [
        "the blood pool inside the right ventricle of the heart",
        "the chamber of the heart that pumps blood to the lungs",
    ],
    "left ventricle myocardium": [
        "the muscular wall of the left ventricle",
        "a ring of heart muscle around the left ventricle",
    ],
    "left ventricle cavity": [
        "the blood pool inside the left ventricle of the heart",
        "the chamber of the heart that pumps blood to the body",
    ],
    "cytoplasm": [
        "the material inside a white blood cell around its nucleus",
        "the lightly stained body of a white blood cell",
    ],
    "nucleus": [
        "the dark stained core of a white blood cell",
        "the part of a white blood cell that holds its genetic material",
    ],
}
_IRREGULAR_PLURALS = {"nucleus": "nuclei", "cavity": "cavities", "myocardium": "myocardia"}


@dataclass(frozen=True)
class MaskAttributes:
    """Attributes of a binary mask used by the prompt levels (None where undefined: empty mask)."""

    count: int  # connected components (8-connected, specks < min_component_fraction of the largest dropped)
    number: str  # "no", "one", ..., "ten", "many"
    size: str | None  # tiny / small / medium / large
    shape: str | None  # round / oval / elongated / ring-shaped / irregular
    colour: str | None  # colour name (RGB) or bright / dark / gray (grayscale)
    locations: tuple[str, ...]  # one per component, largest first, duplicates removed
    area_fraction: float


def number_word(n: int) -> str:
    """0 -> "no", 1..10 -> words, more -> "many"."""
    if n < 0:
        raise ValueError(f"count must be non-negative, got {n}")
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else "many"


def size_word(fraction: float) -> str:
    """Area fraction of the image in (0, 1] -> tiny / small / medium / large."""
    tiny, small, medium = SIZE_THRESHOLDS
    if fraction < tiny:
        return "tiny"
    if fraction < small:
        return "small"
    if fraction < medium:
        return "medium"
    return "large"


def location_word(cy: float, cx: float) -> str:
    """Relative centroid (row, col) in [0, 1] -> name of its cell in a 3x3 grid of image thirds."""
    row = min(int(cy * 3), 2)
    col = min(int(cx * 3), 2)
    return LOCATIONS[row][col]


def shape_word(component: np.ndarray) -> str:
    """Shape of one connected component (H, W) bool.

    ring-shaped if it encloses a hole (filled area > 1.15 x area); else from the axis ratio of the
    second moments (elongated >= 2.5, oval >= 1.35) and the circularity 4 pi A / P^2 (round >= 0.7,
    with P the 4-connected boundary length scaled by pi/4 so that a digital disc scores ~1).
    """
    area = float(component.sum())
    if area < 4:
        return "round"
    filled = ndimage.binary_fill_holes(component)
    if filled.sum() > 1.15 * area:
        return "ring-shaped"
    ys, xs = np.nonzero(component)
    cov = np.cov(np.stack([ys, xs]).astype(np.float64))
    ev = np.sort(np.linalg.eigvalsh(cov))
    ratio = float(np.sqrt(ev[1] / max(ev[0], 1e-6)))
    if ratio >= 2.5:
        return "elongated"
    if ratio >= 1.35:
        return "oval"
    padded = np.pad(component, 1).astype(np.int8)
    perimeter = np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum()
    circularity = 4 * np.pi * area / max((perimeter * np.pi / 4) ** 2, 1e-6)
    return "round" if circularity >= 0.7 else "irregular"


def colour_word(image: Image.Image | np.ndarray, mask: np.ndarray) -> str:
    """Name of the mean colour under the mask.

    RGB: HSV rules (black / white / gray by value and saturation, else red, orange, brown, yellow,
    green, blue, purple, pink by hue). Grayscale (or RGB with equal channels): "bright" / "dark" /
    "gray" by the mean intensity inside versus outside the mask.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[:2] != mask.shape:
        raise ValueError(f"image size {arr.shape[:2]} differs from mask size {mask.shape}")
    arr = arr / 255.0
    inside = arr[mask].mean(0)
    grayscale = np.allclose(arr[..., 0], arr[..., 1], atol=2 / 255) and np.allclose(arr[..., 1], arr[..., 2], atol=2 / 255)
    if grayscale:
        outside = arr[~mask].mean() if (~mask).any() else 0.5
        diff = float(inside.mean() - outside)
        return "bright" if diff > 0.08 else "dark" if diff < -0.08 else "gray"
    h, s, v = colorsys.rgb_to_hsv(*inside.tolist())
    hue = h * 360
    if v < 0.2:
        return "black"
    if s < 0.15:
        return "white" if v > 0.75 else "gray"
    if hue < 15 or hue >= 345:
        return "pink" if (s < 0.45 and v > 0.6) else "brown" if v < 0.45 else "red"
    if hue < 40:
        return "brown" if v < 0.55 else "orange"
    if hue < 70:
        return "yellow"
    if hue < 170:
        return "green"
    if hue < 260:
        return "blue"
    if hue < 300:
        return "purple"
    return "pink"


def describe_mask(
    mask: np.ndarray, image: Image.Image | np.ndarray | None = None, min_component_fraction: float = 0.1
) -> MaskAttributes:
    """Compute the prompt attributes of a binary mask.

    Args:
        mask: (H, W) bool / {0, 1}.
        image: the image at the mask's size (for the colour); colour is None without it.
        min_component_fraction: components smaller than this fraction of the largest are ignored
            (annotation specks), as a clinician would count them.

    Returns:
        The :class:`MaskAttributes`.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if not mask.any():
        return MaskAttributes(0, "no", None, None, None, (), 0.0)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    keep = [i + 1 for i in np.argsort(-sizes) if sizes[i] >= min_component_fraction * sizes.max()]
    h, w = mask.shape
    locations: list[str] = []
    for lab in keep:
        ys, xs = np.nonzero(labels == lab)
        loc = location_word((ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w)
        if loc not in locations:
            locations.append(loc)
    fraction = float(mask.mean())
    return MaskAttributes(
        count=len(keep),
        number=number_word(len(keep)),
        size=size_word(fraction),
        shape=shape_word(labels == keep[0]),
        colour=colour_word(image, mask) if image is not None else None,
        locations=tuple(locations),
        area_fraction=fraction,
    )


def pluralize(noun_phrase: str) -> str:
    """Plural of the last word of a phrase ("foot ulcer" -> "foot ulcers", "nucleus" -> "nuclei")."""
    head, _, last = noun_phrase.rpartition(" ")
    if last.lower() in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[last.lower()]
    elif last.endswith(("s", "x", "ch", "sh")):
        plural = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def definitions_for(class_name: str, modality: str = "medical") -> list[str]:
    """Definitions of a class for P7-P9 (a generic one for classes not in :data:`DEFINITIONS`)."""
    key = class_name.lower().replace("tumor", "tumour")
    return list(DEFINITIONS.get(key, [f"the structure of interest in this {modality} image"]))


def generate_prompts(
    mask: np.ndarray,
    class_name: str,
    image: Image.Image | np.ndarray | None = None,
    modality: str = "medical",
    definitions: list[str] | None = None,
) -> dict[str, list[str]]:
    """P0-P9 prompts of one mask (each level a list of alternatives, most with one).

    Args:
        mask: (H, W) binary mask of the target.
        class_name: task class name, e.g. "polyp".
        image: the image (for the colour attribute); without it the colour word is left out.
        modality: used by the generic definition of an unknown class.
        definitions: definitions for P7-P9 (default :func:`definitions_for`).

    Returns:
        ``{"p0": [""], "p1": ["polyp"], ..., "p9": [...]}``. An empty mask gives "no polyp" from P5 on
        and no shape, colour, size or location words.
    """
    if not class_name.strip():
        raise ValueError("class_name must be non-empty")
    attrs = describe_mask(mask, image)
    defs = definitions if definitions is not None else definitions_for(class_name, modality)
    if not defs:
        raise ValueError("definitions must be non-empty")
    if attrs.count == 0:
        p2 = p3 = p4 = class_name
        p5 = p6 = f"no {class_name}"
        where = ""
    else:
        p2 = f"{attrs.shape} {class_name}"
        p3 = f"{attrs.colour} {p2}" if attrs.colour else p2
        p4 = f"{attrs.size} {p3}"
        noun = p4 if attrs.count == 1 else pluralize(p4)
        p5 = f"{attrs.number} {noun}"
        where = f"located in {', '.join(attrs.locations)} of the image"
        p6 = f"{p5}, {where}"
    p8 = [f"{p5} which is {d}" for d in defs]
    return {
        "p0": [""],
        "p1": [class_name],
        "p2": [p2],
        "p3": [p3],
        "p4": [p4],
        "p5": [p5],
        "p6": [p6],
        "p7": [f"{class_name} which is {d}" for d in defs],
        "p8": p8,
        "p9": [f"{p} {where}" if where else p for p in p8],
    }


class PromptSampler:
    """Picks one prompt per (sample, level), deterministic under a seed.

    prompts.json alternatives (``dataset.prompts(stem)``) are used for single-label datasets that ship
    them; otherwise :func:`generate_prompts` computes them from the mask. The choice among
    alternatives and, when several ``levels`` are given, of the level, is drawn from a generator seeded
    by ``crc32(seed, dataset, stem, label, epoch)`` (stable across processes, unlike ``hash``).
    """

    def __init__(self, levels: str | list[str] = "p1", seed: int = 0, use_prompts_json: bool = True):
        levels = [levels] if isinstance(levels, str) else list(levels)
        unknown = [lv for lv in levels if lv not in LEVELS]
        if not levels or unknown:
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
        self.levels, self.seed, self.use_prompts_json = levels, int(seed), use_prompts_json

    def _rng(self, *key: object) -> random.Random:
        return random.Random(zlib.crc32("/".join(map(str, (self.seed, *key))).encode()))

    def prompts(self, sample, dataset=None) -> dict[str, list[str]]:
        """All levels for a :class:`segicl.data.Sample` (prompts.json entries win where present)."""
        generated = generate_prompts(sample.mask, sample.label, sample.image, sample.modality)
        if self.use_prompts_json and dataset is not None and len(getattr(dataset, "labels", {})) == 1:
            given = dataset.prompts(sample.stem) or {}
            for level, texts in given.items():
                if level in generated and texts:
                    generated[level] = list(texts)
        return generated

    def __call__(self, sample, dataset=None, epoch: int = 0) -> str:
        """One prompt for ``sample``: a level from ``levels``, then one of its alternatives."""
        rng = self._rng(sample.dataset, sample.stem, sample.label_value, epoch)
        level = rng.choice(self.levels)
        return rng.choice(self.prompts(sample, dataset)[level])
