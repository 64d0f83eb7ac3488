"""The bad-input sweep (issue 19): every case below runs the real ``segicl`` command line in-process.

A rejected case exits non-zero with ONE stderr line naming the file (or option) and the problem, no
traceback, and leaves no output behind; an accepted case exits 0 with the one-line note listed. The
commands and messages are the table of docs/reliability.md (``<tmp>`` is the test's temporary folder);
``python -m tests.test_bad_input`` prints that table, and a test checks that the doc lists every row.

Every case starts from a tiny dataset ``<tmp>/toy`` (4 demo ultrasound pairs: 3 train, 1 test), the
query ``<tmp>/q.png``, the support pair ``<tmp>/s.png`` + ``<tmp>/m.png``; ``<tmp>/store`` (a pixel
store of toy's 3 train pairs) and ``<tmp>/ckpt`` (a copy of the shipped checkpoint) where a case asks.
SegICL itself is a test double (``FakePipeline``) except for ``--checkpoint <tmp>/ckpt``, which goes
through the real loader: every checkpoint case must be refused before any weight is read.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "segicl" / "assets" / "demo" / "busbra_breast_us"
TRAIN, TEST = ["bus_0002-l", "bus_0003-l", "bus_0004-l"], ["bus_0001-l"]
DOC = REPO / "docs" / "reliability.md"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------ files
def _toy(root: Path, base: Path | None = None) -> None:
    """<root>/toy (the dataset), q.png (query), s.png + m.png (a support pair)."""
    toy = root / "toy"
    if base is not None:
        shutil.copytree(base / "toy", toy)
    else:
        for sub in ("images", "masks"):
            (toy / sub).mkdir(parents=True)
            for stem in TRAIN + TEST:
                shutil.copy(DEMO / sub / f"{stem}.png", toy / sub / f"{stem}.png")
        meta = json.loads((DEMO / "dataset.json").read_text())
        meta.update(name="toy", splits={"train": TRAIN, "test": TEST}, groups={})
        (toy / "dataset.json").write_text(json.dumps(meta, indent=1))
    shutil.copy(toy / "images" / f"{TEST[0]}.png", root / "q.png")
    shutil.copy(toy / "images" / f"{TRAIN[0]}.png", root / "s.png")
    shutil.copy(toy / "masks" / f"{TRAIN[0]}.png", root / "m.png")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    """One byte changed in the middle, size unchanged (a tampered or bit-rotted file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _bomb(path: Path, w: int = 30000, h: int = 30000) -> None:
    """A 57-byte PNG whose header claims w x h pixels (no pixel data: opening it must not allocate)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def _mask(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def _support_mask(t: Path) -> np.ndarray:
    return np.asarray(Image.open(t / "m.png"))


def _rgb_grey(t: Path) -> None:
    m = _support_mask(t)
    _mask(t / "m.png", np.stack([m, m, m], -1))


def _rgb_colour(t: Path) -> None:
    _mask(t / "m.png", np.asarray(Image.open(t / "s.png").convert("RGB")) // 2 + np.array([100, 0, 0], np.uint8))


def _three_values(t: Path) -> None:
    m = _support_mask(t).copy()
    rows = np.nonzero(m.any(1))[0]
    m[rows[: len(rows) // 2]] = np.where(m[rows[: len(rows) // 2]] > 0, 128, 0)
    _mask(t / "m.png", m)


def _nan_tiff(t: Path) -> None:
    a = np.asarray(Image.open(t / "q.png"), np.float32) / 255
    a[10, 10], a[20, 20] = np.nan, np.inf
    Image.fromarray(a).save(t / "q.tif")


def _store(t: Path, base: Path) -> None:
    shutil.copytree(base / "store", t / "store")


def _old_embedder_store(t: Path, base: Path) -> None:
    """The store as an older pixel embedder (id pixel-v0-s16) would have written it, consistent in itself."""
    from retrieval.store import SupportStore

    s = SupportStore.load(base / "store")
    s.embedder_id = "pixel-v0-s16"
    for r in s.records:
        r.embedder_id = "pixel-v0-s16"
    s.save(t / "store")


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _ckpt(t: Path) -> Path:
    from segicl.pipeline import default_checkpoint

    shutil.copytree(default_checkpoint(), t / "ckpt")
    return t / "ckpt"


def _unlisted(t: Path) -> None:
    ck = _ckpt(t)
    d = json.loads((ck / "manifest.json").read_text())
    del d["files"]["decoder.safetensors"]
    (ck / "manifest.json").write_text(json.dumps(d))
    _flip(ck / "decoder.safetensors")


def _earlier_segment(t: Path) -> None:
    (t / "seg").mkdir()
    (t / "seg" / "q.png").write_bytes(b"earlier mask")
    (t / "seg" / "segment.json").write_text("earlier")


def _earlier_kept(t: Path) -> None:
    assert (t / "seg" / "segment.json").read_text() == "earlier"
    assert (t / "seg" / "q.png").read_bytes() == b"earlier mask"


def _replaced(t: Path) -> None:
    assert json.loads((t / "seg" / "segment.json").read_text())["queries"][0]["stem"] == "q"
    assert Image.open(t / "seg" / "q.png").size == Image.open(t / "q.png").size


def _read_only(t: Path) -> None:
    (t / "ro").mkdir()
    (t / "ro").chmod(0o555)


def _traversal(t: Path) -> None:
    _edit_json(t / "toy" / "dataset.json", splits={"train": [*TRAIN, "../../x"], "test": TEST})


def _traversal_test(t: Path) -> None:
    _edit_json(t / "toy" / "dataset.json", splits={"train": TRAIN, "test": ["../../x"]})


def _killed_store_save(t: Path) -> None:
    """What a kill during ``SupportStore.save`` leaves: a half-written hidden temp folder beside --out."""
    tmp = t / ".store.k1ll3d.tmp"
    tmp.mkdir()
    (tmp / "index.faiss").write_bytes(b"\0" * 100)
    old = time.time() - 60
    os.utime(tmp, (old, old))


def _rebuilt_cleanly(t: Path) -> None:
    from retrieval.store import SupportStore

    assert len(SupportStore.load(t / "store")) == 3
    assert sorted(p.name for p in t.iterdir() if p.name.startswith(".")) == []  # the stale temp folder is gone


def _store_loads(t: Path) -> None:
    from retrieval.store import SupportStore

    assert len(SupportStore.load(t / "store")) == 3


def _earlier_results(t: Path) -> None:
    (t / "ev").mkdir()
    (t / "ev" / "results.csv").write_text("earlier")


def _results_kept(t: Path) -> None:
    assert (t / "ev" / "results.csv").read_text() == "earlier"


def _earlier_run(t: Path) -> None:
    (t / "run" / "checkpoints" / "step_0000002").mkdir(parents=True)
    (t / "run" / "log.csv").write_text("step,loss\n1,0.5\n2,0.4\n")


def _earlier_run_kept(t: Path) -> None:
    assert (t / "run" / "checkpoints" / "step_0000002").is_dir() and (t / "run" / "log.csv").stat().st_size > 0


def _killed_training(t: Path) -> None:
    """What a kill during the first checkpoint save leaves: a half-written hidden temp checkpoint."""
    tmp = t / "run" / "checkpoints" / ".tmp-step_0000001"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"\0" * 10)


def _trained_cleanly(t: Path) -> None:
    ckpts = t / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001", "step_0000002"]  # the partial one is gone
    assert (ckpts / "step_0000002" / "checksums.json").is_file()
    assert (t / "run" / "model" / "manifest.json").is_file()
    assert (t / "run" / "log.csv").read_text().splitlines()[-1].split(",")[0] == "2"


def _tampered_training_checkpoint(t: Path) -> None:
    import hashlib

    ck = t / "run" / "checkpoints" / "step_0000002"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"modified after the save")
    sums = {"model.safetensors": hashlib.sha256(b"what the save wrote").hexdigest()}
    (ck / "checksums.json").write_text(json.dumps(sums))


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    id: str
    command: str  # the arguments after ``segicl``; <tmp> is the case's temporary folder
    exit: int
    message: str  # the exact stderr (one line; "" = nothing), <tmp> for the temporary folder
    setup: Callable[..., None] | None = None  # setup(t) or setup(t, base)
    absent: tuple[str, ...] = ()  # paths under <tmp> that must not exist afterwards
    check: Callable[[Path], None] | None = None
    outcome: str = "rejected"
    needs_write_protection: bool = False  # skipped where permissions are not enforced (root)


SEG = "segment --image <tmp>/q.png --out <tmp>/seg"
SUP = "segment --image <tmp>/q.png --support <tmp>/s.png:<tmp>/m.png --text tumour --out <tmp>/seg"
STORE = "segment --image <tmp>/q.png --store <tmp>/store --out <tmp>/seg"
CKPT = "segment --image <tmp>/q.png --checkpoint <tmp>/ckpt --out <tmp>/seg"
INDEX = "index build --data <tmp>/toy --out <tmp>/store --no-progress"
TRAIN_RUN = ("train stage1 --config configs/train/tiny_stage1.yaml --data <tmp>/toy --out <tmp>/run --max-steps 2 "
             "--no-progress --set train.batch_size=2 --set train.ckpt_every=1 --set train.val_every=0 "
             "--set train.num_workers=0 --set data.cache_dir=null")
EVAL = "evaluate --data <tmp>/toy --methods labelprop --k 1 --out <tmp>/ev --no-progress"
BOMB = ("refused as a decompression bomb (Image size (900000000 pixels) exceeds limit of 178956970 pixels, "
        "could be decompression bomb DOS attack.)")
NO_SEG, NO_STORE, NO_EV = ("seg",), ("store",), ("ev",)
ACCEPTED = "accepted, warns"

CASES = [
    # --- query images
    Case("image-0-byte", SEG, 1, "segicl segment: <tmp>/q.png: empty file (0 bytes), not an image",
         lambda t: (t / "q.png").write_bytes(b""), NO_SEG),
    Case("image-truncated", SEG, 1, "segicl segment: <tmp>/q.png: unreadable or truncated image (image file is truncated)",
         lambda t: _truncate(t / "q.png"), NO_SEG),
    Case("image-not-an-image", SEG, 1, "segicl segment: <tmp>/q.png: unreadable image (not a format PIL recognises)",
         lambda t: (t / "q.png").write_text("notes, not pixels"), NO_SEG),
    Case("image-30000x30000", SEG, 1, f"segicl segment: <tmp>/q.png: {BOMB}", lambda t: _bomb(t / "q.png"), NO_SEG),
    Case("image-float-nan-inf", "segment --image <tmp>/q.tif --out <tmp>/seg", 1,
         "segicl segment: <tmp>/q.tif: float image with 2 NaN or inf pixel(s)", _nan_tiff, NO_SEG),
    # --- given supports
    Case("support-image-0-byte", SUP, 1, "segicl segment: <tmp>/s.png: empty file (0 bytes), not an image",
         lambda t: (t / "s.png").write_bytes(b""), NO_SEG),
    Case("support-mask-truncated", SUP, 1,
         "segicl segment: <tmp>/m.png: unreadable or truncated image (image file is truncated)",
         lambda t: _truncate(t / "m.png"), NO_SEG),
    Case("support-mask-not-an-image", SUP, 1, "segicl segment: <tmp>/m.png: unreadable image (not a format PIL recognises)",
         lambda t: (t / "m.png").write_text("{}"), NO_SEG),
    Case("support-mask-30000x30000", SUP, 1, f"segicl segment: <tmp>/m.png: {BOMB}", lambda t: _bomb(t / "m.png"), NO_SEG),
    Case("support-mask-other-size", SUP, 1,
         "segicl segment: <tmp>/m.png: mask size 94x128 differs from <tmp>/s.png size 189x256",
         lambda t: Image.open(t / "m.png").resize((94, 128), Image.Resampling.NEAREST).save(t / "m.png"), NO_SEG),
    Case("support-mask-colour-rgb", SUP, 1, "segicl segment: <tmp>/m.png: colour mask (R, G, B differ: an image given "
         "as the mask?); expected a greyscale or label mask", _rgb_colour, NO_SEG),
    Case("support-mask-grey-rgb", SUP, 0, "segicl segment: <tmp>/m.png: RGB mask with equal channels, read as greyscale",
         _rgb_grey, outcome=ACCEPTED),
    Case("support-mask-0-128-255", SUP, 0, "segicl segment: <tmp>/m.png: mask holds 2 non-zero values (128, 255); all "
         "are the foreground (pass --label VALUE to pick one)", _three_values, outcome=ACCEPTED),
    Case("support-mask-0-128-255-label", SUP + " --label 255", 0, "", _three_values, outcome="accepted (the label picks)"),
    Case("support-mask-all-empty", SUP, 0, "segicl segment: <tmp>/m.png: empty mask (no foreground pixel): this "
         "support shows only background", lambda t: _mask(t / "m.png", np.zeros_like(_support_mask(t))), outcome=ACCEPTED),
    # --- k and the store
    Case("k-0-with-store", STORE + " --k 0", 0, "segicl segment: --k 0 with --store retrieves no supports (zero-shot)",
         _store, outcome=ACCEPTED),
    Case("k-negative", STORE + " --k -1", 1,
         "segicl segment: --k -1: the number of retrieved supports must be >= 0", _store, NO_SEG),
    Case("k-larger-than-store", STORE + " --k 5", 0,
         "segicl segment: --k 5 but <tmp>/store holds 3 supports; using at most 3 per query", _store, outcome=ACCEPTED),
    Case("label-not-in-store", STORE + " --k 2 --label kidney", 1,
         "segicl segment: <tmp>/store: no support matches --label 'kidney' (labels in the store: breast tumour)",
         _store, NO_SEG),
    Case("store-other-embedder-version", STORE, 1,
         "segicl segment: <tmp>/store: embedder 'pixel' now has id 'pixel-v1-s16' but the store was built with "
         "'pixel-v0-s16' (weights or version changed): rebuild the store", _old_embedder_store, NO_SEG),
    Case("store-other-format-version", STORE, 1,
         "segicl segment: <tmp>/store/manifest.json: format version 2 is not supported (expected 1)",
         lambda t, b: (_store(t, b), _edit_json(t / "store" / "manifest.json", format_version=2)), NO_SEG),
    Case("store-index-truncated", STORE, 1, "segicl segment: <tmp>/store/index.faiss: size 2038 differs from the "
         "manifest's 4077 (truncated or replaced)", lambda t, b: (_store(t, b), _truncate(t / "store" / "index.faiss")),
         NO_SEG),
    Case("store-index-tampered", STORE, 1, "segicl segment: <tmp>/store/index.faiss: sha256 differs from the manifest "
         "(corrupted or replaced); rebuild the store", lambda t, b: (_store(t, b), _flip(t / "store" / "index.faiss")),
         NO_SEG),
    Case("store-meta-tampered", STORE, 1, "segicl segment: <tmp>/store/meta.sqlite: sha256 differs from the manifest "
         "(corrupted or replaced); rebuild the store", lambda t, b: (_store(t, b), _flip(t / "store" / "meta.sqlite")),
         NO_SEG),
    Case("store-manifest-missing", STORE, 1, "segicl segment: <tmp>/store/manifest.json: missing (not a support store "
         "folder, or an interrupted write)", lambda t, b: (_store(t, b), (t / "store" / "manifest.json").unlink()),
         NO_SEG),
    Case("index-build-add-other-embedder", "index build --add --embedder pixel:32 --data <tmp>/toy --out <tmp>/store "
         "--no-progress", 1, "segicl index build: <tmp>/store: built with embedder 'pixel', not 'pixel:32'", _store,
         check=_store_loads),
    # --- the SegICL checkpoint
    Case("checkpoint-truncated", CKPT, 1, "segicl segment: <tmp>/ckpt/decoder.safetensors: checksum does not match "
         "manifest.json (corrupted or modified file)", lambda t: _truncate(_ckpt(t) / "decoder.safetensors"), NO_SEG),
    Case("checkpoint-tampered", CKPT, 1, "segicl segment: <tmp>/ckpt/encoder.safetensors: checksum does not match "
         "manifest.json (corrupted or modified file)", lambda t: _flip(_ckpt(t) / "encoder.safetensors"), NO_SEG),
    Case("checkpoint-unlisted-weights", CKPT, 1, "segicl segment: <tmp>/ckpt/decoder.safetensors: not listed in "
         "manifest.json (unverified weights are never loaded)", _unlisted, NO_SEG),
    Case("checkpoint-manifest-truncated", CKPT, 1, "segicl segment: <tmp>/ckpt/manifest.json: not a valid checkpoint "
         "manifest (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
         lambda t: (_ckpt(t) / "manifest.json").write_text("{"), NO_SEG),
    # --- --out
    Case("out-holds-earlier-results", SEG, 1, "segicl segment: <tmp>/seg: holds the outputs of an earlier run (q.png, "
         "segment.json); pass --overwrite or choose another --out", _earlier_segment, check=_earlier_kept),
    Case("out-holds-earlier-results-overwrite", SEG + " --overwrite", 0, "", _earlier_segment, check=_replaced,
         outcome="accepted (asked for)"),
    Case("out-is-a-file", "segment --image <tmp>/q.png --out <tmp>/q.png", 1,
         "segicl segment: <tmp>/q.png: exists and is not a folder"),
    Case("out-under-a-file", "segment --image <tmp>/q.png --out <tmp>/s.png/seg", 1,
         "segicl segment: <tmp>/s.png/seg: cannot write there (<tmp>/s.png is not a writable folder)"),
    Case("out-read-only", "segment --image <tmp>/q.png --out <tmp>/ro/seg", 1,
         "segicl segment: <tmp>/ro/seg: cannot write there (<tmp>/ro is not a writable folder)", _read_only,
         ("ro/seg",), needs_write_protection=True),
    # --- dataset folders: index build
    Case("index-image-0-byte", INDEX, 1, "segicl index build: <tmp>/toy/images/bus_0003-l.png: empty file (0 bytes), "
         "not an image", lambda t: (t / "toy/images/bus_0003-l.png").write_bytes(b""), NO_STORE),
    Case("index-image-truncated", INDEX, 1, "segicl index build: <tmp>/toy/images/bus_0003-l.png: unreadable or "
         "truncated image (image file is truncated)", lambda t: _truncate(t / "toy/images/bus_0003-l.png"), NO_STORE),
    Case("index-mask-not-an-image", INDEX, 1, "segicl index build: <tmp>/toy/masks/bus_0003-l.png: unreadable image "
         "(not a format PIL recognises)", lambda t: (t / "toy/masks/bus_0003-l.png").write_text("x"), NO_STORE),
    Case("index-mask-other-size", INDEX, 1, "segicl index build: <tmp>/toy/masks/bus_0003-l.png: mask size 10x10 "
         "differs from image bus_0003-l.png size 189x256",
         lambda t: _mask(t / "toy/masks/bus_0003-l.png", np.zeros((10, 10), np.uint8)), NO_STORE),
    Case("index-image-30000x30000", INDEX, 1, f"segicl index build: <tmp>/toy/images/bus_0003-l.png: {BOMB}",
         lambda t: _bomb(t / "toy/images/bus_0003-l.png"), NO_STORE),
    Case("index-path-traversal", INDEX, 1, "segicl index build: <tmp>/toy/dataset.json: invalid stem '../../x' (path "
         "separators, '..' and hidden names are not allowed)", _traversal, NO_STORE),
    Case("index-data-missing", "index build --data <tmp>/nope --out <tmp>/store --no-progress", 1,
         "segicl index build: <tmp>/nope: data root not found", None, NO_STORE),
    Case("index-out-foreign-folder", "index build --data <tmp>/toy --out <tmp>/toy --no-progress", 1,
         "segicl index build: <tmp>/toy: exists and holds files other than a support store's (['dataset.json', "
         "'images', 'masks']); refusing to overwrite it", check=lambda t: (t / "toy" / "dataset.json").is_file()),
    Case("index-existing-store-rebuilt", INDEX, 0, "segicl index build: <tmp>/store: replacing the existing store (--add "
         "adds to it instead)", _store, check=_store_loads, outcome="accepted, says so"),
    Case("index-killed-during-save", INDEX, 0, "", _killed_store_save, check=_rebuilt_cleanly,
         outcome="rerun builds cleanly, removes the stale temp folder"),
    # --- dataset folders: evaluate
    Case("evaluate-image-0-byte", EVAL, 1, "segicl evaluate: <tmp>/toy/images/bus_0001-l.png: empty file (0 bytes), "
         "not an image", lambda t: (t / "toy/images/bus_0001-l.png").write_bytes(b""), NO_EV),
    Case("evaluate-image-truncated", EVAL, 1, "segicl evaluate: <tmp>/toy/images/bus_0004-l.png: unreadable or truncated "
         "image (image file is truncated)", lambda t: _truncate(t / "toy/images/bus_0004-l.png"), NO_EV),
    Case("evaluate-mask-not-an-image", EVAL, 1, "segicl evaluate: <tmp>/toy/masks/bus_0001-l.png: unreadable image "
         "(not a format PIL recognises)", lambda t: (t / "toy/masks/bus_0001-l.png").write_text("x"), NO_EV),
    Case("evaluate-path-traversal", EVAL, 1, "segicl evaluate: <tmp>/toy/dataset.json: invalid stem '../../x' (path "
         "separators, '..' and hidden names are not allowed)", _traversal_test, NO_EV),
    Case("evaluate-k-negative", EVAL.replace("--k 1", "--k -1"), 1,
         "segicl evaluate: --k needs non-negative integers, got [-1]", None, NO_EV),
    Case("train-image-0-byte", TRAIN_RUN, 1, "segicl train stage1: <tmp>/toy/images/bus_0003-l.png: empty file "
         "(0 bytes), not an image", lambda t: (t / "toy/images/bus_0003-l.png").write_bytes(b""), ("run",)),
    Case("train-out-holds-earlier-run", TRAIN_RUN, 1, "segicl train stage1: <tmp>/run: holds an earlier run "
         "(checkpoints/step_0000002); pass --resume to continue it or --overwrite to start over", _earlier_run,
         check=_earlier_run_kept),
    Case("train-checkpoint-tampered", TRAIN_RUN + " --resume", 1, "segicl train stage1: "
         "<tmp>/run/checkpoints/step_0000002/model.safetensors: checksum differs (truncated or modified checkpoint); "
         "delete <tmp>/run/checkpoints/step_0000002 to resume from the previous one", _tampered_training_checkpoint,
         ("run/model",)),
    Case("train-killed-during-checkpoint", TRAIN_RUN + " --resume", 0, "", _killed_training, check=_trained_cleanly,
         outcome="rerun starts cleanly, the partial checkpoint is never read and is replaced"),
    Case("evaluate-out-holds-earlier-results", EVAL, 1, "segicl evaluate: <tmp>/ev: holds the results of an earlier run "
         "(results.csv); pass --overwrite or choose another --out", _earlier_results, check=_results_kept),
]


# ------------------------------------------------------------------------------------------ runner
class FakePipeline:
    """TEST DOUBLE for SegICLPipeline: an empty mask per image; it does no segmentation."""

    def __call__(self, images, text=None, supports=None, num_inference_steps=None, num_samples=None, generator=None):
        from types import SimpleNamespace

        probs = [np.zeros((im.size[1], im.size[0]), np.float32) for im in images]
        return SimpleNamespace(masks=[p > 0.5 for p in probs], probabilities=probs, uncertainty=None)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from retrieval.store import SupportStore

    b = tmp_path_factory.mktemp("base")
    _toy(b)
    SupportStore.build([b / "toy"], progress=False).save(b / "store")
    return b


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from segicl.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # what the interpreter does with SystemExit at the top level
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from retrieval import cli as rcli

    if case.needs_write_protection and IS_ROOT:
        pytest.skip("running as root: folder permissions are not enforced")
    monkeypatch.chdir(REPO)
    real_loader = rcli.load_pipeline
    monkeypatch.setattr(rcli, "load_pipeline", lambda ck: FakePipeline() if ck is None else real_loader(ck))
    _toy(tmp_path, base)
    if case.setup is not None:
        n_args = case.setup.__code__.co_argcount
        case.setup(*(tmp_path, base)[:n_args])
    argv = shlex.split(case.command.replace("<tmp>", str(tmp_path)))
    rss, t0 = _maxrss_mb(), time.perf_counter()
    code, _, err = _run(argv, capsys)
    seconds, grew = time.perf_counter() - t0, _maxrss_mb() - rss
    try:
        assert code == case.exit, err
        assert err.replace(str(tmp_path), "<tmp>").splitlines() == ([case.message] if case.message else [])
        assert "Traceback" not in err
        for rel in case.absent:
            assert not (tmp_path / rel).exists(), f"{rel} was created"
        if case.check is not None:
            case.check(tmp_path)
        assert seconds < 30, seconds
        if "30000" in case.id:  # refused from the header: no 30000 x 30000 buffer is ever allocated
            assert seconds < 2 and grew < 100, (seconds, grew)
    finally:
        if case.needs_write_protection:
            (tmp_path / "ro").chmod(0o755)


def test_rejections_name_the_file_or_option() -> None:
    for case in CASES:
        if case.exit:
            assert "<tmp>/" in case.message or " --k " in case.message, case.id
            assert case.message.startswith("segicl "), case.id


def test_as_a_process_the_exit_status_is_1_and_stderr_one_line(tmp_path: Path) -> None:
    """The console script itself (no in-process SystemExit handling): status 1, one line, no traceback."""
    import subprocess

    (tmp_path / "q.png").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "segicl", "segment", "--image", str(tmp_path / "q.png"), "--out",
                           str(tmp_path / "seg")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"segicl segment: {tmp_path / 'q.png'}: empty file (0 bytes), not an image"]
    assert not (tmp_path / "seg").exists()


def test_bomb_header_is_tiny_and_refused_without_decoding(tmp_path: Path) -> None:
    from segicl.data import DataError, open_image

    _bomb(tmp_path / "big.png")
    assert (tmp_path / "big.png").stat().st_size < 100
    t0 = time.perf_counter()
    for decode in (False, True):
        with pytest.raises(DataError, match="decompression bomb"):
            open_image(tmp_path / "big.png", decode=decode)
    assert time.perf_counter() - t0 < 1


# ------------------------------------------------------------------------------------------ the doc
def doc_rows() -> list[str]:
    """The rows of the docs/reliability.md table, one per case."""
    rows = []
    for c in CASES:
        msg = f"`{c.message}`" if c.message else "(nothing)"
        rows.append(f"| `{c.id}` ({c.outcome}) | `segicl {c.command}` | {c.exit} | {msg} |".replace("||", "|"))
    return rows


def test_reliability_doc_lists_every_case() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [row for row in doc_rows() if row not in text]
    assert not missing, "docs/reliability.md is out of date (python -m tests.test_bad_input prints the table):\n" + "\n".join(missing)


if __name__ == "__main__":
    print("| case | command | exit | message |\n|---|---|---|---|")
    print("\n".join(doc_rows()))
