"""Shared by the ``segicl annotate`` tests: small synthetic images, a stand-in segmenter, an in-process
server and JSON helpers.

The stand-in has the API of :class:`segicl.interactive.InteractiveSegmenter` and answers in
microseconds with a rule the tests can check: foreground is a disc of radius :data:`RADIUS` around every
positive point and scribble point, every box filled, minus a disc around every negative point / scribble
point; with no interactions it returns the union of the context masks (empty when there is none);
the uncertainty map is the image's brightness (so ``--order uncertain`` picks the brightest image).
"""

from __future__ import annotations

import json
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

RADIUS = 8
SIZE = 64


class StubInteractions(SimpleNamespace):
    """Stand-in for ``segicl.interactive.Interactions`` (the five lists as attributes)."""

    @classmethod
    def from_dict(cls, d: dict) -> StubInteractions:
        return cls(**{k: list(v) for k, v in d.items()})


class StubSegmenter:
    def __init__(self):
        self.context: dict[str, np.ndarray] = {}
        self.calls = 0

    @property
    def context_keys(self) -> list[str]:
        return list(self.context)

    def add_context(self, image: Image.Image, mask: np.ndarray, key: str) -> None:
        assert mask.dtype == bool and mask.shape == (image.height, image.width)
        self.context[key] = mask

    def predict(self, image: Image.Image, ints: StubInteractions, key: str) -> SimpleNamespace:
        self.calls += 1
        h, w = image.height, image.width
        yy, xx = np.mgrid[:h, :w]

        def discs(points) -> np.ndarray:
            m = np.zeros((h, w), bool)
            for y, x in points:
                m |= (yy - y) ** 2 + (xx - x) ** 2 <= RADIUS**2
            return m

        pos = discs(ints.pos_points + [p for s in ints.pos_scribbles for p in s])
        for y0, x0, y1, x1 in ints.boxes:
            pos[y0:y1 + 1, x0:x1 + 1] = True
        neg = discs(ints.neg_points + [p for s in ints.neg_scribbles for p in s])
        if not pos.any() and not neg.any() and self.context:
            pos = np.logical_or.reduce([m for m in self.context.values() if m.shape == (h, w)] or [pos])
        mask = pos & ~neg
        unc = np.asarray(image.convert("L"), np.float32) / 255.0
        return SimpleNamespace(prob=mask.astype(np.float32), mask=mask, uncertainty=unc, seconds=0.0)


def stub_backend(text: str):
    return StubSegmenter(), StubInteractions.from_dict


def write_images(folder: Path, n: int = 4, bad: bool = True) -> list[str]:
    """``n`` 64 x 64 grayscale PNGs (a bright disc on a dark background, image i brighter than i - 1), a
    broken PNG and a text file; returns the good file names in sorted order."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    names = []
    for i in range(n):
        arr = np.full((SIZE, SIZE), 20 + 10 * i, np.uint8)
        arr[(yy - 32) ** 2 + (xx - 20 - 6 * i) ** 2 <= 100] = 200
        name = f"img{i:02d}.png"
        Image.fromarray(arr, "L").save(folder / name)
        names.append(name)
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        (folder / "readme.txt").write_text("not an image")
    return names


@contextmanager
def serve(images_dir: Path, out_dir: Path, **session_kw):
    """An in-process server on 127.0.0.1:0 with a stand-in segmenter; yields (url, annotator)."""
    from segicl.annotate.app import Annotator, AppServer
    from segicl.annotate.state import Session

    seg, parse = stub_backend("")
    app = Annotator(Session(images_dir, out_dir, **session_kw), seg, parse)
    server = AppServer(app, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url, app
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def get(url: str, headers: dict | None = None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        body = r.read()
        return json.loads(body) if r.headers.get("Content-Type") == "application/json" else body


def post(url: str, body: dict, content_type: str = "application/json") -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def decode_mask(data_url: str) -> np.ndarray:
    import base64
    import io

    head, b64 = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 0
