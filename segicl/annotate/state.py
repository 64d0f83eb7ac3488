"""The annotation session on disk: which images are accepted, which one is open, its pending interactions.

Files under OUT_DIR::

    session.json        images_dir, order, text, accepted (file names, in acceptance order), skipped,
                        current (file name) and its pending interactions (Interactions.to_dict()),
                        done: the interactions each accepted mask was made with (reopening it restores them)
    masks/<stem>.png    one accepted mask per image: 8-bit, 0 background / 255 foreground, image size
                        (a volume's slices: <volume stem>_s<index>, as ``segicl data convert`` names them)
    masks/<volume stem>.nii.gz   a volume's mask (0 / 1 on its voxel grid), once all its slices are accepted

Every write goes through :func:`segicl.io.atomic_file` (temporary file beside the target, fsync,
``os.replace``, then the folder is fsynced), so a killed process leaves either the old or the new file,
never a torn one. Accepting writes the mask first and the session second; a mask whose session update
was lost to a kill is found on the next start (:attr:`Session.notes`) and counted as accepted, so
nothing accepted is ever lost. A session belongs to one images folder: opening OUT_DIR with another
one, or an OUT_DIR whose masks/ holds files without a session.json, raises :class:`SessionError`.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segicl.io import atomic_write_bytes, fsync_dir

SESSION_FILE = "session.json"
MASKS_DIR = "masks"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ORDERS = ("sequential", "uncertain")
VERSION = 1


class SessionError(ValueError):
    """The session cannot be opened (wrong folder, foreign files, no images); the message says why."""


def mask_png(mask: np.ndarray) -> bytes:
    """A bool (H, W) mask as an 8-bit PNG, 0 / 255."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_mask(path: Path) -> np.ndarray:
    """A saved mask as bool (H, W) (any non-zero value is foreground)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return arr > 0


def to_8bit(img: Image.Image) -> Image.Image:
    """An image as the model and the page see it: L or RGB; 16-bit and float images are mapped to 8 bits
    by the 0.5-99.5 percentiles (:func:`segicl.volumes.window_range`; PIL's own conversion clips them)."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode.startswith(("I", "F")):
        from segicl.volumes import to_uint8, window_range

        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(to_uint8(arr, *window_range(arr)), mode="L")
    return img.convert("L" if img.mode in ("1", "LA") else "RGB")


@dataclass(frozen=True)
class Item:
    """One image to annotate: a 2D file, or slice ``index`` of a volume file along ``axis``."""

    name: str  # the key in the session, the page and the context: the file name, or <volume stem>_s<index>
    stem: str  # masks/<stem>.png
    path: Path
    index: int | None = None
    axis: int | None = None


def _volume_items(p: Path) -> list[Item]:
    from segicl.volumes import read_geometry, slice_axis, volume_stem

    shape, affine = read_geometry(p)
    axis = slice_axis(affine)
    n = shape[axis]
    width = max(3, len(str(n - 1)))  # the stems of segicl data convert (nnunet_to_2d)
    return [Item(f"{volume_stem(p)}_s{i:0{width}d}", f"{volume_stem(p)}_s{i:0{width}d}", p, i, axis) for i in range(n)]


def scan_images(images_dir: Path) -> tuple[list[Item], list[dict]]:
    """PNG / JPEG files of ``images_dir`` sorted by name, each volume file (NIfTI; MetaImage / NRRD with
    SimpleITK) as its slices along its lowest-resolution axis, and an error entry per file left out
    (unreadable, or a stem another file already has: their masks would share one file name)."""
    from segicl.data.dataset import DataError, open_image
    from segicl.volumes import VOLUME_EXTS

    good: list[Item] = []
    errors: list[dict] = []
    stems: dict[str, str] = {}
    for p in sorted(images_dir.iterdir()):
        volume = p.name.lower().endswith(VOLUME_EXTS)
        if p.name.startswith(".") or not p.is_file() or not (volume or p.suffix.lower() in IMAGE_SUFFIXES):
            continue
        try:
            if volume:
                items = _volume_items(p)
            else:
                open_image(p, decode=False)
                items = [Item(p.name, p.stem, p)]
        except (DataError, ValueError) as exc:  # VolumeError is a ValueError
            errors.append({"file": p.name, "error": str(exc)})
            continue
        clash = next((it.stem for it in items if it.stem in stems), None)
        if clash is not None:
            errors.append({"file": p.name, "error": f"same stem as {stems[clash]} (both masks would be "
                                                    f"masks/{clash}.png); rename one"})
            continue
        stems.update((it.stem, p.name) for it in items)
        good.extend(items)
    return good, errors


class Session:
    """One annotation session: the images of ``images_dir`` and the outputs in ``out_dir``."""

    def __init__(self, images_dir: str | Path, out_dir: str | Path, order: str | None = None,
                 text: str | None = None):
        self.images_dir = Path(images_dir).resolve()
        self.out_dir = Path(out_dir).resolve()
        if not self.images_dir.is_dir():
            raise SessionError(f"{images_dir}: not a folder")
        if order is not None and order not in ORDERS:
            raise SessionError(f"order must be one of {ORDERS}, got {order!r}")
        items, self.errors = scan_images(self.images_dir)
        if not items:
            hint = f"; did you mean {self.images_dir / 'images'}?" if (self.images_dir / "images").is_dir() else ""
            raise SessionError(f"{self.images_dir}: no readable PNG or JPEG images or volumes"
                               + (f" ({len(self.errors)} left out: {self.errors[0]['error']})" if self.errors else "")
                               + hint)
        self.items = {it.name: it for it in items}
        self.paths = {it.name: it.path for it in items}
        self.names = [it.name for it in items]
        self._volumes: OrderedDict[Path, tuple] = OrderedDict()
        self.notes: list[str] = []
        self.accepted: list[str] = []
        self.skipped: list[str] = []
        self.current: str | None = None
        self.pending: dict = {}
        self.done: dict[str, dict] = {}
        self.order = "sequential"
        self.text = ""
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._load()
        if order is not None:
            self.order = order
        if text is not None:
            self.text = text
        self._recover()
        self.save()

    # ------------------------------------------------------------------------------ paths
    @property
    def session_path(self) -> Path:
        return self.out_dir / SESSION_FILE

    @property
    def masks_dir(self) -> Path:
        return self.out_dir / MASKS_DIR

    def mask_path(self, name: str) -> Path:
        item = self.items.get(name)
        return self.masks_dir / f"{item.stem if item else Path(name).stem}.png"

    def image_path(self, name: str) -> Path:
        """The image's file (for a slice: its volume's)."""
        return self.paths.get(name) or self.images_dir / name

    def volume_mask_path(self, path: Path) -> Path:
        from segicl.volumes import volume_stem

        return self.masks_dir / f"{volume_stem(path)}.nii.gz"

    def _volume(self, path: Path) -> tuple:
        """(Volume, its 8-bit slices along the session's axis) of a volume file, cached for two volumes."""
        from segicl.volumes import read_volume, volume_slices

        if path not in self._volumes:
            vol = read_volume(path)
            axis = next(it.axis for it in self.items.values() if it.path == path)
            self._volumes[path] = (vol, volume_slices(vol, axis))
            while len(self._volumes) > 2:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(path)
        return self._volumes[path]

    def load_image(self, name: str):
        """The decoded image (L or RGB PIL), or None when it fails to decode (it is then left out, with
        the error listed)."""
        from segicl.data.dataset import DataError, open_image

        item = self.items[name]
        try:
            img = open_image(item.path) if item.index is None else self._volume(item.path)[1][item.index]
        except (DataError, ValueError) as exc:
            self.drop([n for n, it in self.items.items() if it.path == item.path], item.path.name, str(exc))
            return None
        return to_8bit(img)

    # ------------------------------------------------------------------------------ load / save
    def _load(self) -> None:
        if not self.session_path.is_file():
            foreign = sorted(self.masks_dir.glob("*.png")) if self.masks_dir.is_dir() else []
            if foreign:
                raise SessionError(f"{self.out_dir}: masks/ holds {len(foreign)} PNG file(s) but there is no "
                                   f"{SESSION_FILE}; refusing to write over masks of an unknown session "
                                   "(choose another --out)")
            return
        try:
            data = json.loads(self.session_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SessionError(f"{self.session_path}: unreadable session file ({exc})") from exc
        other = data.get("images_dir")
        if other != str(self.images_dir):
            raise SessionError(f"{self.out_dir}: holds the session of another images folder ({other}), not "
                               f"{self.images_dir}; refusing to mix them (choose another --out, or open {other})")
        self.accepted = [str(n) for n in data.get("accepted", [])]
        self.skipped = [str(n) for n in data.get("skipped", [])]
        self.current = data.get("current")
        self.pending = dict(data.get("pending") or {})
        self.done = {str(k): dict(v) for k, v in (data.get("done") or {}).items()}
        self.order = data.get("order", "sequential") if data.get("order") in ORDERS else "sequential"
        self.text = str(data.get("text", ""))
        self.created = str(data.get("created", self.created))

    def _recover(self) -> None:
        """Reconcile session.json with masks/: a mask written by an accept whose session update was
        killed counts as accepted; an accepted entry whose mask file is gone is dropped (with a note)."""
        by_stem = {it.stem: n for n, it in self.items.items()}
        stale = [*self.out_dir.glob(f".{SESSION_FILE}.*"), *self.masks_dir.glob(".*.png")]
        for p in stale:  # temporary files of atomic writes that a kill interrupted (hidden names)
            p.unlink(missing_ok=True)
        for n in list(self.accepted):
            if not self.mask_path(n).is_file():
                self.accepted.remove(n)
                self.notes.append(f"{n}: listed as accepted but {self.mask_path(n)} is missing; not accepted")
        if self.masks_dir.is_dir():
            for p in sorted(self.masks_dir.glob("*.png")):
                name = by_stem.get(p.stem)
                if name is not None and name not in self.accepted:
                    self.accepted.append(name)
                    self.notes.append(f"{name}: mask {p.name} found on disk without its session entry "
                                      "(interrupted accept); counted as accepted")
        if self.current is not None and self.current not in self.paths:
            self.current, self.pending = None, {}

    def to_dict(self) -> dict:
        return {"version": VERSION, "images_dir": str(self.images_dir), "created": self.created,
                "order": self.order, "text": self.text, "accepted": self.accepted, "skipped": self.skipped,
                "current": self.current, "pending": self.pending, "done": self.done}

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.session_path, (json.dumps(self.to_dict(), indent=1) + "\n").encode("utf-8"))

    # ------------------------------------------------------------------------------ changes
    def remaining(self) -> list[str]:
        """Images not accepted yet, in file order."""
        done = set(self.accepted)
        return [n for n in self.names if n not in done]

    def candidates(self, after: str | None = None) -> list[str]:
        """Remaining images in the order they are proposed: those after ``after`` in file order (wrapping
        around), skipped ones only when nothing else is left; never ``after`` itself unless it is alone."""
        rest = self.remaining()
        if after in self.names:
            i = self.names.index(after)
            pos = {n: (k - i - 1) % len(self.names) for k, n in enumerate(self.names)}
            rest.sort(key=pos.__getitem__)
        fresh = [n for n in rest if n not in self.skipped and n != after]
        return fresh or [n for n in rest if n != after] or rest

    def set_current(self, name: str | None) -> None:
        if name != self.current:
            self.current, self.pending = name, dict(self.done.get(name, {}))
            self.save()

    def set_pending(self, name: str, interactions: dict) -> None:
        """Remember the open image's interactions (the page sends the full list on every change)."""
        if name == self.current and interactions != self.pending:
            self.pending = dict(interactions)
            self.save()

    def accept(self, name: str, mask: np.ndarray, interactions: dict | None = None) -> Path:
        """Write the mask (atomically), then record it as accepted, with the interactions it was made
        with (accepting an accepted image again replaces its mask). Returns the mask's path."""
        if name not in self.paths:
            raise SessionError(f"{name}: not an image of this session")
        path = self.mask_path(name)
        atomic_write_bytes(path, mask_png(mask))
        if name not in self.accepted:
            self.accepted.append(name)
        self.done[name] = dict(interactions or {})
        if self.items[name].index is not None:
            self._write_volume_mask(self.items[name].path)
        if name in self.skipped:
            self.skipped.remove(name)
        if name == self.current:
            self.current, self.pending = None, {}
        self.save()
        return path

    def _write_volume_mask(self, path: Path) -> Path | None:
        """masks/<volume stem>.nii.gz on the volume's grid (:func:`segicl.volumes.write_like`), once every
        slice of the volume is accepted (rewritten when one is accepted again)."""
        from segicl.volumes import stack_slices, write_like

        slices = sorted((it.index, n) for n, it in self.items.items() if it.path == path)
        done = set(self.accepted)
        if not all(n in done for _, n in slices):
            return None
        axis = next(it.axis for it in self.items.values() if it.path == path)
        vol = self._volume(path)[0]
        stack = np.stack([read_mask(self.mask_path(n)) for _, n in slices]).astype(np.uint8)
        out = write_like(vol, stack_slices(stack, vol.affine, axis), self.volume_mask_path(path))
        fsync_dir(out.parent)
        return out

    def skip(self, name: str) -> None:
        if name not in self.skipped:
            self.skipped.append(name)
        self.save()

    def drop(self, names: list[str], file: str, error: str) -> None:
        """Leave out images that failed to decode when opened (one entry per file in :attr:`errors`)."""
        names = [n for n in names if n in self.paths]  # (kept in self.items: an accepted mask keeps its name)
        if not names:
            return
        for n in names:
            del self.paths[n]
            self.names.remove(n)
        self.errors.append({"file": file, "error": error})
        if self.current in names:
            self.current, self.pending = None, {}
        self.save()
