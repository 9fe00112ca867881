"""A silo's local binary Hamming index over FAISS.

Codes follow :mod:`hashing.codes`: uint8 arrays of shape (n, bits/8), bit k in byte k // 8 at position
k % 8 (``np.packbits(..., bitorder="little")``), which is the layout FAISS binary indexes use.

Kinds
-----
``flat`` (default)
    ``IndexBinaryIDMap2`` over ``IndexBinaryFlat``: exact search, supports ``remove``.
``hnsw``
    ``IndexBinaryHNSW`` (param ``M``, default 32; ``efSearch``, ``efConstruction``) inside
    ``IndexBinaryIDMap2``: approximate, cannot remove ids.
``ivf``
    ``IndexBinaryIVF`` with a flat binary quantizer (params ``nlist``, default 256, and ``nprobe``,
    default 16), trained on the codes of the first ``add`` (which must hold at least ``nlist`` codes).
    Native ``add_with_ids`` / ``remove_ids`` with a hash-table direct map so codes can be reconstructed
    by id. Exact when ``nprobe == nlist``.

Every query must say which model produced it: pass ``model_version=`` or hand in a :class:`Codes`
array (an ``np.ndarray`` carrying ``.model_version``). Searching an index of another model version
raises :class:`ModelVersionError`.

Padding: when fewer than ``k`` results exist (fewer than ``k`` codes stored, or an approximate kind
found fewer), the missing slots have id ``-1`` and distance ``INT32_MAX`` (``search``) or ``inf``
(``search_asymmetric``). FAISS itself pads flat/IVF with ``INT32_MAX`` but HNSW with ``INT32_MIN``;
this class makes it uniform.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import codes as _codes
from .atomic import atomic_path, json_digest, sealed, sha256_file, write_json
from .errors import CodeLengthError, ConfigError, FedhashError, IntegrityError, ModelVersionError

FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "ivf")
PAD_DISTANCE = np.iinfo(np.int32).max
_DEFAULTS = {
    "flat": {},
    "hnsw": {"M": 32, "efSearch": 64, "efConstruction": 40},
    "ivf": {"nlist": 256, "nprobe": 16},
}
# _BITS[t, v] = bit t of byte value v (little bit order, as np.packbits(bitorder="little"))
_BITS = ((np.arange(256)[None, :] >> np.arange(8)[:, None]) & 1).astype(np.float64)


def set_num_threads(n: int) -> None:
    """Set FAISS's (OpenMP) thread count for the whole process. SiloIndex never does this itself."""
    faiss.omp_set_num_threads(int(n))


class Codes(np.ndarray):
    """Packed codes (or logits) that remember which model version produced them.

    ``Codes(array, model_version)``; slices and views keep ``.model_version``.
    """

    model_version: str | None

    def __new__(cls, array: Any, model_version: str | None) -> "Codes":
        obj = np.asarray(array).view(cls)
        obj.model_version = None if model_version is None else str(model_version)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.model_version = getattr(obj, "model_version", None)

    # pickling (Ray, multiprocessing) keeps the version: without these, ndarray's own pickle drops it
    def __reduce__(self):
        fn, args, state = super().__reduce__()
        return fn, args, (state, self.model_version)

    def __setstate__(self, state) -> None:
        nd_state, self.model_version = state
        super().__setstate__(nd_state)


class UnknownIdsError(FedhashError, KeyError):
    """``remove`` was asked for ids the index does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _fmt_ids(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else f" ({len(ids)} in all)"
    return f"[{shown}]{more}"


def _sidecar(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".meta.json")


class SiloIndex:
    """A silo's binary Hamming index of ``bits``-bit codes produced by model ``model_version``."""

    def __init__(self, bits: int, model_version: str, backbone: str = "", kind: str = "flat", **params: Any):
        self.bits = _codes.check_bits(bits)
        self.nbytes = self.bits // 8
        if model_version is None or str(model_version) == "":
            raise ConfigError("SiloIndex needs a model_version (the hash function's version string)")
        self.model_version = str(model_version)
        self.backbone = str(backbone)
        self.privacy: dict[str, Any] = {}  # the guarantee the hash function was trained under (federated runs)
        if kind not in KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
        self.kind = kind
        unknown = set(params) - set(_DEFAULTS[kind])
        if unknown:
            raise ConfigError(f"unknown parameter(s) {sorted(unknown)} for kind={kind!r}; "
                              f"allowed: {sorted(_DEFAULTS[kind]) or 'none'}")
        self.params: dict[str, Any] = {**_DEFAULTS[kind], **{k: int(v) for k, v in params.items()}}
        self.created: str | None = None
        self.generation: int | str | None = None  # the catalogue stamp it was saved at (hashing.retrieval)
        self._sorted_ids: np.ndarray | None = None  # lazily built, kept up to date by add/remove
        self._build()

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        d = self.bits
        if self.kind == "flat":
            self._inner = faiss.IndexBinaryFlat(d)
            self._index = faiss.IndexBinaryIDMap2(self._inner)
        elif self.kind == "hnsw":
            self._inner = faiss.IndexBinaryHNSW(d, self.params["M"])
            self._inner.hnsw.efConstruction = self.params["efConstruction"]
            self._inner.hnsw.efSearch = self.params["efSearch"]
            self._index = faiss.IndexBinaryIDMap2(self._inner)
        else:
            if self.params["nlist"] < 1 or self.params["nprobe"] < 1:
                raise ConfigError("ivf needs nlist >= 1 and nprobe >= 1")
            self._quantizer = faiss.IndexBinaryFlat(d)
            self._index = faiss.IndexBinaryIVF(self._quantizer, d, self.params["nlist"])
            self._index.nprobe = self.params["nprobe"]
            self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
            self._inner = None

    def _attach(self, index: Any) -> None:
        """Adopt a deserialised FAISS index (used by ``load``)."""
        self._index = index
        if self.kind in ("flat", "hnsw"):
            self._inner = faiss.downcast_IndexBinary(index.index)
        else:
            self._inner = None

    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters: ``efSearch`` (hnsw) or ``nprobe`` (ivf)."""
        allowed = {"hnsw": {"efSearch"}, "ivf": {"nprobe"}, "flat": set()}[self.kind]
        bad = set(params) - allowed
        if bad:
            raise ConfigError(f"cannot set {sorted(bad)} on kind={self.kind!r}; allowed: {sorted(allowed) or 'none'}")
        for name, value in params.items():
            value = int(value)
            if name == "efSearch":
                self._inner.hnsw.efSearch = value
            else:
                self._index.nprobe = value
            self.params[name] = value

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model_version": self.model_version,
            "bits": self.bits,
            "count": self.ntotal,
            "backbone": self.backbone,
            "kind": self.kind,
            "params": dict(self.params),
            "created": self.created,
            "privacy": dict(self.privacy),
            "generation": self.generation,
        }

    def __repr__(self) -> str:
        return (f"SiloIndex(bits={self.bits}, model_version={self.model_version!r}, kind={self.kind!r}, "
                f"ntotal={self.ntotal})")

    def _raw_ids(self) -> np.ndarray:
        """Stored ids as a fresh int64 array (storage order for flat/hnsw, list order for ivf)."""
        if self.kind in ("flat", "hnsw"):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        inv = self._index.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(l), inv.list_size(l)).copy()
                 for l in range(inv.nlist) if inv.list_size(l)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def _sorted(self) -> np.ndarray:
        if self._sorted_ids is None:
            self._sorted_ids = np.sort(self._raw_ids())
        return self._sorted_ids

    def ids(self) -> np.ndarray:
        """The stored ids, sorted ascending."""
        return self._sorted().copy()

    def _present(self, ids: np.ndarray) -> np.ndarray:
        s = self._sorted()
        if s.size == 0:
            return np.zeros(ids.shape, bool)
        pos = np.searchsorted(s, ids)
        pos[pos == s.size] = 0
        return s[pos] == ids

    # ------------------------------------------------------------------ checks
    def _check_codes(self, codes: Any, what: str) -> np.ndarray:
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.dtype != np.uint8 or arr.shape[1] != self.nbytes:
            if arr.ndim == 2 and arr.dtype == np.uint8:
                got = f"{arr.shape[1] * 8} bits"
            else:
                got = f"a {arr.dtype} array of shape {arr.shape} (expected uint8 of shape (n, {self.nbytes}))"
            raise CodeLengthError(
                f"{what} are {got}, this index holds {self.bits}-bit codes; "
                f"encode with the index's model ({self.model_version}) and pack with hashing.codes.pack")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return arr

    def _check_version(self, query: Any, model_version: Any, required: bool) -> None:
        carried = getattr(query, "model_version", None)
        if model_version is not None and carried is not None and str(model_version) != str(carried):
            raise ModelVersionError(
                f"model_version={model_version!r} was passed but the codes carry model version {carried!r}; "
                "pass the version the codes were encoded with")
        version = model_version if model_version is not None else carried
        if version is None:
            if required:
                raise FedhashError(
                    f"queries must say which model encoded them: pass model_version= "
                    f"(this index holds codes of model {self.model_version!r}) or hand in hashing.index.Codes")
            return
        if str(version) != self.model_version:
            raise ModelVersionError(
                f"codes from model {version} cannot be searched in an index of model {self.model_version}; "
                f"re-encode the queries with model {self.model_version} or rebuild the index")

    @staticmethod
    def _check_ids(ids: Any, n: int | None, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise FedhashError(f"{what} must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        if n is not None and arr.shape[0] != n:
            raise FedhashError(f"{what}: got {arr.shape[0]} ids for {n} codes; pass one id per code")
        if arr.size and arr.min() < 0:
            raise FedhashError(f"{what} must be >= 0 (-1 marks missing results), got {_fmt_ids(arr[arr < 0])}")
        return arr

    # the argument checks of add, remove and search (hashing.shards.ShardedIndex makes the same ones)
    def _add_args(self, codes: Any, ids: Any, model_version: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes, ids, sorted unique ids) of an add, or the error that refuses it."""
        self._check_version(codes, model_version, required=False)
        x = self._check_codes(codes, "codes")
        idx = self._check_ids(ids, x.shape[0], "ids")
        uniq, counts = np.unique(idx, return_counts=True)
        if uniq.size != idx.size:
            raise FedhashError(f"duplicate ids within this add: {_fmt_ids(uniq[counts > 1])}; ids must be unique")
        return x, idx, uniq

    def _remove_args(self, ids: Any) -> np.ndarray:
        """The sorted unique ids of a removal, or the error that refuses it."""
        if self.kind == "hnsw":
            raise FedhashError("an hnsw index cannot remove ids (FAISS HNSW has no deletion); "
                               "build the index with kind='flat' or kind='ivf' to remove")
        return np.unique(self._check_ids(ids, None, "ids to remove"))

    def _search_args(self, query_codes: Any, k: int, model_version: str | None) -> tuple[np.ndarray, int]:
        """(query codes, k) of a search, or the error that refuses it."""
        self._check_version(query_codes, model_version, required=True)
        q = self._check_codes(query_codes, "query codes")
        k = int(k)
        if k < 1:
            raise FedhashError(f"k must be >= 1, got {k}")
        return q, k

    # ------------------------------------------------------------------ mutation
    def add(self, codes: Any, ids: Any, *, model_version: str | None = None) -> None:
        """Add ``codes`` (uint8 (n, bits/8)) under ``ids`` (int64 (n,)).

        Duplicate ids, within the call or already stored, are refused and nothing is added.
        Codes carrying a ``model_version`` (``Codes``) or ``model_version=`` must match the index.
        """
        x, idx, uniq = self._add_args(codes, ids, model_version)
        if idx.size == 0:
            return
        present = self._present(uniq)
        if present.any():
            raise FedhashError(f"ids already in the index: {_fmt_ids(uniq[present])}; "
                               "remove them first or use new ids")
        if self.kind == "ivf" and not self._index.is_trained:
            nlist = self.params["nlist"]
            if x.shape[0] < nlist:
                raise FedhashError(
                    f"an ivf index with nlist={nlist} trains on its first add, which needs at least {nlist} "
                    f"codes (got {x.shape[0]}); add more codes at once, lower nlist, or use kind='flat'")
            self._index.train(x)
        self._index.add_with_ids(x, idx)
        if self._sorted_ids is not None:
            s = self._sorted_ids
            self._sorted_ids = np.insert(s, np.searchsorted(s, uniq), uniq)

    def remove(self, ids: Any) -> int:
        """Remove ``ids``; all must be stored, else ``UnknownIdsError`` and nothing changes.

        Repeated ids in the request count once. Returns the number of codes removed.
        """
        idx = self._remove_args(ids)
        if idx.size == 0:
            return 0
        present = self._present(idx)
        if not present.all():
            raise UnknownIdsError(f"ids not in the index: {_fmt_ids(idx[~present])}; nothing was removed")
        if self.kind == "flat":
            removed = self._index.remove_ids(idx)
        else:  # the hashtable direct map only accepts an IDSelectorArray
            sel = faiss.IDSelectorArray(idx.size, faiss.swig_ptr(idx))
            removed = self._index.remove_ids(sel)
        s = self._sorted_ids
        self._sorted_ids = np.delete(s, np.searchsorted(s, idx))
        if removed != idx.size:  # cannot happen unless FAISS and our view disagree
            self._sorted_ids = None
            raise FedhashError(f"FAISS removed {removed} of {idx.size} ids; the index may be inconsistent, rebuild it")
        return int(removed)

    # ------------------------------------------------------------------ search
    def search(self, query_codes: Any, k: int, *, model_version: str | None = None,
               ties: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
        """Hamming k-NN: ``(distances int32 (nq, k), ids int64 (nq, k))``, nearest first.

        Missing results (fewer than ``k`` found) have id -1 and distance ``INT32_MAX``.
        Ties at equal distance come in FAISS's order (unspecified), or with ``ties="id"`` by ascending
        id: then the k codes returned are the first k by (distance, id) of all the index holds (flat:
        exactly; FAISS is asked for more until the k-th distance's ties all fit), which is what lets a
        cross-silo merge equal one search over the union (:mod:`hashing.federated.search`).
        """
        if ties not in ("faiss", "id"):
            raise ConfigError(f"ties={ties!r}; use 'faiss' or 'id'")
        q, k = self._search_args(query_codes, k, model_version)
        if self.ntotal == 0:
            return (np.full((q.shape[0], k), PAD_DISTANCE, np.int32), np.full((q.shape[0], k), -1, np.int64))
        if ties == "id":
            return self._search_ties_by_id(q, k)
        return self._search(q, k)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = self._index.search(q, k)
        if self.kind != "flat" or k > self.ntotal:
            missing = I < 0
            if missing.any():
                D[missing] = PAD_DISTANCE
        return D, I

    def _search_ties_by_id(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.ntotal
        kk = min(n, max(2 * k, k + 16))
        while True:
            D, I = self._search(q, kk)
            if kk >= n or (D[:, -1] > D[:, k - 1]).all():
                break  # every code tied with a k-th hit is among the kk
            kk = min(n, 4 * kk)
        order = np.lexsort((np.where(I < 0, np.iinfo(np.int64).max, I), D), axis=1)[:, :k]
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        if D.shape[1] < k:
            pad = k - D.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=PAD_DISTANCE)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        return D, I

    def _candidates(self, q: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hamming top-r candidates: (hamming int32 (nq,r), ids int64 (nq,r), codes uint8 (nq,r,B))."""
        nq = q.shape[0]
        if self.kind in ("flat", "hnsw"):
            # search the inner index: labels are storage rows, which index both xb and id_map directly
            D, rows = self._inner.search(q, r)
            storage = self._inner if self.kind == "flat" else faiss.downcast_IndexBinary(self._inner.storage)
            n = self.ntotal
            xb = faiss.rev_swig_ptr(storage.xb.data(), n * self.nbytes).reshape(n, self.nbytes)  # no copy
            id_map = faiss.rev_swig_ptr(self._index.id_map.data(), n)
            valid = rows >= 0
            safe = np.where(valid, rows, 0)
            cand = xb[safe]  # fancy indexing copies, so the views above are not kept
            ids = np.where(valid, id_map[safe], -1).astype(np.int64, copy=False)
            return D, ids, cand
        D = np.empty((nq, r), np.int32)
        ids = np.empty((nq, r), np.int64)
        cand = np.zeros((nq, r, self.nbytes), np.uint8)
        self._index.search_and_reconstruct(nq, faiss.swig_ptr(q), r, faiss.swig_ptr(D), faiss.swig_ptr(ids),
                                           faiss.swig_ptr(cand))
        return D, ids, cand

    def search_asymmetric(self, query_logits: Any, k: int, rerank: int | None = None, *,
                          model_version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Hamming shortlist of ``rerank`` codes, re-ranked by sum_k |sigmoid(z_qk) - b_k|.

        ``query_logits``: float (nq, bits). ``rerank`` defaults to ``max(4 k, 100)`` and must be >= k.
        Returns ``(distances float32 (nq, k), ids int64 (nq, k))``, ascending; ties keep the candidates'
        Hamming order. Missing results have id -1 and distance ``inf``.
        """
        self._check_version(query_logits, model_version, required=True)
        z = np.asarray(query_logits)
        if z.ndim != 2 or z.shape[1] != self.bits or z.dtype.kind != "f":
            raise CodeLengthError(
                f"query logits must be a float (nq, {self.bits}) array, got {z.dtype} of shape {z.shape}; "
                f"encode with the index's model ({self.model_version})")
        k = int(k)
        if k < 1:
            raise FedhashError(f"k must be >= 1, got {k}")
        r = max(4 * k, 100) if rerank is None else int(rerank)
        if r < k:
            raise FedhashError(f"rerank={r} must be >= k={k}: the re-ranked shortlist has to hold k results")
        nq = z.shape[0]
        out_d = np.full((nq, k), np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if self.ntotal == 0 or nq == 0:
            return out_d, out_i
        r_eff = min(r, self.ntotal)
        q = np.ascontiguousarray(_codes.pack(z > 0))
        _, cand_ids, cand = self._candidates(q, r_eff)

        # per-query byte lookup tables: dist = sum_k s_k + sum_j T[q, j, code_j], T = (1 - 2 s) per bit
        s = _codes.sigmoid(z).astype(np.float64)
        w = (1.0 - 2.0 * s).reshape(nq, self.nbytes, 8)
        tables = w @ _BITS  # (nq, B, 256)
        dist = np.repeat(s.sum(1, keepdims=True), r_eff, axis=1)
        rows = np.arange(nq)[:, None]
        for j in range(self.nbytes):
            dist += tables[rows, j, cand[:, :, j]]
        dist[cand_ids < 0] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        kk = order.shape[1]
        out_d[:, :kk] = np.take_along_axis(dist, order, 1)
        out_i[:, :kk] = np.take_along_axis(cand_ids, order, 1)
        return out_d, out_i

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> dict[str, Any]:
        """Write the index to ``path`` and its metadata to ``path + '.meta.json'``, each atomically.

        The index file goes first; if the process dies between the two writes, the old sidecar's sha256
        no longer matches and ``load`` refuses the pair. The sidecar carries the sha256 of the index file
        and a ``digest`` of its own fields (:func:`hashing.atomic.json_digest`): model version, bits, count, backbone,
        kind, params, privacy, generation are covered with the codes. Returns the metadata written.
        """
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index_binary(self._index, str(tmp))
            sha = sha256_file(tmp)
        self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        meta = sealed({**self.meta, "sha256": sha})
        write_json(_sidecar(path), meta)
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_version: str | None = None) -> "SiloIndex":
        """Read an index written by ``save``, verifying it against its metadata sidecar: the index bytes
        against its ``sha256``, the sidecar's fields against its ``digest`` (:class:`IntegrityError` on a
        mismatch, naming the file). A sidecar written before fedhash wrote digests has none: its fields are
        read unverified (the index bytes still checked). ``model_version``: the model the caller expects
        the index to hold (:class:`ModelVersionError` otherwise)."""
        path = Path(path)
        side = _sidecar(path)
        if not path.is_file():
            raise FedhashError(f"no index file at {path}; build the index and save it there first")
        if not side.is_file():
            raise FedhashError(f"index metadata {side} is missing; the index at {path} cannot be verified, "
                               "rebuild the index")
        try:
            meta = json.loads(side.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise FedhashError(f"index metadata {side} is unreadable ({e}); rebuild the index") from e
        fix = "rebuild it (fedhash index build, or fedhash train for a run folder's index.faiss) or restore it"
        if not isinstance(meta, dict):
            raise IntegrityError(f"index metadata {side} is not a JSON object; {fix}")
        if "digest" in meta and json_digest(meta) != meta["digest"]:
            raise IntegrityError(f"{side}: its digest does not match its fields (model version, bits, backbone, "
                                 f"privacy, ...); the file was changed or damaged: {fix}")
        if meta.get("format") != FORMAT_VERSION:
            raise FedhashError(f"index metadata {side} has format {meta.get('format')!r}, this fedhash reads "
                               f"format {FORMAT_VERSION}; rebuild the index")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise IntegrityError(f"{path}: its sha256 does not match {side.name}; the index file and metadata "
                                 f"disagree (changed, damaged or an interrupted save): {fix}")
        try:
            index = faiss.deserialize_index_binary(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise FedhashError(f"index file {path} cannot be read by FAISS ({e}); rebuild the index") from e
        if index.d != meta["bits"]:
            raise CodeLengthError(f"index file {path} holds {index.d}-bit codes but its metadata says "
                                  f"{meta['bits']}; rebuild the index")
        if index.ntotal != meta["count"]:
            raise FedhashError(f"index file {path} holds {index.ntotal} codes but its metadata says "
                               f"{meta['count']}; rebuild the index")
        expected = {"flat": faiss.IndexBinaryIDMap2, "hnsw": faiss.IndexBinaryIDMap2,
                    "ivf": faiss.IndexBinaryIVF}.get(meta["kind"])
        if expected is None or not isinstance(index, expected):
            raise FedhashError(f"index file {path} is a {type(index).__name__}, its metadata says kind "
                               f"{meta['kind']!r}; rebuild the index")
        if model_version is not None and str(meta["model_version"]) != str(model_version):
            raise ModelVersionError(f"{path} holds codes of model {meta['model_version']}, not of model "
                                    f"{model_version}; rebuild the index with that model")
        obj = cls.__new__(cls)
        obj.bits = int(meta["bits"])
        obj.nbytes = obj.bits // 8
        obj.model_version = str(meta["model_version"])
        obj.backbone = str(meta.get("backbone", ""))
        obj.kind = meta["kind"]
        obj.params = dict(meta.get("params", {}))
        obj.created = meta.get("created")
        obj.privacy = dict(meta.get("privacy", {}))
        obj.generation = meta.get("generation")
        obj._sorted_ids = None
        obj._attach(index)
        # search-time parameters are what the metadata says, whatever FAISS serialised
        if obj.kind == "hnsw":
            obj._inner.hnsw.efSearch = int(obj.params.get("efSearch", obj._inner.hnsw.efSearch))
        elif obj.kind == "ivf":
            index.nprobe = int(obj.params.get("nprobe", index.nprobe))
        return obj
