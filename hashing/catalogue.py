"""A silo's catalogue: one SQLite database (the standard library's ``sqlite3``) that says what an index
holds, and the append-only audit trail of every change.

One row per indexed image in ``items``: its **content id** (63 bits of the sha256 of its pixels, so the
same picture has the same id at every site and in every file format, and two different pictures are
told apart), the full sha256 (a collision of two different images on 63 bits is detected and refused),
its path (or, for an image that exists only in memory, its pixels), its labels and when it was added.
``codes`` holds each image's packed code under each model version the index keeps (the current one,
and the previous one until the next upgrade, for a rollback); ``models`` the versions; ``audit`` every
build, add, remove, upgrade and rollback (what, when, how many, by which command), which triggers keep
append-only. ``meta`` holds the current model version and a **generation** that every change bumps:
the FAISS file beside the database (:mod:`hashing.retrieval`) is stamped with it, so a FAISS file that
does not match the catalogue (a crash between the two writes) is rebuilt from the catalogue's codes.

Every change is one SQLite transaction (``BEGIN IMMEDIATE``): a crash or ``kill -9`` leaves either the
old or the new state, never a mix.

**Rows verified on read.** Each ``items`` row carries a ``checksum`` (sha256 of its id, sha256, path,
labels, times and whether it keeps pixels) and each ``codes`` row one of its model version, id and code;
an image's kept pixels are checked against its content sha256. Reading a row that does not match (a hit's
labels, a code when the FAISS file is rebuilt, the pixels) is an :class:`~hashing.errors.IntegrityError`
that names the catalogue, the image and the fix. A catalogue written before these checksums gets the
column on first open, and its old rows (``checksum`` NULL) are read unverified.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, FedhashError, IntegrityError

FORMAT = 1
ID_BITS = 63
_ID_MASK = (1 << ID_BITS) - 1
_CONTENT_TAG = b"fedhash-content-v1\0"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,          -- content id: 63 bits of sha256(pixels)
    sha256 TEXT NOT NULL,
    path TEXT,                       -- the image file, or NULL when the pixels are kept here
    pixels BLOB,                     -- an in-memory image's pixels (npy bytes), else NULL
    labels TEXT NOT NULL,            -- JSON list of class names
    added TEXT NOT NULL,
    added_version TEXT NOT NULL,     -- the model version current when it was added
    checksum TEXT                    -- sha256 of the row (row_checksum); NULL: written before checksums
);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE TABLE IF NOT EXISTS models (
    version TEXT PRIMARY KEY, file TEXT NOT NULL, created TEXT NOT NULL, bits INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS codes (
    version TEXT NOT NULL REFERENCES models(version) ON DELETE CASCADE,
    id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    code BLOB NOT NULL,
    checksum TEXT,                   -- sha256 of version, id and code (code_checksum)
    PRIMARY KEY (version, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS removed (     -- content ids removed: a deletion request stands against a re-add
    id INTEGER PRIMARY KEY, time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, action TEXT NOT NULL, count INTEGER NOT NULL,
    model_version TEXT, command TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def this_command() -> str:
    """The command line of this process, as the audit log records it."""
    return shlex.join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])


# --------------------------------------------------------------------------- content ids


def canonical_pixels(image: np.ndarray) -> np.ndarray:
    """An image's pixels as the content id sees them: uint8 RGB (H, W, 3); grey is copied to three
    channels, so a grey array and its PNG export have the same id."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise DataError(f"an image must be uint8 pixels, got {x.dtype}; convert it (e.g. PIL's .convert('RGB'))")
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    elif x.ndim == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        raise DataError(f"an image must be (H, W) grey or (H, W, 3) RGB pixels, got shape {x.shape}")
    return np.ascontiguousarray(x)


def content_digest(image: np.ndarray) -> tuple[int, str]:
    """(content id, sha256 hex) of an image's pixels: the id is the sha256's first 63 bits."""
    x = canonical_pixels(image)
    h = hashlib.sha256(_CONTENT_TAG + f"{x.shape[0]}x{x.shape[1]}\0".encode())
    h.update(x.data)
    digest = h.digest()
    return int.from_bytes(digest[:8], "big") & _ID_MASK, digest.hex()


def content_id(image: np.ndarray) -> int:
    return content_digest(image)[0]


def fmt_id(i: int) -> str:
    """A content id as the CLI, the HTTP API and the page show it: 16 hex digits (JSON numbers lose
    precision above 2**53, so the API never sends ids as numbers)."""
    return f"{int(i):016x}"


def parse_id(s: str | int) -> int:
    """A content id from its 16 hex digits (or an int)."""
    if isinstance(s, (int, np.integer)):
        v = int(s)
    else:
        t = str(s).strip().lower()
        try:
            v = int(t, 16)
        except ValueError:
            raise FedhashError(f"{s!r} is not a content id; ids are 16 hex digits, as fedhash search prints them") from None
    if not 0 <= v <= _ID_MASK:
        raise FedhashError(f"{s!r} is not a content id (ids are 63-bit, 16 hex digits below 8000000000000000)")
    return v


def fingerprint(ids: Iterable[int], domain: str = "none") -> str:
    """sha256 (16 hex) of a set of content ids (sorted): which images, never what they hold. Two sites
    with different images never share it."""
    arr = np.sort(np.fromiter((int(i) for i in ids), dtype=np.int64))
    h = hashlib.sha256(b"fedhash-content-ids-v1\0" + np.ascontiguousarray(arr, dtype="<i8").tobytes())
    h.update(b"\0domain=" + domain.encode())
    return h.hexdigest()[:16]


def pixels_blob(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def blob_pixels(blob: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(blob), allow_pickle=False)


# --------------------------------------------------------------------------- row checksums


def row_checksum(i: int, sha256: str, path: str | None, labels: str, added: str, added_version: str,
                 has_pixels: bool) -> str:
    """sha256 of an ``items`` row: every field as stored (``labels`` its JSON text), the pixels by their
    presence (their bytes are covered by the content ``sha256``). Fields are NUL-separated: none holds a
    NUL (a path cannot, JSON escapes it), so no two rows share an encoding."""
    where = "\1" if path is None else path
    return hashlib.sha256(f"fedhash-item-v1\0{int(i)}\0{sha256}\0{where}\0{labels}\0{added}\0{added_version}\0"
                          f"{int(bool(has_pixels))}".encode("utf-8", "surrogateescape")).hexdigest()


def code_checksum(version: str, i: int, code: bytes) -> str:
    """sha256 of a ``codes`` row: its model version, content id and packed code."""
    return hashlib.sha256(f"fedhash-code-v1\0{version}\0{int(i)}\0".encode() + bytes(code)).hexdigest()


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Item:
    """One catalogue row: an indexed image."""

    id: int
    sha256: str
    path: str | None  # None: the pixels are kept in the catalogue
    labels: tuple[str, ...]
    added: str
    added_version: str

    def to_json(self) -> dict[str, Any]:
        return {"id": fmt_id(self.id), "sha256": self.sha256, "path": self.path, "labels": list(self.labels),
                "added": self.added, "added_version": self.added_version}


@dataclass(frozen=True)
class NewItem:
    """An image about to be added: its content id and digest, where it is, its labels."""

    id: int
    sha256: str
    path: str | None
    labels: tuple[str, ...]
    pixels: bytes | None = None  # for an image with no file


_ITEM_COLS = "id, sha256, path, labels, added, added_version, pixels IS NOT NULL, checksum"


def _fix(what: str) -> str:
    return (f"{what} was changed or damaged: remove that image and add it again (fedhash index remove, then "
            "add), or restore the catalogue from a backup")


class Catalogue:
    """The SQLite catalogue of one index folder. Thread-safe for one process (one connection, serialised
    by the caller's lock); several processes are serialised by SQLite's own file lock."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FedhashError(f"no catalogue at {self.path}; build the index first (fedhash index build)")
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA secure_delete=ON")  # a removed image's row and pixels are overwritten
            # reads through a memory map and a larger page cache: a search's row lookups copy no pages
            self.db.execute("PRAGMA mmap_size=1073741824")
            self.db.execute("PRAGMA cache_size=-65536")
            if create:
                self.db.executescript(_SCHEMA)
            fmt = self.get_meta("format")
            if fmt == str(FORMAT) or (fmt is None and create):
                self._checksum_columns()
        except sqlite3.DatabaseError as e:
            raise FedhashError(f"catalogue {self.path} is not a readable SQLite database ({e}); "
                               "restore it from a backup or rebuild the index") from e
        if fmt is None and create:
            with self.transaction():
                self.set_meta("format", str(FORMAT))
                self.set_meta("generation", "0")
        elif fmt != str(FORMAT):
            raise FedhashError(f"catalogue {self.path} has format {fmt!r}, this fedhash reads format {FORMAT}; "
                               "rebuild the index with this fedhash")

    def _checksum_columns(self) -> None:
        """The row checksum columns, and what the reads select. A catalogue written before row checksums gets the
        columns (its old rows stay NULL: unverified); a read-only one is read as it is, unverified."""
        has = {}
        for table in ("items", "codes"):
            has[table] = "checksum" in [r[1] for r in self.db.execute(f"PRAGMA table_info({table})")]
            if not has[table]:
                try:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN checksum TEXT")
                    has[table] = True
                except sqlite3.OperationalError:
                    pass
        self._item_cols = _ITEM_COLS if has["items"] else _ITEM_COLS.replace(", checksum", ", NULL")
        self._items_by_ids = f"SELECT {self._item_cols} FROM items WHERE id IN (SELECT value FROM json_each(?))"
        self._code_sum = "c.checksum" if has["codes"] else "NULL"

    def _row(self, row: Sequence[Any]) -> Item:
        """An ``items`` row as read, checked against its checksum."""
        if row[7] is not None and row_checksum(*row[:7]) != row[7]:
            raise IntegrityError(f"catalogue {self.path}: the row of image {fmt_id(row[0])} does not match its "
                                 f"checksum (its path, labels or times); {_fix('the row')}")
        try:
            labels = tuple(json.loads(row[3]))
        except (ValueError, TypeError) as e:
            raise IntegrityError(f"catalogue {self.path}: the labels of image {fmt_id(row[0])} are not a JSON list "
                                 f"({e}); {_fix('the row')}") from e
        return Item(int(row[0]), row[1], row[2], labels, row[4], row[5])

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ transactions and meta
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything in it lands, or none of it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, str(value)))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def bump(self) -> int:
        g = self.generation + 1
        self.set_meta("generation", g)
        return g

    @property
    def current_version(self) -> str | None:
        return self.get_meta("model_version")

    @property
    def previous_version(self) -> str | None:
        return self.get_meta("previous_version")

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def items(self, ids: Iterable[int]) -> dict[int, Item]:
        # one statement for any number of ids (SQLite keeps it prepared): a search's hits cost one lookup
        ids = json.dumps([int(i) for i in ids])
        return {int(r[0]): self._row(r) for r in self.db.execute(self._items_by_ids, (ids,))}

    def held(self, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` the catalogue holds, their rows unread (so a damaged row can still be removed)."""
        ids = json.dumps([int(i) for i in ids])
        return {int(r[0]) for r in self.db.execute("SELECT id FROM items WHERE id IN (SELECT value FROM json_each(?))",
                                                   (ids,))}

    def item(self, i: int) -> Item | None:
        return self.items([i]).get(int(i))

    def all_items(self) -> list[Item]:
        return [self._row(r) for r in self.db.execute(f"SELECT {self._item_cols} FROM items ORDER BY id")]

    def ids_of_paths(self, paths: Iterable[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for p in paths:
            out[p] = [int(r[0]) for r in self.db.execute("SELECT id FROM items WHERE path = ?", (p,))]
        return out

    def known(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: sha256} of the given ids that the catalogue holds."""
        return {i: it.sha256 for i, it in self.items(ids).items()}

    def pixels(self, i: int) -> bytes | None:
        """The pixels kept for an image with no file (npy bytes), checked against its content sha256."""
        row = self.db.execute("SELECT pixels, sha256 FROM items WHERE id = ?", (int(i),)).fetchone()
        if row is None or row[0] is None:
            return None
        try:
            ok = content_digest(blob_pixels(row[0])) == (int(i), row[1])
        except (ValueError, OSError, DataError):
            ok = False
        if not ok:
            raise IntegrityError(f"catalogue {self.path}: the pixels kept for image {fmt_id(i)} do not match its "
                                 f"content sha256; {_fix('they')}")
        return row[0]

    def codes(self, version: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (n,), packed codes uint8 (n, bits/8)) of a model version, by id."""
        bits = self.model_bits(version)
        # joined with items: a code whose image is gone (a row deleted without foreign keys on) never counts
        rows = self.db.execute(f"SELECT c.id, c.code, {self._code_sum} FROM codes c JOIN items i ON i.id = c.id "
                               "WHERE c.version = ? ORDER BY c.id", (version,)).fetchall()
        for r in rows:
            if r[2] is not None and code_checksum(version, r[0], r[1]) != r[2]:
                raise IntegrityError(f"catalogue {self.path}: the code of image {fmt_id(r[0])} under model {version} "
                                     f"does not match its checksum; {_fix('the code')}")
            if len(r[1]) != bits // 8:
                raise IntegrityError(f"catalogue {self.path}: the code of image {fmt_id(r[0])} under model {version} "
                                     f"has {len(r[1])} bytes, the model's codes {bits // 8}; {_fix('the code')}")
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        codes = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(len(rows), bits // 8)
        return ids, codes.copy()

    def count_codes(self, version: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM codes c JOIN items i ON i.id = c.id WHERE c.version = ?",
                                   (version,)).fetchone()[0])

    def models(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {"file": r[1], "created": r[2], "bits": int(r[3])}
                for r in self.db.execute("SELECT version, file, created, bits FROM models")}

    def model_bits(self, version: str) -> int:
        row = self.db.execute("SELECT bits FROM models WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise FedhashError(f"the catalogue {self.path} keeps no model {version}")
        return int(row[0])

    def audit(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT seq, time, action, count, model_version, command, detail FROM audit ORDER BY seq")
        return [{"seq": r[0], "time": r[1], "action": r[2], "count": r[3], "model_version": r[4],
                 "command": r[5], "detail": json.loads(r[6])} for r in rows]

    # ------------------------------------------------------------------ writes (inside a transaction)
    def insert(self, items: Sequence[NewItem], codes: np.ndarray, version: str) -> None:
        t = now()
        rows = []
        for it in items:
            labels = json.dumps(list(it.labels))
            rows.append((it.id, it.sha256, it.path, it.pixels, labels, t, version,
                         row_checksum(it.id, it.sha256, it.path, labels, t, version, it.pixels is not None)))
        self.db.executemany("INSERT INTO items(id, sha256, path, pixels, labels, added, added_version, checksum) "
                            "VALUES(?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self.put_codes(version, [it.id for it in items], codes)

    def put_codes(self, version: str, ids: Sequence[int], codes: np.ndarray) -> None:
        def rows():
            for j, i in enumerate(ids):
                code = codes[j].tobytes()
                yield version, int(i), code, code_checksum(version, i, code)

        self.db.executemany("INSERT INTO codes(version, id, code, checksum) VALUES(?, ?, ?, ?)", rows())

    def delete(self, ids: Sequence[int]) -> None:
        self.db.executemany("DELETE FROM items WHERE id = ?", ((int(i),) for i in ids))

    def mark_removed(self, ids: Sequence[int]) -> None:
        t = now()
        self.db.executemany("INSERT OR REPLACE INTO removed(id, time) VALUES(?, ?)", ((int(i), t) for i in ids))

    def forget_removed(self, ids: Sequence[int]) -> None:
        self.db.executemany("DELETE FROM removed WHERE id = ?", ((int(i),) for i in ids))

    def removed_of(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: when removed} of the given ids that were removed from this index before."""
        ids = json.dumps([int(i) for i in ids])
        return {int(r[0]): r[1] for r in self.db.execute(
            "SELECT id, time FROM removed WHERE id IN (SELECT value FROM json_each(?))", (ids,))}

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it (no old page stays in the WAL)."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:  # another connection is reading: SQLite retries at its next checkpoint
            pass

    def add_model(self, version: str, file: str, bits: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO models(version, file, created, bits) VALUES(?, ?, ?, ?)",
                        (version, file, now(), int(bits)))

    def drop_model(self, version: str) -> None:
        self.db.execute("DELETE FROM models WHERE version = ?", (version,))  # its codes go by cascade

    def log(self, action: str, count: int, model_version: str | None, detail: dict[str, Any] | None = None,
            command: str | None = None) -> None:
        self.db.execute("INSERT INTO audit(time, action, count, model_version, command, detail) VALUES(?, ?, ?, ?, ?, ?)",
                        (now(), action, int(count), model_version, command or this_command(),
                         json.dumps(detail or {}, sort_keys=True, default=str)))
