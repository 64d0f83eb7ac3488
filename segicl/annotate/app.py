"""``segicl annotate``: a local browser app to segment a folder of images with clicks, boxes and scribbles,
every accepted image joining the in-context model's context for the next ones.

    segicl annotate IMAGES_DIR --out OUT_DIR [--text "the polyp"] [--order uncertain] [--no-browser]
    segicl annotate IMAGES_DIR --out OUT_DIR --export nnunet|segicl --export-to DIR

The server is the standard library's ``ThreadingHTTPServer`` bound to 127.0.0.1 only, with a small
JSON API (docs/annotate.md); the page (``static/``) is plain HTML + JavaScript + a canvas, no
external asset. Requests are served one at a time under a lock (one local user; the model is not
re-entrant). Requests whose Host header is not this server's (DNS rebinding) are refused, and POSTs
must be ``application/json`` (a cross-site form cannot send that without a CORS preflight, which is
never granted).

API (all JSON unless said)::

    GET  /                      the page;  GET /static/<file>  its assets
    GET  /api/state             images, errors, accepted, current image, its pending interactions, progress
    GET  /api/image?name=N      image N as PNG
    POST /api/predict           {"image": N, "interactions": {...}} -> {"mask": "data:image/png;base64,...",
                                "seconds", "area", "uncertainty"}; the interactions are kept as pending
    POST /api/accept            {"image": N, "interactions": {...}} -> writes masks/<stem>.png, adds it to
                                the context, opens the next image; returns the new state (N must be the
                                open image, else 409: a double click does not accept twice)
    POST /api/skip              {"image": N} -> opens the next image; returns the new state
    POST /api/goto              {"image": N} -> opens image N (an accepted one with the interactions it was
                                accepted with; accepting it again replaces its mask); returns the new state
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from segicl.annotate.state import ORDERS, Session, SessionError, mask_png, read_mask

HOST = "127.0.0.1"
STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
INTERACTION_KEYS = ("pos_points", "neg_points", "boxes", "pos_scribbles", "neg_scribbles")
UNCERTAIN_CANDIDATES = 16
"""``--order uncertain`` predicts at most this many remaining images to pick the least certain one ..."""
UNCERTAIN_SECONDS = 3.0
"""... and stops after this long (a prediction after a context change costs ~0.8 s at 256 px on 2 cores)."""
NO_INTERACTIONS = {k: [] for k in INTERACTION_KEYS}
MAX_BODY = 4 << 20


def clean_interactions(d: dict | None, hw: tuple[int, int]) -> dict:
    """Interactions from the page, checked: known keys only, integer (row, col) pixels clipped to the
    image, boxes ordered (y0 <= y1, x0 <= x1), scribbles with at least one point.

    Raises:
        ValueError: not a dict of lists of coordinates.
    """
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError("interactions must be an object")
    unknown = set(d) - set(INTERACTION_KEYS)
    if unknown:
        raise ValueError(f"unknown interaction kinds {sorted(unknown)}; known: {list(INTERACTION_KEYS)}")
    h, w = hw

    def point(p) -> list[int]:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"a point is [row, col], got {p!r}")
        y, x = (int(round(float(v))) for v in p)
        return [min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    out: dict[str, list] = {}
    for key in INTERACTION_KEYS:
        items = d.get(key) or []
        if not isinstance(items, list):
            raise ValueError(f"{key} must be a list")
        if key.endswith("points"):
            out[key] = [point(p) for p in items]
        elif key == "boxes":
            boxes = []
            for b in items:
                if not isinstance(b, (list, tuple)) or len(b) != 4:
                    raise ValueError(f"a box is [y0, x0, y1, x1], got {b!r}")
                (y0, x0), (y1, x1) = point(b[:2]), point(b[2:])
                boxes.append([min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)])
            out[key] = boxes
        else:
            out[key] = [[point(p) for p in s] for s in items if isinstance(s, list) and s]
    return out


class StaleRequest(SessionError):
    """An accept or skip of an image that is not the open one (HTTP 409)."""


def click_net_for(click_model: str | None):
    """The interactive network of ``--click-model``: ``auto`` (the shipped one when the package has
    it), ``shipped``, ``none``, or a folder saved by ``segicl train click``."""
    from segicl.click_net import ClickNet, shipped_click_checkpoint

    if click_model in (None, "none"):
        return None
    if click_model == "auto":
        path = shipped_click_checkpoint(required=False)
        return None if path is None else ClickNet.from_pretrained(path)
    return ClickNet.from_pretrained(shipped_click_checkpoint() if click_model == "shipped" else click_model)


def default_backend(text: str, model: str | None = None, click_model: str | None = "auto"):
    """The interactive segmenter of :mod:`segicl.interactive` and its ``Interactions``: the context
    prior training-free, or with ``model`` (a checkpoint folder, or ``shipped``) the SegICL pipeline's
    prediction from the 5 nearest accepted images (better proposals, 1-4 s each on 2 cores: see
    docs/interactive.md); ``text`` ("the polyp") becomes its instruction. Clicks, boxes and scribbles
    go through the interactive network of ``click_model`` (:func:`click_net_for`) and the random walker."""
    from segicl.interactive import Interactions, InteractiveConfig, InteractiveSegmenter

    net = click_net_for(click_model)
    if model is None:
        return InteractiveSegmenter(InteractiveConfig(), click_net=net), Interactions.from_dict
    from segicl.pipeline import SegICLPipeline, default_checkpoint

    pipe = SegICLPipeline.from_pretrained(default_checkpoint() if model == "shipped" else model)
    instruction = f"Segment {text.strip().rstrip('.')}." if text and text.strip() else ""
    return (InteractiveSegmenter(InteractiveConfig(), pipeline=pipe, text=instruction, click_net=net),
            Interactions.from_dict)


class Annotator:
    """The app's state behind the HTTP API: a :class:`Session`, a segmenter and its context.

    Args:
        session: the opened session (its accepted masks are added to the segmenter's context here).
        segmenter: has ``add_context(image, mask, key)``, ``predict(image, interactions, key)`` and
            ``context_keys`` (:class:`segicl.interactive.InteractiveSegmenter`).
        parse: turns a cleaned interactions dict into what ``predict`` takes (``Interactions.from_dict``).
    """

    def __init__(self, session: Session, segmenter, parse: Callable[[dict], object]):
        self.session = session
        self.segmenter = segmenter
        self.parse = parse
        self.lock = threading.RLock()
        self.last_seconds: float | None = None
        self.proposal = ""  # why the open image was proposed (--order uncertain)
        self._images: OrderedDict[str, object] = OrderedDict()
        self._last: tuple | None = None  # (key, output) of the last prediction
        self._context_version = 0  # bumped by every add_context (re-accepting replaces an entry)
        if session.accepted:
            print(f"segicl annotate: adding the {len(session.accepted)} accepted masks to the context ...", flush=True)
        for name in list(session.accepted):
            if name not in session.paths:
                session.notes.append(f"{name}: accepted, but the image is no longer in {session.images_dir}; "
                                     "not in the context")
                continue
            image = self.image(name)
            if image is not None:
                self._add_context(name, image, read_mask(session.mask_path(name)))
        if session.current is None:
            self.advance(None)

    def _add_context(self, name: str, image, mask: np.ndarray) -> None:
        self.segmenter.add_context(image, mask, key=name)
        self._context_version += 1

    # ------------------------------------------------------------------------------ images
    def image(self, name: str):
        """The decoded image (L or RGB), or None when it fails to decode (it is then left out, with an error)."""
        if name in self._images:
            self._images.move_to_end(name)
            return self._images[name]
        img = self.session.load_image(name)
        if img is None:
            return None
        self._images[name] = img
        while len(self._images) > 8:
            self._images.popitem(last=False)
        return img

    def image_png(self, name: str) -> bytes:
        import io

        img = self.image(name)
        if img is None:
            raise SessionError(f"{name}: unreadable image (left out)")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    # ------------------------------------------------------------------------------ model
    def _check(self, name: str) -> None:
        if name not in self.session.paths:
            raise SessionError(f"{name!r}: not an image of this session")

    def predict(self, name: str, interactions: dict | None):
        """The prediction for ``name`` with these interactions and the current context (cached for a repeat)."""
        self._check(name)
        img = self.image(name)
        if img is None:
            if self.session.current is None:
                self.advance(name)
            raise SessionError(f"{name}: unreadable image, left out (see the list of left-out files)")
        ints = clean_interactions(interactions, (img.height, img.width))
        key = (name, json.dumps(ints, sort_keys=True), self._context_version)
        if self._last is not None and self._last[0] == key:
            return ints, self._last[1]
        t0 = time.perf_counter()
        out = self.segmenter.predict(img, self.parse(ints), key=name)
        self.last_seconds = time.perf_counter() - t0
        mask = np.asarray(out.mask, bool)
        if mask.shape != (img.height, img.width):
            raise RuntimeError(f"segmenter returned a {mask.shape} mask for a {img.height}x{img.width} image")
        self._last = (key, out)
        return ints, out

    def advance(self, after: str | None) -> None:
        """Open the next image: the first remaining one after ``after`` in file order, or with
        ``--order uncertain`` (and some context) the one with the highest mean uncertainty of its
        prediction without interactions among the next :data:`UNCERTAIN_CANDIDATES` remaining ones,
        evaluated in file order until :data:`UNCERTAIN_SECONDS` have passed (at least two)."""
        cands = self.session.candidates(after)
        pick = cands[0] if cands else None
        self.proposal = ""
        if self.session.order == "uncertain" and len(cands) > 1 and self.segmenter.context_keys:
            best, n, t0 = -1.0, 0, time.perf_counter()
            for name in cands[:UNCERTAIN_CANDIDATES]:
                if n >= 2 and time.perf_counter() - t0 > UNCERTAIN_SECONDS:
                    break
                img = self.image(name)
                if img is None:
                    continue
                u = float(np.mean(self.segmenter.predict(img, self.parse(NO_INTERACTIONS), key=name).uncertainty))
                n += 1
                if u > best:
                    best, pick = u, name
            self.proposal = (f"proposed: the least certain of {n} remaining images (mean uncertainty {best:.3f}, "
                             f"{time.perf_counter() - t0:.1f} s)")
        self.session.set_current(pick)

    # ------------------------------------------------------------------------------ API
    def state(self) -> dict:
        s = self.session
        done = set(s.accepted)
        return {"images": s.names, "errors": s.errors, "notes": s.notes, "accepted": s.accepted,
                "skipped": s.skipped, "current": s.current, "interactions": s.pending, "text": s.text,
                "order": s.order, "n_accepted": sum(n in done for n in s.names), "total": len(s.names),
                "context": len(self.segmenter.context_keys), "last_seconds": self.last_seconds, "proposal": self.proposal,
                "out_dir": str(s.out_dir)}

    def api_predict(self, body: dict) -> dict:
        name = str(body.get("image"))
        ints, out = self.predict(name, body.get("interactions"))
        self.session.set_pending(name, ints)
        mask = np.asarray(out.mask, bool)
        return {"image": name, "mask": "data:image/png;base64," + base64.b64encode(mask_png(mask)).decode("ascii"),
                "seconds": self.last_seconds, "area": int(mask.sum()),
                "uncertainty": float(np.mean(out.uncertainty)), "interactions": ints}

    def _open_only(self, name: str) -> None:
        """Accept and skip act on the open image only: a second click that arrives after the first moved
        on, or a stale second tab, must not accept or skip another time."""
        self._check(name)
        if name != self.session.current:
            raise StaleRequest(f"{name} is not the open image ({self.session.current}); reload the page")

    def api_accept(self, body: dict) -> dict:
        name = str(body.get("image"))
        self._open_only(name)
        ints, out = self.predict(name, body.get("interactions"))
        mask = np.asarray(out.mask, bool)
        path = self.session.accept(name, mask, ints)
        self._add_context(name, self.image(name), mask)
        self.advance(name)
        return {**self.state(), "saved": str(path)}

    def api_goto(self, body: dict) -> dict:
        name = str(body.get("image"))
        self._check(name)
        self.session.set_current(name)  # an accepted image reopens with its interactions; accepting it again replaces its mask
        return self.state()

    def api_skip(self, body: dict) -> dict:
        name = str(body.get("image"))
        self._open_only(name)
        self.session.skip(name)
        self.advance(name)
        return self.state()


# ---------------------------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    server: AppServer
    server_version = "segicl-annotate"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one local user: no access log

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: dict, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        if self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}"):
            return True
        self._json({"error": "wrong Host header"}, HTTPStatus.FORBIDDEN)
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._host_ok():
            return
        url = urlparse(self.path)
        app = self.server.app
        if url.path in ("/", "/index.html"):
            return self._static("index.html")
        if url.path.startswith("/static/"):
            return self._static(url.path[len("/static/"):])
        with app.lock:
            try:
                if url.path == "/api/state":
                    return self._json(app.state())
                if url.path == "/api/image":
                    name = parse_qs(url.query).get("name", [""])[0]
                    app._check(name)
                    return self._send(HTTPStatus.OK, app.image_png(name), "image/png")
            except SessionError as exc:
                return self._json({"error": str(exc)}, HTTPStatus.NOT_FOUND)
        self._json({"error": f"no such page {url.path}"}, HTTPStatus.NOT_FOUND)

    def _static(self, name: str) -> None:
        files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}  # no path from the URL reaches open()
        if name not in files:
            return self._json({"error": f"no such file {name}"}, HTTPStatus.NOT_FOUND)
        self._send(HTTPStatus.OK, files[name].read_bytes(), CONTENT_TYPES.get(files[name].suffix, "text/plain"))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if not self._host_ok():
            return
        routes = {"/api/predict": Annotator.api_predict, "/api/accept": Annotator.api_accept,
                  "/api/skip": Annotator.api_skip, "/api/goto": Annotator.api_goto}
        route = routes.get(urlparse(self.path).path)
        if route is None:
            return self._json({"error": f"no such endpoint {self.path}"}, HTTPStatus.NOT_FOUND)
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._json({"error": "POST bodies must be application/json"}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._json({"error": "request too large"}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            with self.server.app.lock:
                result = route(self.server.app, body)
        except StaleRequest as exc:
            return self._json({"error": str(exc)}, HTTPStatus.CONFLICT)
        except (ValueError, TypeError) as exc:  # SessionError, bad JSON, bad interactions
            return self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except Exception as exc:  # the model failed: say so, keep serving
            print(f"segicl annotate: {self.path}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._json(result)


class AppServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: Annotator, port: int = 0):
        self.app = app
        super().__init__((HOST, port), Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("images", type=Path, metavar="IMAGES_DIR",
                        help="folder of PNG / JPEG images (and NIfTI volumes, slice by slice) to segment")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                        help="where masks/<stem>.png and session.json go (reopen it to resume)")
    parser.add_argument("--text", default=None, help="what to segment, e.g. 'the polyp' (kept in the session)")
    parser.add_argument("--model", default=None, metavar="CHECKPOINT",
                        help="propose with the SegICL model (a checkpoint folder, or 'shipped') reading the accepted "
                             "images, instead of the training-free propagation (slower proposals; docs/interactive.md)")
    parser.add_argument("--click-model", default="auto", metavar="CHECKPOINT",
                        help="the network that reads clicks, boxes and scribbles: auto (the shipped one, default), "
                             "shipped, none (the random walker alone), or a folder from 'segicl train click'")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--no-browser", action="store_true", help="print the address, do not open a browser")
    parser.add_argument("--order", choices=ORDERS, default=None,
                        help="next image: sequential (file order, default) or uncertain (the least certain of "
                             f"the next {UNCERTAIN_CANDIDATES} remaining ones, as many as {UNCERTAIN_SECONDS:.0f} s allow)")
    parser.add_argument("--export", choices=("nnunet", "segicl"), default=None,
                        help="instead of serving, write the accepted set as an nnU-Net raw dataset or the "
                             "project's dataset layout to --export-to")
    parser.add_argument("--export-to", type=Path, default=None, metavar="DIR", help="export destination (new folder)")
    parser.add_argument("--label", default=None, help="export: the label's name (default: --text, or 'foreground')")
    parser.add_argument("--modality", default="unknown", help="export: the modality written to dataset.json")
    parser.set_defaults(func=main)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point (``segicl.commands``): ``segicl annotate``."""
    parser = subparsers.add_parser("annotate", help="segment a folder of images interactively in the browser",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def main(args: argparse.Namespace, backend: Callable[[str], tuple] = default_backend) -> int:
    """Serve the app (or export); ``backend(text)`` returns ``(segmenter, parse)`` (tests pass a stand-in)."""
    if args.export:
        return export_main(args)
    try:
        session = Session(args.images, args.out, order=args.order, text=args.text)
    except SessionError as exc:
        print(f"segicl annotate: {exc}", file=sys.stderr)
        return 2
    for e in session.errors:
        print(f"segicl annotate: skipped {e['file']}: {e['error']}", file=sys.stderr)
    for note in session.notes:
        print(f"segicl annotate: {note}", file=sys.stderr)
    try:
        extra = {} if getattr(args, "click_model", "auto") == "auto" else {"click_model": args.click_model}
        segmenter, parse = backend(session.text, args.model, **extra) if args.model else backend(session.text, **extra)
    except (OSError, ValueError) as exc:
        what = f"--model {args.model}" if args.model else f"--click-model {args.click_model}"
        print(f"segicl annotate: {what}: {exc}", file=sys.stderr)
        return 2
    app = Annotator(session, segmenter, parse)
    try:
        server = AppServer(app, args.port)
    except OSError as exc:
        print(f"segicl annotate: cannot listen on {HOST}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"segicl annotate: {server.url}  ({len(session.names)} images, {len(session.accepted)} accepted, "
          f"saving to {session.out_dir}; Ctrl+C to stop)", flush=True)
    if not args.no_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(f"segicl annotate: stopped; {len(session.accepted)} accepted masks in {session.masks_dir}", flush=True)
    return 0


def export_main(args: argparse.Namespace) -> int:
    from segicl.annotate.export import export_session
    from segicl.data.dataset import DataError

    if args.export_to is None:
        print("segicl annotate: --export needs --export-to DIR", file=sys.stderr)
        return 2
    try:
        session = Session(args.images, args.out) if (args.out / "session.json").is_file() else None
        if session is None:
            raise SessionError(f"{args.out}: no session.json (nothing annotated there yet)")
        dest = export_session(session, args.export_to, args.export, label=args.label, modality=args.modality)
    except (SessionError, DataError, FileExistsError) as exc:
        print(f"segicl annotate: {exc}", file=sys.stderr)
        return 2
    print(f"segicl annotate: {len(session.accepted)} accepted images exported as {args.export} to {dest}")
    return 0
