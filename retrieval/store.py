"""The support store: labelled support images embedded and indexed in FAISS, with SQLite metadata.

On disk a store is a folder::

    index.faiss     faiss.serialize_index bytes (always the CPU copy)
    meta.sqlite     one row per support: id (= faiss id), dataset, label values present, label names,
                    modality, stem, group, split, image path, mask path, dataset root,
                    image sha256, embedder id
    manifest.json   format version, segicl / faiss versions, embedder (spec, id, dim), index type,
                    count, sha256 and size of index.faiss and meta.sqlite, datasets

``save`` writes a complete new folder next to the target and swaps it in with ``os.replace``;
``load`` checks the manifest's checksums, the counts in the index, the SQLite table and the
manifest, the vector width and the embedder id, and raises :class:`StoreError` naming the file and
the problem rather than returning wrong neighbours.

Leakage guards in :meth:`SupportStore.search`: the query's own stem and group (patient / sequence)
can be excluded, an image identical to the query (cosine >= 1 - 1e-6) is never returned, and
near-duplicate supports are collapsed so k supports are k distinct examples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval import index as ix
from retrieval.embedders import Embedder, get_embedder
from segicl.io import atomic_directory, atomic_write_bytes

FORMAT = "segicl-support-store"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
MANIFEST_FILE = "manifest.json"
IDENTICAL = 1.0 - 1e-6


class StoreError(ValueError):
    """A store folder is missing, corrupted or inconsistent. The message names the file."""


class EmbedderMismatchError(StoreError):
    """Query embeddings (or a given embedder) differ from the embedder the store was built with."""


@dataclass
class Record:
    """Metadata of one support (one image with its label map)."""

    dataset: str
    stem: str
    group: str
    split: str
    modality: str
    label_values: tuple[int, ...]  # label values with a non-empty mask
    label_names: dict[int, str]  # all labels of the dataset: value -> name
    image_path: str
    mask_path: str
    root: str
    sha256: str
    embedder_id: str


@dataclass
class Hit:
    """One retrieved support."""

    score: float  # cosine similarity to the query
    id: int
    dataset: str
    stem: str
    group: str
    label_value: int | None  # the requested label, or the support's only label, else None
    label_values: tuple[int, ...]
    label_names: dict[int, str]
    modality: str
    image_path: Path
    mask_path: Path
    root: Path
    split: str = ""

    @property
    def label(self) -> str | None:
        return self.label_names.get(self.label_value) if self.label_value is not None else None

    def sample(self, label_value: int | str | None = None):
        """The support as a :class:`segicl.data.Sample` (image + binary mask of the label)."""
        label = self.label_value if label_value is None else label_value
        if label is None:
            raise ValueError(f"{self.dataset}/{self.stem}: carries labels {self.label_values}; say which one")
        return _dataset(str(self.root)).sample(self.stem, label)

    def as_dict(self) -> dict[str, Any]:
        return {"score": round(float(self.score), 6), "dataset": self.dataset, "stem": self.stem, "group": self.group,
                "label_value": self.label_value, "label": self.label, "label_values": list(self.label_values),
                "modality": self.modality, "image_path": str(self.image_path), "mask_path": str(self.mask_path)}


@functools.lru_cache(maxsize=64)
def _dataset(root: str):
    from segicl.data import load_dataset

    return load_dataset(root)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import faiss

    from segicl import __version__

    return {"segicl": __version__, "faiss": faiss.__version__, "numpy": np.__version__}


class SupportStore:
    """Embedded support images in a FAISS index, with metadata, filters and leakage guards.

    Build with :meth:`build`, grow with :meth:`add`, persist with :meth:`save` / :meth:`load`,
    query with :meth:`search`.
    """

    def __init__(self, embedder: Embedder | str | None = None, index_type: str | None = None,
                 embedder_id: str | None = None, embedder_spec: str | None = None, dim: int | None = None):
        self._embedder: Embedder | None = None
        if embedder is None or isinstance(embedder, str):
            self.embedder_spec = embedder_spec or embedder or get_embedder(None).spec
        else:
            self._embedder = embedder
            self.embedder_spec = getattr(embedder, "spec", embedder.name)
        if self._embedder is not None:
            embedder_id, dim = self._embedder.id, int(self._embedder.dim)
        elif embedder_id is None:  # resolve the spec now (cheap for pixel; loads weights otherwise)
            self._embedder = get_embedder(self.embedder_spec)
            embedder_id, dim = self._embedder.id, int(self._embedder.dim)
        self.embedder_id: str = embedder_id
        self.dim: int = int(dim)
        self.index_type_override = index_type
        self.index = None
        self.records: list[Record] = []
        self._keys: dict[tuple[str, str], int] = {}
        self._cache: dict[Any, np.ndarray] = {}

    # ------------------------------------------------------------------------------ properties
    @property
    def embedder(self) -> Embedder:
        """The embedder (created from the stored spec on first use and checked against the id)."""
        if self._embedder is None:
            emb = get_embedder(self.embedder_spec)
            if emb.id != self.embedder_id:
                raise EmbedderMismatchError(
                    f"embedder {self.embedder_spec!r} now has id {emb.id!r} but the store was built with "
                    f"{self.embedder_id!r} (weights or version changed): rebuild the store")
            self._embedder = emb
        return self._embedder

    @property
    def index_type(self) -> str:
        return ix.index_type_of(self.index) if self.index is not None else (self.index_type_override or "flat")

    def __len__(self) -> int:
        return len(self.records)

    def datasets(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.dataset] = out.get(r.dataset, 0) + 1
        return out

    # ------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, data_dirs: Sequence[str | Path] | str | Path, split: str = "train",
              embedder: Embedder | str | None = None, index_type: str | None = None, batch_size: int = 32,
              progress: bool = True) -> SupportStore:
        """Embed and index the ``split`` images of every dataset folder in ``data_dirs``.

        Args:
            data_dirs: dataset folders (documented layout or plain images/ + masks/).
            split: split to index ("train", "val", "test", "all"). A plain folder only has "all",
                which is used (with a warning) when the requested split does not exist there.
            embedder: an :class:`Embedder`, a spec string, or None for ``DEFAULT_EMBEDDER``.
            index_type: "flat", "hnsw" or "ivfpq"; None chooses by size.
            batch_size: images embedded per call.
            progress: show a progress bar.
        """
        store = cls(embedder=embedder, index_type=index_type)
        store.add(data_dirs, split=split, batch_size=batch_size, progress=progress)
        if store.index is None:
            store.index = ix.build_index(np.zeros((0, store.dim), np.float32), index_type or "flat")
        return store

    def add(self, data_dirs: Sequence[str | Path] | str | Path, split: str = "train", batch_size: int = 32,
            progress: bool = True) -> int:
        """Embed and add the ``split`` images of more dataset folders; returns the number added.

        Supports already in the store (same dataset name and stem) are skipped, so adding a folder
        twice is harmless. The index grows in place; when an automatically chosen index type no
        longer fits the new size (e.g. flat past 50k) it is rebuilt from the stored vectors
        without re-embedding.
        """
        from segicl.data import load_dataset

        if isinstance(data_dirs, (str, Path)):
            data_dirs = [data_dirs]
        new: list[Record] = []
        images: list[tuple[Any, str]] = []  # (dataset, stem): read in batches below
        for d in data_dirs:
            ds = load_dataset(d)
            if split in ds.splits or split == "all":
                stems = ds.stems(split)
            elif set(ds.splits) == {"all"}:
                warnings.warn(f"{ds.root}: plain folder without splits; indexing all {len(ds)} pairs for split {split!r}", stacklevel=2)
                stems = ds.stems("all")
            else:
                raise StoreError(f"{ds.root}: no split {split!r} (splits: {sorted(ds.splits)})")
            for stem in stems:
                key = (ds.name, stem)
                if key in self._keys:
                    continue
                present = tuple(sorted(ds.labels_present(stem)))
                ipath = ds.image_path(stem)
                new.append(Record(
                    dataset=ds.name, stem=stem, group=ds.group(stem), split=ds.split_of(stem), modality=ds.modality,
                    label_values=present, label_names=dict(ds.labels), image_path=str(Path(ipath).resolve()),
                    mask_path=str(Path(ds.mask_path(stem)).resolve()), root=str(Path(ds.root).resolve()),
                    sha256=ds.image_sha256(stem), embedder_id=self.embedder_id))
                images.append((ds, stem))
        seen: set[tuple[str, str]] = set()
        keep = []
        for i, r in enumerate(new):
            if (r.dataset, r.stem) not in seen:
                seen.add((r.dataset, r.stem))
                keep.append(i)
        new = [new[i] for i in keep]
        images = [images[i] for i in keep]
        if not new:
            return 0
        vecs = np.zeros((len(new), self.dim), np.float32)
        bar = _progress(len(new), "embedding supports", progress)
        for start in range(0, len(new), batch_size):
            chunk = images[start:start + batch_size]
            batch = [ds.read_image(stem) for ds, stem in chunk]
            out = np.asarray(self.embedder.embed(batch), dtype=np.float32)
            if out.shape != (len(batch), self.dim):
                raise StoreError(f"embedder {self.embedder_spec!r} returned shape {out.shape}, expected {(len(batch), self.dim)}")
            vecs[start:start + len(batch)] = out
            bar.update(len(batch))
        bar.close()
        self._add_vectors(new, vecs)
        return len(new)

    def _add_vectors(self, records: list[Record], vecs: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        n_after = len(self.records) + len(records)
        wanted = self.index_type_override or ix.choose_index_type(n_after)
        if self.index is None:
            self.index = ix.build_index(vecs, wanted)
        elif wanted != ix.index_type_of(self.index) or (self.index_type_override is None and ix.needs_retraining(self.index, n_after)):
            self.index = ix.build_index(np.concatenate([ix.all_vectors(self.index), vecs]), wanted)
        else:
            self.index.add(vecs)
        for r in records:
            self._keys[(r.dataset, r.stem)] = len(self.records)
            self.records.append(r)
        self._cache.clear()

    # ------------------------------------------------------------------------------ filters
    def _codes(self, name: str) -> tuple[np.ndarray, dict[str, int]]:
        """Integer codes of a metadata column (fast np.isin filters at millions of entries)."""
        key = ("codes", name)
        if key not in self._cache:
            mapping: dict[str, int] = {}
            codes = np.fromiter((mapping.setdefault(getattr(r, name), len(mapping)) for r in self.records),
                                dtype=np.int64, count=len(self.records))
            self._cache[key] = (codes, mapping)
        return self._cache[key]

    def _isin(self, name: str, values: Iterable[str]) -> np.ndarray:
        codes, mapping = self._codes(name)
        wanted = [mapping[v] for v in values if v in mapping]
        return np.isin(codes, wanted) if wanted else np.zeros(len(codes), bool)

    def _label_mask(self, label: int | str) -> np.ndarray:
        key = ("label", label)
        if key not in self._cache:
            if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.isdigit()):
                v = int(label)
                m = [v in r.label_values for r in self.records]
            else:
                m = [any(r.label_names.get(v) == label for v in r.label_values) for r in self.records]
            self._cache[key] = np.array(m, dtype=bool)
        return self._cache[key]

    def allowed_mask(self, dataset: str | Sequence[str] | None = None, label: int | str | None = None,
                     modality: str | Sequence[str] | None = None, exclude_stems: Iterable[str] = (),
                     exclude_groups: Iterable[str] = ()) -> np.ndarray | None:
        """Bool mask over the store's ids of the entries passing the filters (None = all)."""
        mask = None

        def both(m):
            return m if mask is None else mask & m

        for col, want in (("dataset", dataset), ("modality", modality)):
            if want is not None:
                mask = both(self._isin(col, [want] if isinstance(want, str) else list(want)))
        if label is not None:
            mask = both(self._label_mask(label))
        ex_s, ex_g = [str(x) for x in exclude_stems], [str(x) for x in exclude_groups]
        if ex_s:
            mask = both(~self._isin("stem", ex_s))
        if ex_g:
            mask = both(~self._isin("group", ex_g))
        return mask

    # ------------------------------------------------------------------------------ search
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.asarray(self.embedder.embed(list(images)), dtype=np.float32)

    def search(self, query_images: Image.Image | Sequence[Image.Image] | None = None, k: int = 5,
               dataset: str | Sequence[str] | None = None, label: int | str | None = None,
               modality: str | Sequence[str] | None = None, exclude_stems: Iterable[str] = (),
               exclude_groups: Iterable[str] = (), dedup_threshold: float | None = 0.98,
               query_embeddings: np.ndarray | None = None, embedder_id: str | None = None,
               exclude_identical: bool = True) -> list[Hit] | list[list[Hit]]:
        """The ``k`` nearest supports of each query that pass the filters.

        Args:
            query_images: one PIL image (returns a list of hits) or a list (returns one list each).
            k: supports wanted per query; fewer are returned only when the candidates run out.
            dataset, modality: keep only these (a name or a list of names).
            label: keep only supports whose mask carries this label (mask value or label name);
                the hits' ``label_value`` is then that label.
            exclude_stems, exclude_groups: never return these stems / groups (the query's own stem
                and patient / sequence), for every query of the call.
            dedup_threshold: a candidate whose cosine similarity to an already chosen support
                exceeds this is skipped (None or >= 1 disables).
            query_embeddings: precomputed (n, dim) query vectors instead of images; then
                ``embedder_id`` must be given and equal the store's.
            exclude_identical: drop supports identical to the query (cosine >= 1 - 1e-6).
        """
        if self.index is None or not len(self.records):
            raise StoreError("the support store is empty")
        single = isinstance(query_images, Image.Image)
        if query_embeddings is not None:
            if embedder_id is None:
                raise EmbedderMismatchError(
                    f"query_embeddings need embedder_id (this store was built with {self.embedder_id!r})")
            if embedder_id != self.embedder_id:
                raise EmbedderMismatchError(
                    f"query embeddings come from embedder {embedder_id!r} but the store was built with "
                    f"{self.embedder_id!r}: embed the queries with {self.embedder_spec!r}")
            q = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
            single = single or np.asarray(query_embeddings).ndim == 1
        elif query_images is None:
            raise ValueError("search needs query_images or query_embeddings")
        else:
            q = self.embed([query_images] if single else list(query_images))
        if q.shape[1] != self.dim:
            raise EmbedderMismatchError(f"query vectors have width {q.shape[1]}, the store's embedder {self.embedder_id!r} gives {self.dim}")
        if k <= 0:
            return [] if single else [[] for _ in range(len(q))]
        allowed = self.allowed_mask(dataset, label, modality, exclude_stems, exclude_groups)
        n_allowed = len(self.records) if allowed is None else int(allowed.sum())
        want_label = None
        if label is not None:
            want_label = int(label) if not isinstance(label, str) or label.isdigit() else label
        results = [self._search_one(q[i], k, allowed, n_allowed, dedup_threshold, want_label, exclude_identical)
                   for i in range(len(q))]
        return results[0] if single else results

    def _search_one(self, qv: np.ndarray, k: int, allowed, n_allowed: int, dedup: float | None,
                    want_label, exclude_identical: bool) -> list[Hit]:
        dedup = None if dedup is None or dedup >= 1 else float(dedup)
        fetch = min(n_allowed, max(4 * k, k + 16))
        hits: list[Hit] = []
        while fetch > 0:
            scores, ids = ix.search(self.index, qv[None], fetch, allowed)
            scores, ids = scores[0], ids[0]
            valid = ids >= 0
            scores, ids = scores[valid], ids[valid]
            if allowed is not None:  # the selector already applied it; check again, cheaply
                ok = allowed[ids]
                scores, ids = scores[ok], ids[ok]
            if exclude_identical:
                ok = scores < IDENTICAL
                scores, ids = scores[ok], ids[ok]
            hits, chosen_vecs = [], []
            vecs = ix.reconstruct(self.index, ids) if dedup is not None else None
            for j, (s, i) in enumerate(zip(scores, ids)):
                if dedup is not None and chosen_vecs and float(np.max(np.stack(chosen_vecs) @ vecs[j])) > dedup:
                    continue
                hits.append(self._hit(int(i), float(s), want_label))
                if dedup is not None:
                    chosen_vecs.append(vecs[j])
                if len(hits) == k:
                    return hits
            if fetch >= n_allowed:
                break
            fetch = min(n_allowed, fetch * 4)
        return hits

    def _hit(self, i: int, score: float, want_label) -> Hit:
        r = self.records[i]
        if isinstance(want_label, int):
            lv = want_label
        elif isinstance(want_label, str):
            lv = next((v for v in r.label_values if r.label_names.get(v) == want_label), None)
        else:
            lv = r.label_values[0] if len(r.label_values) == 1 else None
        return Hit(score=score, id=i, dataset=r.dataset, stem=r.stem, group=r.group, label_value=lv,
                   label_values=r.label_values, label_names=r.label_names, modality=r.modality,
                   image_path=Path(r.image_path), mask_path=Path(r.mask_path), root=Path(r.root), split=r.split)

    # ------------------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the store to the folder ``path`` atomically (complete new folder, then swapped in)."""
        if self.index is None:
            raise StoreError("cannot save an empty, unbuilt store")
        path = Path(path)
        if path.exists():
            foreign = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
            foreign = [n for n in foreign if n not in (INDEX_FILE, META_FILE, MANIFEST_FILE)]
            if foreign:
                raise StoreError(f"{path}: exists and holds files other than a support store's ({foreign[:3]}); "
                                 "refusing to overwrite it")
        with atomic_directory(path) as tmp:
            data = ix.serialize(self.index)
            atomic_write_bytes(tmp / INDEX_FILE, data)
            self._write_sqlite(tmp / META_FILE)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": _versions(),
                "embedder": {"spec": self.embedder_spec, "id": self.embedder_id, "dim": self.dim},
                "index_type": ix.index_type_of(self.index),
                "index_type_override": self.index_type_override,
                "count": len(self.records),
                "datasets": self.datasets(),
                "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                          for name in (INDEX_FILE, META_FILE)},
            }
            atomic_write_bytes(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
        return path

    def _write_sqlite(self, file: Path) -> None:
        con = sqlite3.connect(str(file))
        try:
            con.execute("""CREATE TABLE supports (id INTEGER PRIMARY KEY, dataset TEXT NOT NULL, stem TEXT NOT NULL,
                grp TEXT NOT NULL, split TEXT, modality TEXT, label_values TEXT NOT NULL, label_names TEXT NOT NULL,
                image_path TEXT NOT NULL, mask_path TEXT NOT NULL, root TEXT NOT NULL, sha256 TEXT NOT NULL,
                embedder_id TEXT NOT NULL, UNIQUE(dataset, stem))""")
            con.execute("CREATE INDEX supports_dataset ON supports(dataset)")
            con.executemany(
                "INSERT INTO supports VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(i, r.dataset, r.stem, r.group, r.split, r.modality, json.dumps(list(r.label_values)),
                  json.dumps({str(k): v for k, v in r.label_names.items()}), r.image_path, r.mask_path, r.root,
                  r.sha256, r.embedder_id) for i, r in enumerate(self.records)])
            con.commit()
        finally:
            con.close()

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | str | None = None, verify: bool = True) -> SupportStore:
        """Read a store folder written by :meth:`save`.

        Args:
            path: the folder.
            embedder: embedder to use for image queries (default: recreated from the manifest's spec
                on first use). Its id must equal the store's.
            verify: check the files' sha256 against the manifest (recommended; cheap next to a search).

        Raises:
            StoreError: missing files, checksum / count / width mismatch, unreadable index or table.
            EmbedderMismatchError: ``embedder`` differs from the store's embedder.
        """
        path = Path(path)
        mfile = path / MANIFEST_FILE
        if not path.is_dir():
            raise StoreError(f"{path}: support store folder not found")
        if not mfile.is_file():
            raise StoreError(f"{mfile}: missing (not a support store folder, or an interrupted write)")
        try:
            manifest = json.loads(mfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{mfile}: invalid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{mfile}: not a {FORMAT} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{mfile}: format version {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})")
        try:
            emb = manifest["embedder"]
            count = int(manifest["count"])
            files = manifest["files"]
            spec, eid, dim = str(emb["spec"]), str(emb["id"]), int(emb["dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{mfile}: incomplete manifest ({exc!r})") from exc
        for name in (INDEX_FILE, META_FILE):
            f = path / name
            if not f.is_file():
                raise StoreError(f"{f}: missing")
            if verify:
                info = files.get(name) or {}
                if f.stat().st_size != info.get("bytes"):
                    raise StoreError(f"{f}: size {f.stat().st_size} differs from the manifest's {info.get('bytes')} (truncated or replaced)")
                if sha256_file(f) != info.get("sha256"):
                    raise StoreError(f"{f}: sha256 differs from the manifest (corrupted or replaced); rebuild the store")
        try:
            index = ix.read_index(path / INDEX_FILE)
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
        if index.ntotal != count:
            raise StoreError(f"{path / INDEX_FILE}: holds {index.ntotal} vectors but the manifest says {count}")
        if index.d != dim:
            raise StoreError(f"{path / INDEX_FILE}: vectors of width {index.d} but the embedder {eid!r} gives {dim}")
        records = cls._read_sqlite(path / META_FILE)
        if len(records) != count:
            raise StoreError(f"{path / META_FILE}: {len(records)} rows but the manifest says {count}")
        bad = {r.embedder_id for r in records} - {eid}
        if bad:
            raise StoreError(f"{path / META_FILE}: rows embedded by {sorted(bad)} in a store of embedder {eid!r}")
        if embedder is not None and not isinstance(embedder, str):
            if embedder.id != eid:
                raise EmbedderMismatchError(f"{mfile}: store built with embedder {eid!r}, given {embedder.id!r}")
            store = cls(embedder=embedder, index_type=manifest.get("index_type_override"))
        else:
            if isinstance(embedder, str) and embedder != spec:
                emb_obj = get_embedder(embedder)
                if emb_obj.id != eid:
                    raise EmbedderMismatchError(f"{mfile}: store built with embedder {eid!r}, given {emb_obj.id!r}")
                store = cls(embedder=emb_obj, index_type=manifest.get("index_type_override"))
            else:
                store = cls(embedder=None, embedder_spec=spec, embedder_id=eid, dim=dim,
                            index_type=manifest.get("index_type_override"))
        store.index = index
        store.records = records
        store._keys = {(r.dataset, r.stem): i for i, r in enumerate(records)}
        store.manifest = manifest
        return store

    @staticmethod
    def _read_sqlite(file: Path) -> list[Record]:
        try:
            con = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
            try:
                rows = con.execute("SELECT id, dataset, stem, grp, split, modality, label_values, label_names, image_path, "
                                   "mask_path, root, sha256, embedder_id FROM supports ORDER BY id").fetchall()
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{file}: unreadable metadata table ({exc})") from exc
        records = []
        for expect, row in enumerate(rows):
            if row[0] != expect:
                raise StoreError(f"{file}: ids are not contiguous (row id {row[0]} where {expect} was expected)")
            records.append(Record(dataset=row[1], stem=row[2], group=row[3], split=row[4] or "", modality=row[5] or "",
                                  label_values=tuple(int(v) for v in json.loads(row[6])),
                                  label_names={int(k): v for k, v in json.loads(row[7]).items()},
                                  image_path=row[8], mask_path=row[9], root=row[10], sha256=row[11], embedder_id=row[12]))
        return records

    def info(self) -> dict[str, Any]:
        """Summary for ``segicl index info``."""
        labels: dict[str, dict[str, int]] = {}
        for r in self.records:
            per = labels.setdefault(r.dataset, {})
            for v in r.label_values:
                name = r.label_names.get(v, str(v))
                per[name] = per.get(name, 0) + 1
        return {"count": len(self), "embedder": {"spec": self.embedder_spec, "id": self.embedder_id, "dim": self.dim},
                "index_type": self.index_type, "datasets": self.datasets(), "labels": labels,
                "modalities": sorted({r.modality for r in self.records}),
                "versions": getattr(self, "manifest", {}).get("versions", _versions()),
                "created": getattr(self, "manifest", {}).get("created")}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total < 2:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


__all__ = ["SupportStore", "Hit", "Record", "StoreError", "EmbedderMismatchError", "sha256_file"]
