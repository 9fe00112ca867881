"""A silo's index split into shards held by Ray actors, for a silo that outgrows one machine.

:class:`ShardedIndex` has the interface of :class:`hashing.index.SiloIndex` (``add``, ``remove``,
``search``, ``ids``, ``ntotal``) over ``n_shards`` shards, each a ``SiloIndex`` inside one Ray actor
(``ray.remote`` class ``IndexShard``):

* **Which shard holds an id** is a pure function of the id and ``n_shards`` (:func:`shard_of`: the
  splitmix64 mix of the id, modulo ``n_shards``), so sequential ids and content ids alike spread evenly
  and every process that knows ``n_shards`` agrees on where an id lives.
* **add** splits the codes by shard; **remove** too. Both check every shard first and change nothing
  when any shard would refuse: an id already stored (``FedhashError``), an id not stored
  (:class:`hashing.index.UnknownIdsError`), as ``SiloIndex`` does.
* **search** sends the queries to every shard at once and waits for all of them (``ray.get`` on all the
  futures); each returns its own top-k and the results are merged to the global top-k by (distance,
  id). Distances are exactly those of one ``SiloIndex`` over the same codes (and of
  :func:`hashing.retrieval.brute_force`); ids agree up to ties at the k-th distance, where FAISS's choice
  among equal codes is unspecified. Within a row, equal distances come in ascending id order.
  Version checks are the ``SiloIndex`` ones (:class:`hashing.errors.ModelVersionError`), done before
  anything is sent. Padding as in ``SiloIndex``: id ``-1``, distance ``INT32_MAX``.

The shards keep their codes in memory only. The catalogue (:mod:`hashing.catalogue`) stays the truth:
:meth:`ShardedIndex.from_catalogue` loads an index folder's current codes into new shards, and is how
to recover from a lost shard (a dead actor raises :class:`ShardError`; nothing restarts it empty).

Pointing it at a Ray cluster
----------------------------
On the first machine (the head)::

    ray start --head --port=6379

on every other machine::

    ray start --address=<head>:6379

then, in the process that serves the silo's searches (any machine that can reach the head)::

    from hashing.shards import ShardedIndex
    idx = ShardedIndex(64, version, n_shards=8, address="<head>:6379")
    # or address="auto" on a machine that is part of the cluster (it finds the local head or node);
    # or address="ray://<head>:10001" through the Ray Client server the head starts

    idx = ShardedIndex.from_catalogue(search_index, n_shards=8, address="<head>:6379")   # an index folder

With ``address=None`` and no ``RAY_ADDRESS`` in the environment, Ray starts a local one-machine Ray
in this process (``ray.init()``). ``ShardedIndex`` calls ``ray.init`` only when Ray is not initialised
yet; if it did (a local Ray it started, or a connection it opened), the last :meth:`ShardedIndex.close`
of the indexes sharing that start shuts it down (``ray.shutdown()``: a local Ray stops, a connection
to a cluster is closed and the cluster keeps running). A Ray that the caller initialised is never shut
down; ``close`` always kills the index's own actors.

How the shards are spread
-------------------------
Ray schedules each shard actor on a node of the cluster. Each asks for ``num_cpus`` (default 0, so
shards never wait for CPUs that tasks hold; give e.g. ``num_cpus=1`` to reserve a core per shard) and
any ``resources`` passed (custom resources set with ``ray start --resources='{"index": 1}'`` keep
shards to the machines that advertise them). ``strategy="SPREAD"`` asks Ray to put the shards on
different nodes where it can (Ray's ``scheduling_strategy``; a ``PlacementGroupSchedulingStrategy`` or
``NodeAffinitySchedulingStrategy`` object is passed through too). :meth:`ShardedIndex.placement` says
where each shard ended up. ``threads`` sets FAISS's thread count inside every shard (Ray sets
``OMP_NUM_THREADS=1`` in actors that ask for no CPUs).

Every shard holds about ``ntotal / n_shards`` codes of ``bits / 8`` bytes (1M 64-bit codes: 8 MB), and a
query batch of ``nq`` codes comes back from each shard as ``nq * k`` (distance, id) pairs. A shard's
process costs more than its codes: it imports ``hashing`` (whose ``__init__`` imports torch), about
0.6-0.7 GiB resident and a few seconds to start on a small machine (benchmarks/results/shards.md). Each
search is one round trip to every shard (a few ms through Ray on one machine): sharding pays off for
batches and for codes that do not fit one machine, not for single queries on one machine.

:class:`LocalCluster` starts a one-machine Ray cluster with ``ray start --head --block`` in its own
session and stops exactly the processes it started, by process id (tests and benchmarks use it; it
never runs ``ray stop``, which stops every Ray on the machine by name).

This module imports Ray (and psutil) only inside the functions that need them.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, FedhashError
from .index import SiloIndex, UnknownIdsError, _fmt_ids, set_num_threads

log = logging.getLogger("fedhash.shards")

_INLINE_BYTES = 64 * 1024  # queries larger than this go to the object store once, not once per shard


class ShardError(FedhashError):
    """A shard did not answer: its actor died (its codes are lost with it) or it timed out."""


# --------------------------------------------------------------------------- which shard holds an id


def shard_of(ids: Any, n_shards: int) -> np.ndarray:
    """The shard (0 .. n_shards-1) of each id: splitmix64(id) mod n_shards, as int64."""
    n = int(n_shards)
    if n < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n}")
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n)).astype(np.int64)


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top-k of per-shard top-k results ``[(D (nq, k), I (nq, k)), ...]`` by (distance, id).

    Padding (id -1, distance INT32_MAX) sorts after every real result, as no Hamming distance reaches it."""
    D = np.concatenate([np.asarray(p[0], np.int32) for p in parts], axis=1)
    I = np.concatenate([np.asarray(p[1], np.int64) for p in parts], axis=1)
    pad = I < 0
    key_i = np.where(pad, np.iinfo(np.int64).max, I)  # pads last among equal distances too
    order = np.lexsort((key_i, D), axis=1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


# --------------------------------------------------------------------------- the actor


class IndexShard:
    """One shard: a SiloIndex in a Ray actor (``ray.remote(IndexShard)``; the methods run remotely)."""

    def __init__(self, bits: int, model_version: str, kind: str, params: dict[str, Any], threads: int | None):
        if threads:
            set_num_threads(threads)
        self.index = SiloIndex(bits, model_version, kind=kind, **params)

    def where(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def ntotal(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        return self.index.ids()

    def present(self, ids: np.ndarray) -> np.ndarray:
        return self.index._present(np.asarray(ids, np.int64))

    def check_add(self, ids: np.ndarray) -> tuple[np.ndarray, bool]:
        """(the ids of ``ids`` already stored, whether an ivf shard is trained)."""
        ids = np.asarray(ids, np.int64)
        trained = self.index.kind != "ivf" or bool(self.index._index.is_trained)
        return ids[self.index._present(ids)], trained

    def add(self, codes: np.ndarray, ids: np.ndarray) -> int:
        self.index.add(codes, ids, model_version=self.index.model_version)
        return self.index.ntotal

    def remove(self, ids: np.ndarray) -> int:
        return self.index.remove(ids)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(query, k, model_version=self.index.model_version)

    def set_search_params(self, params: dict[str, int]) -> None:
        self.index.set_search_params(**params)


_remote_cls: Any = None


def _shard_class() -> Any:
    global _remote_cls
    if _remote_cls is None:
        import ray

        _remote_cls = ray.remote(IndexShard)
    return _remote_cls


# --------------------------------------------------------------------------- Ray, started or joined

_ray_lock = threading.Lock()
_ray_state = {"ours": False, "users": 0}  # whether this module called ray.init, and how many indexes use it


def _acquire_ray(address: str | None, namespace: str | None) -> bool:
    """Initialise Ray unless it is; returns whether the caller shares a start this module made."""
    import ray

    with _ray_lock:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {}
            if namespace is not None:
                kwargs["namespace"] = namespace
            if not (address or "").startswith("ray://"):
                kwargs["logging_level"] = logging.ERROR
                if address is None and not os.environ.get("RAY_ADDRESS"):
                    kwargs["include_dashboard"] = False  # a local Ray of our own: no dashboard
            ray.init(address=address, **kwargs)
            _ray_state["ours"], _ray_state["users"] = True, 0
        if _ray_state["ours"]:
            _ray_state["users"] += 1
            return True
        return False


def _release_ray() -> None:
    import ray

    with _ray_lock:
        _ray_state["users"] -= 1
        if _ray_state["users"] <= 0 and _ray_state["ours"]:
            _ray_state["ours"], _ray_state["users"] = False, 0
            if ray.is_initialized():
                ray.shutdown()


# --------------------------------------------------------------------------- the sharded index


class ShardedIndex:
    """A ``bits``-bit index of model ``model_version`` split into ``n_shards`` Ray actors.

    ``address``: ``None`` (a Ray already initialised, else ``RAY_ADDRESS``, else a new local Ray),
    ``"auto"``, ``"host:port"`` or ``"ray://host:port"`` (see the module docstring). ``kind`` and
    ``**params`` are ``SiloIndex``'s (every shard gets the same; an ivf shard trains on its own first add).
    ``num_cpus``, ``resources``, ``strategy``: what each shard actor asks Ray for. ``threads``: FAISS
    threads in each shard. ``timeout``: seconds to wait for the shards' answers (None: no limit).
    """

    def __init__(self, bits: int, model_version: str, n_shards: int, *, address: str | None = None,
                 kind: str = "flat", namespace: str | None = None, num_cpus: float = 0,
                 resources: dict[str, float] | None = None, strategy: Any = None, threads: int | None = None,
                 timeout: float | None = None, **params: Any):
        # an empty SiloIndex on this side: the same argument, code, id and version checks, before any Ray call
        self._check = SiloIndex(bits, model_version, kind=kind, **params)
        n = int(n_shards)
        if n < 1:
            raise ConfigError(f"n_shards must be >= 1, got {n_shards!r}")
        self.n_shards = n
        self.bits, self.nbytes = self._check.bits, self._check.nbytes
        self.model_version, self.kind = self._check.model_version, self._check.kind
        self.params = dict(self._check.params)
        self.timeout = timeout
        self.generation: int | None = None  # the catalogue generation from_catalogue loaded
        self.folder: Path | None = None
        self._actors: list[Any] = []
        self._closed = False
        self._write = threading.Lock()  # an add's or remove's check and change are one step for this driver
        self._shares_ray = _acquire_ray(address, namespace)
        try:
            opts: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": 0}
            if resources:
                opts["resources"] = dict(resources)
            if strategy is not None:
                opts["scheduling_strategy"] = strategy
            cls = _shard_class().options(**opts)
            self._actors = [cls.remote(self.bits, self.model_version, self.kind, self.params, threads)
                            for _ in range(n)]
            self._where = self._get([a.where.remote() for a in self._actors])  # every shard is up
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        if self._closed:
            raise FedhashError("this ShardedIndex is closed; open a new one (ShardedIndex.from_catalogue)")
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, FedhashError):  # the shard's SiloIndex refused: the same error here
                raise cause from None
            raise
        except ray.exceptions.GetTimeoutError as e:
            raise ShardError(f"a shard did not answer within {self.timeout} s; raise timeout= or check the "
                             "Ray cluster (ray status)") from e
        except ray.exceptions.RayActorError as e:
            raise ShardError(f"a shard of this index is gone ({type(e).__name__}); its codes went with it: "
                             "close this index and load a new one (ShardedIndex.from_catalogue)") from e

    def _groups(self, ids: np.ndarray) -> list[np.ndarray]:
        """Positions in ``ids`` of each shard's ids."""
        s = shard_of(ids, self.n_shards)
        order = np.argsort(s, kind="stable")
        bounds = np.searchsorted(s[order], np.arange(self.n_shards + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(self.n_shards)]

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return int(sum(self.shard_sizes()))

    def __len__(self) -> int:
        return self.ntotal

    def shard_sizes(self) -> list[int]:
        return [int(x) for x in self._get([a.ntotal.remote() for a in self._actors])]

    def ids(self) -> np.ndarray:
        """Every stored id, sorted ascending."""
        parts = self._get([a.ids.remote() for a in self._actors])
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def placement(self) -> list[dict[str, Any]]:
        """Where each shard runs: ``{"node_id", "ip", "host", "pid"}`` per shard (``ip``: the node's address
        in the cluster, as ``ray start --node-ip-address`` set it)."""
        import ray

        ips = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
        return [{**w, "ip": ips.get(w["node_id"])} for w in self._where]

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"ntotal={self.ntotal}"
        return (f"ShardedIndex(bits={self.bits}, model_version={self.model_version!r}, kind={self.kind!r}, "
                f"n_shards={self.n_shards}, {state})")

    # ------------------------------------------------------------------ mutation
    def add(self, codes: Any, ids: Any, *, model_version: str | None = None) -> None:
        """Add ``codes`` (uint8 (n, bits/8)) under ``ids``; refused as a whole, as ``SiloIndex.add`` is."""
        x, idx, _ = self._check._add_args(codes, ids, model_version)
        if idx.size == 0:
            return
        with self._write:
            self._add(x, idx)

    def _add(self, x: np.ndarray, idx: np.ndarray) -> None:
        groups = [(a, g) for a, g in zip(self._actors, self._groups(idx)) if g.size]
        checks = self._get([a.check_add.remote(idx[g]) for a, g in groups])
        present = np.sort(np.concatenate([c[0] for c in checks]))
        if present.size:
            raise FedhashError(f"ids already in the index: {_fmt_ids(present)}; remove them first or use new ids")
        if self.kind == "ivf":
            nlist = self.params["nlist"]
            short = [g.size for (_, g), (_, trained) in zip(groups, checks) if not trained and g.size < nlist]
            if short:
                raise FedhashError(
                    f"an ivf shard trains on its first add, which needs at least nlist={nlist} codes; this add "
                    f"gives an untrained shard only {min(short)} (each shard gets about 1/{self.n_shards} of "
                    "the codes); add more codes at once, lower nlist, use fewer shards or kind='flat'")
        self._get([a.add.remote(x[g], idx[g]) for a, g in groups])

    def remove(self, ids: Any) -> int:
        """Remove ``ids``; all must be stored (in whichever shard), else ``UnknownIdsError`` and nothing
        changes. Repeated ids count once. Returns the number removed.

        Every shard is asked first and only then told to remove. A search running meanwhile may see some
        shards before and some after the removal (each shard's own change is atomic)."""
        idx = self._check._remove_args(ids)
        if idx.size == 0:
            return 0
        with self._write:
            return self._remove(idx)

    def _remove(self, idx: np.ndarray) -> int:
        groups = [(a, idx[g]) for a, g in zip(self._actors, self._groups(idx)) if g.size]
        masks = self._get([a.present.remote(part) for a, part in groups])
        missing = np.sort(np.concatenate([part[~m] for (_, part), m in zip(groups, masks)]))
        if missing.size:
            raise UnknownIdsError(f"ids not in the index: {_fmt_ids(missing)}; nothing was removed")
        return int(sum(self._get([a.remove.remote(part) for a, part in groups])))

    def set_search_params(self, **params: int) -> None:
        """``efSearch`` (hnsw) or ``nprobe`` (ivf) on every shard."""
        self._check.set_search_params(**params)
        self._get([a.set_search_params.remote(dict(params)) for a in self._actors])
        self.params = dict(self._check.params)

    # ------------------------------------------------------------------ search
    def search(self, query_codes: Any, k: int, *, model_version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Hamming k-NN over all shards: ``(distances int32 (nq, k), ids int64 (nq, k))``, by (distance, id).

        Every shard searches at once; the call returns when all have answered."""
        q, k = self._check._search_args(query_codes, k, model_version)
        if q.shape[0] == 0:
            return np.empty((0, k), np.int32), np.empty((0, k), np.int64)
        q = np.ascontiguousarray(q).view(np.ndarray)
        if q.nbytes > _INLINE_BYTES:
            import ray

            q = ray.put(q)
        return merge_topk(self._get([a.search.remote(q, k) for a in self._actors]), k)

    # ------------------------------------------------------------------ from an index folder
    @classmethod
    def from_catalogue(cls, search_index: Any, n_shards: int, *, address: str | None = None,
                       kind: str | None = None, **kwargs: Any) -> "ShardedIndex":
        """Shards holding the current codes of an index folder (a :class:`hashing.retrieval.SearchIndex`).

        ``kind`` defaults to the folder's; ``generation`` records the catalogue generation loaded, so a
        caller can tell when the folder has changed since (``search_index.cat.generation``)."""
        cat = search_index.cat
        with search_index.lock:
            for _ in range(5):  # the codes and the generation they belong to, read consistently
                gen = cat.generation
                version = search_index.model_version
                ids, codes = cat.codes(version)
                if cat.generation == gen:
                    break
            else:
                raise FedhashError(f"index {search_index.folder} kept changing while its codes were read; "
                                   "try again when no add or remove is running")
        obj = cls(cat.model_bits(version), version, n_shards, address=address,
                  kind=kind or cat.get_meta("kind", "flat"), **kwargs)
        try:
            obj.add(codes, ids, model_version=version)
        except BaseException:
            obj.close()
            raise
        obj.generation, obj.folder = gen, Path(search_index.folder)
        return obj

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Kill this index's shard actors; shut Ray down if this module started it and nothing else uses it."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray

            if self._actors and ray.is_initialized():
                for a in self._actors:
                    try:
                        ray.kill(a, no_restart=True)
                    except Exception as e:  # already gone
                        log.debug("killing a shard: %s", e)
                # ray.kill is asynchronous: wait until every shard is dead, so close() returns with none left
                deadline = time.monotonic() + 30
                for a in self._actors:
                    while time.monotonic() < deadline:
                        try:
                            ray.get(a.ntotal.remote(), timeout=5)
                        except Exception:  # RayActorError: dead (a timeout here counts as gone too)
                            break
                        time.sleep(0.05)
        finally:
            self._actors = []
            if self._shares_ray:
                self._shares_ray = False
                _release_ray()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- a one-machine cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A one-machine Ray cluster: ``ray start --head --block`` in a session of its own.

    ``start()`` returns its address (``127.0.0.1:<port>``) once ``ray start`` is running; connect with
    ``ray.init(address=...)`` (it may take a few tries while the node registers: :meth:`connect`).
    ``stop()`` terminates, by process id, the ``ray start`` process, all its descendants (collected while
    it is alive) and every process in its session (Ray's daemons may be re-parented), then kills what
    is left; it returns the processes it stopped. It never uses ``ray stop`` (which stops every Ray on
    the machine, by name).
    """

    def __init__(self, num_cpus: int = 2, *, ray_exe: str | None = None, temp_dir: str | None = None):
        self.num_cpus = int(num_cpus)
        self.ray_exe = ray_exe or str(Path(sys.executable).with_name("ray"))
        self._temp = temp_dir
        self._own_temp = temp_dir is None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self._seen: dict[int, Any] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        if self._temp is None:  # short: Ray's unix socket paths must fit in 107 bytes
            self._temp = tempfile.mkdtemp(prefix="fhray-", dir="/tmp")
        self.port = _free_port()
        self.log_path = Path(self._temp) / "ray-start.log"
        cmd = [self.ray_exe, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=false",
               "--disable-usage-stats", "--block", f"--temp-dir={self._temp}",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               f"--metrics-export-port={_free_port()}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        return self.address

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def connect(self, timeout: float = 120.0, **init_kwargs: Any) -> None:
        """``ray.init(address=self.address)`` in this process, retried until it works or ``timeout``."""
        import ray

        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log_tail(100_000) and time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            time.sleep(0.2)
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise FedhashError(f"ray start exited ({None if self.proc is None else self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            try:
                ray.init(address=self.address, logging_level=logging.ERROR, **init_kwargs)
                return
            except Exception as e:
                if ray.is_initialized():
                    ray.shutdown()
                if time.monotonic() > deadline:
                    raise FedhashError(f"could not connect to the Ray cluster at {self.address} within "
                                       f"{timeout:.0f} s ({e}):\n{self.log_tail()}") from e
                time.sleep(0.5)

    def processes(self) -> list[Any]:
        """The live processes of the cluster: the ``ray start`` process, its descendants, its session."""
        import psutil

        if self.proc is None:
            return []
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.proc.pid)
            found[root.pid] = root
            for p in root.children(recursive=True):
                found[p.pid] = p
        except psutil.Error:
            pass
        sid = self.proc.pid  # start_new_session: the ray start process leads its session
        for p in psutil.process_iter():
            try:
                if p.pid not in found and os.getsid(p.pid) == sid:
                    found[p.pid] = p
            except (OSError, psutil.Error):
                continue
        for p in found.values():
            self._seen.setdefault(p.pid, p)
        return list(found.values())

    @staticmethod
    def _alive(p: Any) -> bool:
        import psutil

        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def stop(self, timeout: float = 20.0) -> list[Any]:
        """Stop every process of the cluster by id (terminate, wait, kill); returns all it stopped."""
        import psutil

        if self.proc is None:
            return []
        for _ in range(5):  # daemons may start a process while others stop: collect again until none is left
            procs = [p for p in self.processes() if self._alive(p)]
            if not procs:
                break
            for p in procs:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=timeout)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
        try:
            self.proc.wait(timeout=5)  # reap our child
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        stopped = list(self._seen.values())
        if self._own_temp and self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
        return stopped

    def alive(self) -> list[Any]:
        """Which of the processes this cluster ever had are still running."""
        return [p for p in self._seen.values() if self._alive(p)]


__all__ = ["ShardedIndex", "ShardError", "IndexShard", "LocalCluster", "shard_of", "merge_topk"]
