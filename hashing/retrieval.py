"""A silo's searchable index on disk: build, add, remove, search, upgrade, rollback.

An index is a folder::

    catalogue.sqlite          the truth: content ids, paths, labels, every kept version's codes, the audit log
    models/<version>.pt       a copy of each kept hash function (the index encodes its queries with it)
    faiss/<version>.faiss     the current version's FAISS binary index (+ .meta.json), stamped with the
                              catalogue generation it holds; rebuilt from the catalogue's codes when stale

The FAISS index holds only codes and ids (:class:`hashing.index.SiloIndex`); everything else is in the
catalogue (:mod:`hashing.catalogue`). Every change is one SQLite transaction, written to the audit log
in the same transaction; the FAISS file follows it. A crash between the two leaves a FAISS file of an
older generation, which the next open notices and rebuilds: no state ever mixes two changes, and none
mixes two models' codes.

    idx = build("/var/lib/fedhash/index", "runs/<id>/federated", "/data/images")
    idx.add("/data/new-scans")
    hits = idx.search([image], k=10)            # [[Hit(id, distance, path, labels), ...]]
    idx.remove(paths=["/data/images/p123.png"])
    idx.upgrade("runs/<new>/federated")         # re-encode beside the old codes, swap in one transaction
    idx.rollback()                              # back to the previous model, while it is kept

Several processes may open one index (``fedhash serve`` and ``fedhash index add`` side by side): SQLite
serialises their writes, and every read first checks the generation and reloads when another process
changed it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import catalogue as C
from .catalogue import Catalogue, Item, NewItem
from .codes import logits_to_codes
from .data import IMAGE_SUFFIXES, ImageSet, _finish, load_dataset
from .encoder import Encoder
from .errors import DataError, FedhashError, ModelVersionError
from .index import SiloIndex, UnknownIdsError
from .model import write_record

log = logging.getLogger("fedhash.retrieval")

CATALOGUE = "catalogue.sqlite"
ADD_CHUNK = 256  # images decoded, identified and encoded at a time by add


class UnknownItemsError(UnknownIdsError):
    """A removal named images the index does not hold; nothing was removed."""


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    id: int
    distance: float
    path: str | None
    labels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": C.fmt_id(self.id), "distance": self.distance, "path": self.path,
                "labels": list(self.labels)}


@dataclass
class AddReport:
    added: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (where, id already indexed)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why: unreadable)
    removed_before: list[tuple[str, str]] = field(default_factory=list)  # (where, id): left out, a deletion stands
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"added {self.added} image(s)"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} already indexed (same pixels; first: {self.duplicates[0][0]} "
                         f"is {self.duplicates[0][1]})")
        if self.removed_before:
            parts.append(f"{len(self.removed_before)} removed from this index before, left out (first: "
                         f"{self.removed_before[0][0]}; --readd indexes them again)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable skipped (first: {self.skipped[0][0]}: {self.skipped[0][1]})")
        return "; ".join(parts) + f" in {self.seconds:.1f} s"


# --------------------------------------------------------------------------- input images


def load_images(spec: str | os.PathLike | ImageSet, *, strict: bool = False, check: bool = True) -> ImageSet:
    """What ``--data`` names: one image file, a flat folder of images (no labels), a folder of
    ``class/*.png``, a CSV manifest ``path,labels``, or a built-in data set (fashion-mnist, digits)."""
    if isinstance(spec, ImageSet):
        return spec
    p = Path(spec)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return _finish(f"file:{p}", [str(p.resolve())], [[]], True)
    if p.is_dir() and not any(c.is_dir() for c in p.iterdir()):
        files = sorted(str(f.resolve()) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"folder {p} holds no images (.png, .jpg, ...); point --data at a folder of images, "
                            "a folder of class sub-folders, or a manifest")
        return _finish(f"folder:{p}", files, [[] for _ in files], strict, check)
    ds = load_dataset(str(spec), strict=strict, check=check)
    if ds.paths is not None:
        ds.paths = [str(Path(x).resolve()) for x in ds.paths]
    return ds


def read_query(path: str | os.PathLike) -> np.ndarray:
    """A query image file's pixels, or a one-line DataError that says why it is not one."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"no query image at {path}; give the path of a PNG or JPEG file") from None
    except Exception as e:  # PIL raises many kinds for what is not an image
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        raise DataError(f"{path} is not an image fedhash can read ({reason}); give a PNG or JPEG file") from e


def _labels_of(ds: ImageSet, i: int) -> tuple[str, ...]:
    y = ds.labels[i]
    if ds.labels.ndim == 2:
        return tuple(ds.classes[j] for j in np.flatnonzero(y))
    return (ds.classes[int(y)],)


def new_items(ds: ImageSet, idx: np.ndarray | None = None,
              digests: Sequence[tuple[int, str]] | None = None) -> list[NewItem]:
    """Content ids, digests, places and labels of images ``idx`` of ``ds`` (pixels kept for in-memory ones).
    ``digests`` (the (id, sha256) of each image of ``idx``, known already): image files are not read again."""
    from tqdm.auto import tqdm

    idx = np.arange(len(ds)) if idx is None else np.asarray(idx)
    out = []
    for j, i in enumerate(tqdm(idx, desc="content ids", unit="img", leave=False, mininterval=1.0,
                               disable=len(idx) < 1000)):
        digest = None if digests is None else digests[j]
        px = None if digest is not None and ds.paths is not None else ds.image(int(i))
        out.append(_new_item(ds, int(i), px, digest))
    return out


def _new_item(ds: ImageSet, i: int, px: np.ndarray | None, digest: tuple[int, str] | None = None) -> NewItem:
    """A catalogue row of image ``i`` of ``ds``: ``px`` its pixels (only needed without ``digest`` or for an
    image with no file), ``digest`` its (content id, sha256) if known."""
    cid, sha = C.content_digest(px) if digest is None else digest
    path = ds.paths[i] if ds.paths is not None else None
    return NewItem(cid, sha, path, _labels_of(ds, i), None if path else C.pixels_blob(px))


def _where(ds: ImageSet, i: int) -> str:
    return ds.paths[i] if ds.paths is not None else f"{ds.name}[{i}]"


# --------------------------------------------------------------------------- the index


class SearchIndex:
    """An index folder, opened. Use :func:`build` or :func:`open_index`."""

    def __init__(self, folder: str | os.PathLike, *, weights: str | None = None,
                 cache_dir: str | os.PathLike | None = None, _create: bool = False):
        self.folder = Path(folder)
        if not _create and not (self.folder / CATALOGUE).is_file():
            raise FedhashError(f"{self.folder} is not an index (no {CATALOGUE}); build one with fedhash index build")
        self.cat = Catalogue(self.folder / CATALOGUE, create=_create)
        self.weights, self.cache_dir = weights, cache_dir
        self.lock = threading.RLock()
        self._encode_slots = threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads())))
        self._encoders: dict[str, Encoder] = {}
        self._index: SiloIndex | None = None
        self._generation = -1
        if not _create:
            self._sync()

    def close(self) -> None:
        self.cat.close()

    def __enter__(self) -> "SearchIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    @property
    def model_version(self) -> str:
        with self.lock:
            v = self.cat.current_version
        if v is None:
            raise FedhashError(f"index {self.folder} has no model yet; build it again (fedhash index build)")
        return v

    @property
    def bits(self) -> int:
        with self.lock:
            return self.cat.model_bits(self.model_version)

    def __len__(self) -> int:
        with self.lock:
            return len(self.cat)

    def faiss_path(self, version: str) -> Path:
        return self.folder / "faiss" / f"{version}.faiss"

    def model_path(self, version: str) -> Path:
        return self.folder / "models" / f"{version}.pt"

    def encoder(self, version: str | None = None) -> Encoder:
        """The hash function of ``version`` (default: the current one), from the index's own copy."""
        version = version or self.model_version
        if version not in self._encoders:
            enc = Encoder.load(self.model_path(version), weights=self.weights, cache_dir=self.cache_dir)
            if enc.version != version:
                raise ModelVersionError(f"{self.model_path(version)} holds model {enc.version}, the catalogue says "
                                        f"{version}; the index folder was edited, rebuild it")
            self._encoders[version] = enc
        return self._encoders[version]

    def _sync(self) -> SiloIndex:
        """The FAISS index of the catalogue's current generation (reloaded or rebuilt when it changed)."""
        with self.lock:
            gen = self.cat.generation
            if self._index is not None and gen == self._generation:
                return self._index
            version = self.model_version
            idx = None
            path = self.faiss_path(version)
            if path.is_file():
                try:
                    idx = SiloIndex.load(path)
                except FedhashError as e:
                    log.warning("%s: %s; rebuilding it from the catalogue", path, e)
                if idx is not None and (idx.generation != self._stamp(gen) or idx.model_version != version):
                    idx = None
            if idx is None:
                idx = self._rebuild(version, gen)
            self._index, self._generation = idx, gen
            return idx

    def _stamp(self, gen: int) -> str:
        """What a FAISS file is stamped with: this catalogue's uuid and the generation it holds."""
        return f"{self.cat.get_meta('uuid', '')}:{gen}"

    def _rebuild(self, version: str, gen: int) -> SiloIndex:
        ids, codes = self.cat.codes(version)
        kind = self.cat.get_meta("kind", "flat")
        idx = SiloIndex(self.cat.model_bits(version), version, backbone=self.cat.get_meta("backbone", ""), kind=kind)
        idx.privacy = dict(self.encoder(version).record.get("privacy") or {"unit": "none"})
        if len(ids):
            idx.add(codes, ids, model_version=version)
        idx.generation = self._stamp(gen)
        try:
            idx.save(self.faiss_path(version))
        except OSError as e:  # a read-only index still searches
            log.warning("could not write %s (%s)", self.faiss_path(version), e)
        return idx

    def _after_write(self, gen: int, update) -> None:
        """Bring the in-memory FAISS index to generation ``gen`` (incrementally when nothing else
        changed it in between) and write its file."""
        with self.lock:
            try:
                if self._index is not None and self._generation == gen - 1 and update is not None:
                    update(self._index)
                    self._index.generation = self._stamp(gen)
                    self._generation = gen
                    self._index.save(self.faiss_path(self._index.model_version))
                else:
                    self._index = None
                    self._sync()
            except (FedhashError, OSError, RuntimeError) as e:  # the catalogue committed: it is the truth
                log.warning("%s: the FAISS index did not follow the catalogue (%s); it is rebuilt on the next "
                            "search", self.folder, e)
                self._index = None

    # ------------------------------------------------------------------ add
    def add(self, data: str | os.PathLike | ImageSet, *, strict: bool = False, command: str | None = None,
            action: str = "add", readd: bool = False) -> AddReport:
        """Encode and add the images of ``data`` that the index does not hold yet (no rebuild), in one
        transaction: all of them or, on an error or a kill, none.

        Each file is decoded once, in chunks: its content id and its features come from the same pixels.
        When the feature cache holds the clean view of exactly this data (a federation or ``fedhash train``
        extracted it), the cached features are used instead of the backbone. An image whose pixels are
        already indexed is reported and skipped, an unreadable one too (``strict``: refused); two different
        images whose content ids collide are refused and nothing is added. An image removed from the index
        before is left out and reported (a deletion request stands) unless ``readd``."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        ds = load_images(data, strict=strict, check=False)  # lists the files; each is read once, below
        rep = AddReport(skipped=list(ds.skipped))
        enc = self.encoder()
        cached = enc.cached_logits(ds)
        items: list[NewItem] = []
        codes: list[np.ndarray] = []
        seen: dict[int, str] = {}
        with tqdm(total=len(ds), desc="indexing", unit="img", leave=False, mininterval=1.0,
                  disable=len(ds) < ADD_CHUNK) as bar:
            for start in range(0, len(ds), ADD_CHUNK):
                pos, pixels = [], []
                for i in range(start, min(start + ADD_CHUNK, len(ds))):
                    try:
                        pixels.append(ds.image(i))
                        pos.append(i)
                    except Exception as e:  # PIL raises many kinds for a damaged file
                        reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                        if strict:
                            raise DataError(f"unreadable image {_where(ds, i)} ({reason}); nothing was added: "
                                            "remove or replace it, or drop --strict to skip it") from e
                        rep.skipped.append((_where(ds, i), reason))
                chunk = [_new_item(ds, i, px) for i, px in zip(pos, pixels)]
                keep = self._dedupe(chunk, [_where(ds, i) for i in pos], rep, seen)
                if keep and not readd:
                    with self.lock:
                        gone = self.cat.removed_of(chunk[j].id for j in keep)
                    rep.removed_before.extend((_where(ds, pos[j]), C.fmt_id(chunk[j].id)) for j in keep
                                              if chunk[j].id in gone)
                    keep = [j for j in keep if chunk[j].id not in gone]
                if keep:
                    if cached is not None:
                        logits = cached[[pos[j] for j in keep]]
                    else:
                        logits = enc.logits(query_set([pixels[j] for j in keep]), progress=False)
                    codes.append(logits_to_codes(logits))
                    items.extend(chunk[j] for j in keep)
                bar.update(len(pixels) + (min(start + ADD_CHUNK, len(ds)) - start - len(pixels)))
        if rep.skipped and len(rep.skipped) > len(ds.skipped):
            log.warning("%s: skipped %d unreadable image(s), first: %s (%s); use --strict to stop instead",
                        ds.name, len(rep.skipped), rep.skipped[0][0], rep.skipped[0][1])
        if items:
            self._insert(items, np.concatenate(codes), enc.version, action, command,
                         {"data": str(getattr(data, "name", data)), "duplicates": len(rep.duplicates),
                          "skipped": len(rep.skipped), "from_feature_cache": cached is not None}, readd=readd)
        rep.added = len(items)
        rep.seconds = time.perf_counter() - t0
        return rep

    def add_codes(self, items: Sequence[NewItem], codes: np.ndarray, *, model_version: str,
                  command: str | None = None, action: str = "add", detail: Mapping[str, Any] | None = None) -> int:
        """Add images already encoded (by the current model, as ``model_version`` must say; checked again
        inside the transaction)."""
        if model_version != self.model_version:
            raise ModelVersionError(f"codes of model {model_version} cannot be added to an index of model "
                                    f"{self.model_version}; encode them with model {self.model_version}")
        codes = np.asarray(codes)
        if codes.shape != (len(items), self.bits // 8) or codes.dtype != np.uint8:
            raise FedhashError(f"codes must be uint8 ({len(items)}, {self.bits // 8}), got {codes.dtype} {codes.shape}")
        self._insert(list(items), codes, model_version, action, command, dict(detail or {}))
        return len(items)

    def add_encoded(self, ds: ImageSet, idx: np.ndarray, codes: np.ndarray, *, model_version: str,
                    command: str | None = None, action: str = "add", detail: Mapping[str, Any] | None = None,
                    digests: Sequence[tuple[int, str]] | None = None) -> AddReport:
        """Add images ``idx`` of ``ds`` whose codes (row j for image ``idx[j]``) are already computed, skipping
        those indexed already (what a federation's index phase does with the codes it scored). ``digests``:
        their (content id, sha256), when known (:meth:`hashing.silos.Silo.content_digests`)."""
        t0 = time.perf_counter()
        idx = np.asarray(idx)
        rep = AddReport()
        items, fresh = self._fresh(ds, rep, idx, digests)
        with self.lock:
            gone = self.cat.removed_of(it.id for it in items)
        if gone:  # a deletion request stands: the federation does not index those images again
            rep.removed_before.extend((f"{ds.name}", C.fmt_id(i)) for i in gone)
            keep = [j for j, it in enumerate(items) if it.id not in gone]
            items, fresh = [items[j] for j in keep], [fresh[j] for j in keep]
        row = {int(i): j for j, i in enumerate(idx.tolist())}
        if items:
            self.add_codes(items, np.asarray(codes)[[row[i] for i in fresh]], model_version=model_version,
                           command=command, action=action,
                           detail={**(detail or {}), "duplicates": len(rep.duplicates)})
        rep.added, rep.seconds = len(items), time.perf_counter() - t0
        return rep

    def _fresh(self, ds: ImageSet, rep: AddReport, idx: np.ndarray | None = None,
               digests: Sequence[tuple[int, str]] | None = None) -> tuple[list[NewItem], list[int]]:
        """The images of ``ds`` (``idx``; default all) not indexed yet, and their positions in ``ds``;
        duplicates (same pixels as an indexed image, or as an earlier one of ``ds``) go to ``rep``."""
        idx = np.arange(len(ds)) if idx is None else np.asarray(idx)
        items = new_items(ds, idx, digests)
        keep = self._dedupe(items, [_where(ds, int(i)) for i in idx], rep, {})
        return [items[j] for j in keep], [int(idx[j]) for j in keep]

    def _dedupe(self, items: Sequence[NewItem], wheres: Sequence[str], rep: AddReport,
                seen: dict[int, str]) -> list[int]:
        """Positions in ``items`` of the images neither indexed nor ``seen`` (content id -> sha256, updated);
        the others go to ``rep.duplicates``; a collision (same id, other pixels) raises."""
        with self.lock:
            known = self.cat.known(it.id for it in items)
        keep = []
        for j, it in enumerate(items):
            other = known.get(it.id, seen.get(it.id))
            if other is not None:
                if other != it.sha256:
                    raise DataError(f"content id {C.fmt_id(it.id)} of {wheres[j]} collides with a different "
                                    "image already in the index (63 bits of sha256 agree); nothing was added: "
                                    "change one pixel of it and add it again")
                rep.duplicates.append((wheres[j], C.fmt_id(it.id)))
                continue
            seen[it.id] = it.sha256
            keep.append(j)
        return keep

    def _insert(self, items: list[NewItem], codes: np.ndarray, version: str, action: str, command: str | None,
                detail: dict[str, Any], readd: bool = False) -> None:
        """Insert ``items`` with ``codes`` of model ``version`` in one transaction: refused (nothing added)
        when the index's current model is no longer ``version`` (an upgrade ran meanwhile)."""
        with self.lock:
            with self.cat.transaction():
                if not readd:
                    gone = self.cat.removed_of(it.id for it in items)
                    if gone:
                        raise DataError(f"{len(gone)} of the images were removed from this index before (first "
                                        f"{C.fmt_id(next(iter(gone)))}, removed {next(iter(gone.values()))}); "
                                        "nothing was added: leave them out, or pass --readd to index them again")
                clash = self.cat.known(it.id for it in items)
                if clash:
                    raise DataError(f"{len(clash)} of the images were added by someone else meanwhile "
                                    f"(first {C.fmt_id(next(iter(clash)))}); nothing was added, run the add again")
                if self.cat.current_version != version:
                    raise ModelVersionError(f"the index was upgraded to model {self.cat.current_version} during "
                                            f"this add (encoded with {version}); nothing was added, run it again")
                self.cat.insert(items, codes, version)
                if readd:
                    self.cat.forget_removed([it.id for it in items])
                self.cat.log(action, len(items), version, detail, command)
                gen = self.cat.bump()
            ids = np.array([it.id for it in items], np.int64)
            self._after_write(gen, lambda idx: idx.add(codes, ids, model_version=version))

    # ------------------------------------------------------------------ remove
    def resolve(self, *, ids: Iterable[int | str] = (), paths: Iterable[str] = (),
                images: Iterable[np.ndarray | str] = ()) -> tuple[list[int], list[str]]:
        """(content ids held, what named nothing held) for ids, paths and images (pixels or files)."""
        with self.lock:
            return self._resolve(ids, paths, images)

    def _resolve(self, ids, paths, images) -> tuple[list[int], list[str]]:
        found, unknown = [], []
        for i in ids:
            cid = C.parse_id(i)
            (found.append(cid) if self.cat.held([cid]) else unknown.append(f"id {C.fmt_id(cid)}"))
        by_path = self.cat.ids_of_paths(str(Path(p).resolve()) if Path(p).exists() else str(p) for p in paths)
        for p, got in by_path.items():
            (found.extend(got) if got else unknown.append(f"path {p}"))
        for im in images:
            what = f"image {im}" if isinstance(im, (str, os.PathLike)) else "an image given by its pixels"
            px = load_images(im).image(0) if isinstance(im, (str, os.PathLike)) else im
            cid = C.content_id(px)
            (found.append(cid) if self.cat.held([cid]) else unknown.append(f"{what} (content id {C.fmt_id(cid)})"))
        return sorted(set(found)), unknown

    def remove(self, *, ids: Iterable[int | str] = (), paths: Iterable[str] = (),
               images: Iterable[np.ndarray | str] = (), missing_ok: bool = False,
               command: str | None = None) -> int:
        """Delete images by content id, path or content from the catalogue (every kept model version's
        codes with them) and the FAISS index, in one transaction. If any named image is not held,
        ``UnknownItemsError`` and nothing changes (unless ``missing_ok``). Returns how many were removed."""
        return self.remove_named(ids=ids, paths=paths, images=images, missing_ok=missing_ok, command=command)[0]

    def remove_named(self, *, ids: Iterable[int | str] = (), paths: Iterable[str] = (),
                     images: Iterable[np.ndarray | str] = (), missing_ok: bool = False,
                     command: str | None = None) -> tuple[int, list[str]]:
        """:meth:`remove`, returning also what named nothing held (left as it was; the rest is removed under ``missing_ok``)."""
        found, unknown = self.resolve(ids=ids, paths=paths, images=images)
        if unknown and not missing_ok:
            shown = "; ".join(unknown[:5]) + (f"; ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
            raise UnknownItemsError(f"not in the index {self.folder}: {shown}; nothing was removed "
                                    "(--missing-ok removes the others)")
        if not found:
            return 0, unknown
        with self.lock:
            with self.cat.transaction():
                held = self.cat.held(found)
                if len(held) != len(found):
                    gone = sorted(set(found) - set(held))
                    raise UnknownItemsError(f"{len(gone)} image(s) were removed by someone else meanwhile (first "
                                            f"{C.fmt_id(gone[0])}); nothing was removed, run it again")
                self.cat.delete(found)
                self.cat.mark_removed(found)
                self.cat.log("remove", len(found), self.cat.current_version,
                             {"ids": [C.fmt_id(i) for i in found[:1000]], "unknown": unknown[:1000]}, command)
                gen = self.cat.bump()
            arr = np.array(found, np.int64)
            # FAISS HNSW cannot delete: that index is rebuilt from the catalogue's codes instead
            self._after_write(gen, None if self.cat.get_meta("kind") == "hnsw" else (lambda idx: idx.remove(arr)))
            # nothing of a removed image stays behind: the kept versions' FAISS files (rebuilt from the
            # catalogue when needed) and the deleted pages (secure_delete zeroes them; the WAL is truncated)
            for f in (self.folder / "faiss").glob("*.faiss*"):
                if not f.name.startswith(self.model_version + "."):
                    f.unlink(missing_ok=True)
            self.cat.checkpoint()
        return len(found), unknown

    # ------------------------------------------------------------------ search
    def search(self, images: Sequence[np.ndarray] | ImageSet, k: int = 10, *, asymmetric: bool = False,
               rerank: int | None = None, timings: dict[str, float] | None = None) -> list[list[Hit]]:
        """Top-``k`` of each query image, encoded by the index's own model: symmetric Hamming, or the
        asymmetric soft-query re-rank (``asymmetric``; a Hamming shortlist of ``rerank``)."""
        ds = images if isinstance(images, ImageSet) else query_set(images)  # refuses what is not pixels
        for attempt in range(2):
            with self.lock:
                enc = self.encoder(self._sync().model_version)
            # encoding runs outside the lock (deletes, reads and other searches' FAISS steps go on meanwhile),
            # as many at a time as the cores hold torch's threads: more would only oversubscribe them
            with self._encode_slots:
                logits = enc.logits(ds, timings=timings)
            with self.lock:
                index = self._sync()
                if index.model_version != enc.version and attempt == 0:
                    continue  # upgraded meanwhile: encode again with the index's new model
                t0 = time.perf_counter()
                if asymmetric:
                    D, I = index.search_asymmetric(logits, k, rerank, model_version=enc.version)
                else:
                    D, I = index.search(logits_to_codes(logits), k, model_version=enc.version)
                hits = self._hits(D, I, np.isinf if asymmetric else (lambda d: d == np.iinfo(np.int32).max))
                if timings is not None:  # FAISS and the catalogue's rows of the hits
                    timings["search"] = timings.get("search", 0.0) + time.perf_counter() - t0
                return hits
        raise AssertionError("unreachable")  # pragma: no cover

    def search_codes(self, codes: np.ndarray, k: int = 10, *, model_version: str, ties: str = "faiss") -> list[list[Hit]]:
        """Top-``k`` of packed query codes (uint8 (n, bits/8)) that say which model encoded them
        (``ties="id"``: equal distances by ascending content id, :meth:`hashing.index.SiloIndex.search`)."""
        with self.lock:
            index = self._sync()
            D, I = index.search(np.asarray(codes), k, model_version=model_version, ties=ties)
            return self._hits(D, I, lambda d: d == np.iinfo(np.int32).max)

    def _hits(self, D: np.ndarray, I: np.ndarray, missing) -> list[list[Hit]]:
        rows = self.cat.items(int(i) for i in np.unique(I) if i >= 0)
        out = []
        for d, ids in zip(D, I):
            hits = []
            for r, (dist, i) in enumerate(zip(d, ids)):
                if i < 0 or missing(dist) or int(i) not in rows:  # removed by another process since _sync
                    continue
                it = rows[int(i)]
                hits.append(Hit(r + 1, int(i), float(dist), it.path, it.labels))
            out.append(hits)
        return out

    # ------------------------------------------------------------------ items
    def item(self, i: int | str) -> Item | None:
        cid = C.parse_id(i)
        with self.lock:
            return self.cat.item(cid)

    def image(self, i: int | str) -> np.ndarray:
        """The pixels of an indexed image as RGB (H, W, 3) uint8 (kept in the catalogue, or read from its
        file and checked against its content id)."""
        cid = C.parse_id(i)
        with self.lock:
            it = self.cat.item(cid)
            if it is None:
                raise UnknownItemsError(f"id {C.fmt_id(cid)} is not in the index {self.folder}")
            if it.path is None:
                return C.canonical_pixels(C.blob_pixels(self.cat.pixels(cid)))
        try:
            px = load_images(it.path).image(0)
        except (FedhashError, OSError) as e:
            raise DataError(f"image {C.fmt_id(cid)} at {it.path} cannot be read ({e}); remove it from the index") from e
        if C.content_digest(px)[1] != it.sha256:
            raise DataError(f"the file {it.path} changed since it was indexed as {C.fmt_id(cid)}; "
                            "remove it and add it again")
        return px

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        cur = self.model_version
        enc = self.encoder(cur)
        return {"folder": str(self.folder), "count": len(self), "model_version": cur, "bits": self.bits,
                "previous_version": self.cat.previous_version, "generation": self.cat.generation,
                "kind": self.cat.get_meta("kind", "flat"), "backbone": enc.backbone_name, "size": enc.size,
                "privacy": enc.record.get("privacy", {}), "content_fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        ids, _ = self.cat.codes(self.model_version)
        return C.fingerprint(ids)

    # ------------------------------------------------------------------ versions
    def _keep_model(self, enc: Encoder) -> None:
        path = self.model_path(enc.version)
        if not path.is_file():
            write_record(path, enc.record)

    def upgrade(self, model: str | os.PathLike | Encoder, *, command: str | None = None) -> int:
        """Re-encode every image under a new model beside the current codes, then swap in one transaction.

        Until the swap the index serves the old model; a failure (or a kill) before it changes nothing.
        The old model stays kept for :meth:`rollback` until the next upgrade. Returns how many were encoded."""
        enc = model if isinstance(model, Encoder) else Encoder.load(model, weights=self.weights, cache_dir=self.cache_dir)
        old = self.model_version
        if enc.version == old:
            raise FedhashError(f"the index already holds codes of model {old}; nothing to upgrade")
        with self.lock:
            items = self.cat.all_items()
        ds = self._images_of(items)
        # the encoder writes nothing to the feature cache: no features of indexed images stay behind a removal
        codes = enc.codes(ds) if items else np.zeros((0, enc.bits // 8), np.uint8)
        with self.lock:
            with self.cat.transaction():
                self._keep_model(enc)  # under SQLite's write lock, as the pruning below: neither races another upgrade
                now_ids = {r[0] for r in self.cat.db.execute("SELECT id FROM items")}
                if now_ids != {it.id for it in items} or self.cat.current_version != old:
                    raise FedhashError("the index changed during the upgrade (an add or remove ran meanwhile); "
                                       "nothing was changed, run the upgrade again")
                for v in self.cat.models():
                    if v not in (old, enc.version):
                        self.cat.drop_model(v)
                self.cat.drop_model(enc.version)  # codes left by an earlier failed upgrade
                self.cat.add_model(enc.version, str(self.model_path(enc.version).relative_to(self.folder)), enc.bits)
                self.cat.put_codes(enc.version, [it.id for it in items], codes)
                self.cat.set_meta("previous_version", old)
                self.cat.set_meta("model_version", enc.version)
                self.cat.set_meta("backbone", enc.backbone_name)
                self.cat.log("upgrade", len(items), enc.version, {"from": old, "to": enc.version}, command)
                self.cat.bump()
                self._prune_files()
            self._encoders[enc.version] = enc
            self._index = None
            self._sync()
        return len(items)

    def rollback(self, *, command: str | None = None) -> str:
        """Back to the previous model (kept since the last upgrade); returns its version."""
        with self.lock:
            with self.cat.transaction():
                prev, cur = self.cat.previous_version, self.cat.current_version
                if not prev or prev not in self.cat.models():
                    raise FedhashError(f"index {self.folder} keeps no previous model to roll back to")
                missing = len(self.cat) - self.cat.count_codes(prev)
                if missing:
                    raise FedhashError(f"{missing} image(s) were added after the upgrade and have no codes of model "
                                       f"{prev}; upgrade to it instead: fedhash index upgrade --model <its model file>")
                self.cat.set_meta("model_version", prev)
                self.cat.set_meta("previous_version", cur)
                self.cat.log("rollback", len(self.cat), prev, {"from": cur, "to": prev}, command)
                self.cat.bump()
            self._index = None
            self._sync()
        return prev

    def _prune_files(self) -> None:
        kept = set(self.cat.models())
        for sub, suffixes in (("models", (".pt",)), ("faiss", (".faiss", ".faiss.meta.json"))):
            for f in (self.folder / sub).glob("*"):
                name = f.name
                version = next((name[: -len(s)] for s in suffixes if name.endswith(s)), None)
                if version is not None and version not in kept:
                    f.unlink(missing_ok=True)

    def _images_of(self, items: Sequence[Item]) -> ImageSet:
        """The images of catalogue rows, for re-encoding: kept pixels, or the files (checked unchanged)."""
        paths = [it.path for it in items]
        if all(p is None for p in paths):
            with self.lock:
                blobs = [self.cat.pixels(it.id) for it in items]
            if any(b is None for b in blobs):
                raise FedhashError("the index changed during the upgrade (a remove ran meanwhile); "
                                   "nothing was changed, run the upgrade again")
            ims = [C.blob_pixels(b) for b in blobs]
            if len({im.shape for im in ims}) == 1:
                return ImageSet("catalogue", np.zeros(len(ims), np.int64), ["-"], images=np.stack(ims))
        bad = []
        arrays = []
        for it in items:
            try:
                px = self.image(it.id)
            except DataError as e:
                bad.append(str(e))
                continue
            arrays.append(px)
        if bad:
            raise DataError(f"{len(bad)} indexed image(s) cannot be re-encoded; first: {bad[0]}")
        return _ListSet(arrays)


class _ListSet(ImageSet):
    """Images of different sizes held in memory (queries, re-encoding): ``image(i)`` of a list."""

    def __init__(self, arrays: Sequence[np.ndarray], name: str = "query"):
        # grey becomes three equal channels: what the backbone's normalisation makes of grey anyway
        self._arrays = [C.canonical_pixels(a) for a in arrays]  # refuses what is not pixels
        if not self._arrays:
            raise DataError("no images given; pass at least one")
        super().__init__(name=name, labels=np.zeros(len(self._arrays), np.int64), classes=["-"],
                         paths=[f"<{name} {i}>" for i in range(len(self._arrays))])

    def image(self, i: int) -> np.ndarray:
        return self._arrays[i]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for a in self._arrays:
            h.update(C.content_digest(a)[1].encode())
        return h.hexdigest()[:16]


def query_set(images: Sequence[np.ndarray]) -> ImageSet:
    """Query images (uint8 pixels, any sizes) as an ImageSet the encoder reads."""
    return _ListSet(list(images))


# --------------------------------------------------------------------------- doors


def create(folder: str | os.PathLike, model: str | os.PathLike | Encoder, *, weights: str | None = None,
           cache_dir: str | os.PathLike | None = None, kind: str = "flat", overwrite: bool = False) -> SearchIndex:
    """An empty index of ``model`` in ``folder`` (which must not hold an index yet, unless ``overwrite``)."""
    folder = Path(folder)
    exists = (folder / CATALOGUE).exists()
    if exists and not overwrite:
        raise FedhashError(f"{folder} already holds an index; add to it (fedhash index add), upgrade it, "
                           "or pass another --out")
    if kind != "flat":
        raise FedhashError(f"an index folder is kind 'flat' (exact, removable); {kind!r} is a SiloIndex option "
                           "for codes in memory (hashing.index), not for a silo's catalogue")
    enc = model if isinstance(model, Encoder) else Encoder.load(model, weights=weights, cache_dir=cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    idx = SearchIndex(folder, weights=weights, cache_dir=cache_dir, _create=True)
    with idx.lock, idx.cat.transaction():
        n = len(idx.cat)
        if exists:  # --overwrite: the old content goes in the same transaction; the audit log stays
            idx.cat.db.execute("DELETE FROM items")
            for v in idx.cat.models():
                idx.cat.drop_model(v)
            idx.cat.set_meta("previous_version", "")
            idx.cat.log("overwrite", n, enc.version, {"removed": n})
        if not idx.cat.get_meta("uuid"):
            idx.cat.set_meta("uuid", uuid.uuid4().hex)
        idx._keep_model(enc)
        idx.cat.add_model(enc.version, f"models/{enc.version}.pt", enc.bits)
        idx.cat.set_meta("model_version", enc.version)
        idx.cat.set_meta("kind", kind)
        idx.cat.set_meta("backbone", enc.backbone_name)
        idx.cat.bump()
        idx._prune_files()
    idx.cat.checkpoint()
    idx._encoders[enc.version] = enc
    idx._sync()
    return idx


def build(folder: str | os.PathLike, model: str | os.PathLike | Encoder, data: str | os.PathLike | ImageSet, *,
          weights: str | None = None, cache_dir: str | os.PathLike | None = None, kind: str = "flat",
          strict: bool = False, overwrite: bool = False, command: str | None = None) -> tuple[SearchIndex, AddReport]:
    """Encode the images of ``data`` with ``model`` and index them in ``folder``."""
    ds = load_images(data, strict=strict)  # bad data fails before the folder is made
    idx = create(folder, model, weights=weights, cache_dir=cache_dir, kind=kind, overwrite=overwrite)
    rep = idx.add(ds, command=command, action="build")
    return idx, rep


def open_index(folder: str | os.PathLike, *, weights: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> SearchIndex:
    return SearchIndex(folder, weights=weights, cache_dir=cache_dir)


def brute_force(codes: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k by Hamming over packed codes, ties by id (for tests and benchmarks)."""
    from .codes import topk_by_id

    return topk_by_id(codes, ids, query, k)


__all__ = ["SearchIndex", "Hit", "AddReport", "UnknownItemsError", "build", "create", "open_index", "load_images",
           "new_items", "query_set", "brute_force"]
