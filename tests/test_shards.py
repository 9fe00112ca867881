"""ShardedIndex on a real Ray cluster (``ray start --head`` in its own session, stopped by process id):
results against one SiloIndex and brute force, adds, removes, refusals, an index folder's codes, and
that closing kills the shards (and shuts down a Ray the index started)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from hashing import retrieval as R
from hashing.codes import hamming
from hashing.data import load_digits
from hashing.errors import CodeLengthError, FedhashError, ModelVersionError
from hashing.index import PAD_DISTANCE, Codes, SiloIndex, UnknownIdsError
from hashing.shards import LocalCluster, ShardedIndex, merge_topk, shard_of

from .conftest import train_digits

ROOT = Path(__file__).resolve().parents[1]
RAY = ROOT / ".venv" / "bin" / "ray"
BITS, V = 64, "shard-test-v1"
N, NQ = 20_000, 100


# --------------------------------------------------------------------------- the cluster


def _live(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pid_live(pid: int) -> bool:
    try:
        return _live(psutil.Process(pid))
    except psutil.Error:
        return False


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head --block`` as a subprocess in a session of its own. It is started first (the model
    of the index-folder test trains while it boots); ``connected`` waits for it. Teardown, also after a
    failure: ray.shutdown(), then every process of the cluster is stopped by id, and none may be left."""
    import ray

    if ray.is_initialized():  # something earlier in this process left Ray up: not ours to keep
        ray.shutdown()
    c = LocalCluster(num_cpus=2, ray_exe=str(RAY) if RAY.exists() else None)
    c.start()
    sid = os.getsid(c.proc.pid)
    assert sid == c.proc.pid  # start_new_session: its own session, its own process group
    try:
        yield c
    finally:
        ray.shutdown()
        # collected here, while ray start still runs, independently of LocalCluster's own collection
        ours = {}
        try:
            ours.update({p.pid: p for p in psutil.Process(c.proc.pid).children(recursive=True)})
        except psutil.Error:
            pass
        ours.update({p.pid: p for p in _session(sid)})
        stopped = {p.pid: p for p in c.stop()}
        assert set(ours) <= set(stopped), f"processes the cluster's stop missed: {sorted(set(ours) - set(stopped))}"
        left = [p.pid for p in list(ours.values()) + list(stopped.values()) if _live(p)]
        left += [p.pid for p in _session(sid) if _live(p)]
        assert not left, f"Ray processes left running after teardown: {sorted(set(left))}"
        assert c.proc.poll() is not None


@pytest.fixture(scope="module")
def connected(cluster):
    import ray

    if not ray.is_initialized():
        cluster.connect(timeout=120)
    return cluster


# --------------------------------------------------------------------------- data and checks


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    db = rng.integers(0, 256, (N, BITS // 8), dtype=np.uint8)
    ids = (rng.permutation(50 * N)[:N].astype(np.int64) * 3 + 11)  # sparse, shuffled, all == 2 mod 3
    near = db[rng.choice(N, NQ // 2, replace=False)].copy()
    near ^= (rng.random(near.shape) < 0.04).astype(np.uint8) << rng.integers(0, 8, near.shape).astype(np.uint8)
    q = np.concatenate([near, rng.integers(0, 256, (NQ - NQ // 2, BITS // 8), dtype=np.uint8)])
    return db, ids, q


def assert_topk(D, I, codes, ids, query, k):
    """Brute force's distances exactly; ids equal to brute force's (ties by id) below the k-th distance,
    and at the k-th distance ascending ids that really are at that distance."""
    Dref, Iref = R.brute_force(codes, ids, query, k)
    np.testing.assert_array_equal(D, Dref)
    full = hamming(query, codes)
    pos = {int(i): j for j, i in enumerate(ids)}
    for r in range(len(query)):
        got = np.asarray(I[r])
        assert len(set(got.tolist())) == len(got)
        np.testing.assert_array_equal(full[r, [pos[int(i)] for i in got]], Dref[r])
        below = Dref[r] < Dref[r, -1]
        np.testing.assert_array_equal(got[below], Iref[r][below])
        tied = got[~below]
        assert np.all(np.diff(tied) > 0)


def assert_same_as(D, I, D1, I1):
    """The same results as one SiloIndex: distances exactly, ids up to ties at the k-th distance."""
    np.testing.assert_array_equal(D, D1)
    for r in range(D.shape[0]):
        below = D1[r] < D1[r, -1]
        assert set(I[r][below].tolist()) == set(I1[r][below].tolist())


@pytest.fixture(scope="module")
def sharded(connected):
    idx = ShardedIndex(BITS, V, 3, address=connected.address, strategy="SPREAD")  # one node: all on it
    yield idx
    idx.close()


@pytest.fixture
def empty(sharded):
    """The shared 3-shard index, emptied (actors are slow to start; emptying is not)."""
    sharded.remove(sharded.ids())
    assert sharded.ntotal == 0
    return sharded


# --------------------------------------------------------------------------- an index folder


@pytest.fixture(scope="module")
def index_folder(cluster, tmp_path_factory, cache_dir):
    """A tiny model trained by the CLI, and an index folder of scikit-learn's digits built with it."""
    run = train_digits(tmp_path_factory.mktemp("shard-models"), cache_dir, bits=16)
    folder = tmp_path_factory.mktemp("shard-index") / "index"
    idx, rep = R.build(folder, run, load_digits(), cache_dir=cache_dir)
    assert rep.added > 1000
    yield idx
    idx.close()


def test_from_catalogue_gives_the_search_index_results(index_folder, connected):
    idx = index_folder
    ids, codes = idx.cat.codes(idx.model_version)
    rng = np.random.default_rng(1)
    queries = np.concatenate([codes[rng.choice(len(ids), 60, replace=False)],
                              rng.integers(0, 256, (20, codes.shape[1]), dtype=np.uint8)])
    with ShardedIndex.from_catalogue(idx, 2, address=connected.address) as sh:
        assert sh.bits == 16 and sh.model_version == idx.model_version and sh.kind == "flat"
        assert sh.generation == idx.cat.generation and sh.folder == idx.folder
        assert sh.ntotal == len(idx) == len(ids)
        np.testing.assert_array_equal(sh.ids(), np.sort(ids))
        assert all(s > 0 for s in sh.shard_sizes())
        for k in (1, 10, 100):
            D, I = sh.search(queries, k, model_version=idx.model_version)
            hits = idx.search_codes(queries, k, model_version=idx.model_version)
            Dh = np.array([[h.distance for h in row] for row in hits], dtype=np.int32)
            Ih = np.array([[h.id for h in row] for row in hits], dtype=np.int64)
            assert_same_as(D, I, Dh, Ih)
            assert_topk(D, I, codes, ids, queries, k)
        with pytest.raises(ModelVersionError):
            sh.search(queries, 5, model_version="not-" + idx.model_version)
        with pytest.raises(CodeLengthError):
            sh.search(np.zeros((2, 8), np.uint8), 5, model_version=idx.model_version)  # 64-bit query, 16-bit index


# --------------------------------------------------------------------------- random codes


def test_search_equals_one_silo_index_and_brute_force(empty, data):
    db, ids, q = data
    sh = empty
    sh.add(db[:15_000], ids[:15_000], model_version=V)
    sh.add(Codes(db[15_000:], V), ids[15_000:])
    sizes = sh.shard_sizes()
    assert sum(sizes) == sh.ntotal == len(sh) == N
    assert min(sizes) > N / 3 * 0.9  # ids all == 2 mod 3 still spread over 3 shards
    np.testing.assert_array_equal(sh.ids(), np.sort(ids))
    expect = shard_of(ids, 3)
    assert [int((expect == s).sum()) for s in range(3)] == sizes

    one = SiloIndex(BITS, V)
    one.add(db, ids)
    for k in (1, 10, 100):
        D, I = sh.search(q, k, model_version=V)
        assert D.dtype == np.int32 and I.dtype == np.int64 and D.shape == I.shape == (NQ, k)
        assert_topk(D, I, db, ids, q, k)
        D1, I1 = one.search(q, k, model_version=V)
        assert_same_as(D, I, D1, I1)
    D, I = sh.search(Codes(q[:1], V), 10)  # one query, its version carried by the array
    np.testing.assert_array_equal(D, one.search(q[:1], 10, model_version=V)[0])
    D, I = sh.search(q[:0], 10, model_version=V)
    assert D.shape == I.shape == (0, 10)


def test_fewer_codes_than_k_pad_as_silo_index_does(empty):
    rng = np.random.default_rng(3)
    db = rng.integers(0, 256, (5, BITS // 8), dtype=np.uint8)
    ids = np.array([3, 10, 11, 400, 9_000_000_000], np.int64)
    q = rng.integers(0, 256, (4, BITS // 8), dtype=np.uint8)
    D0, I0 = empty.search(q, 3, model_version=V)  # empty shards
    assert (I0 == -1).all() and (D0 == PAD_DISTANCE).all()
    empty.add(db, ids, model_version=V)
    D, I = empty.search(q, 8, model_version=V)
    one = SiloIndex(BITS, V)
    one.add(db, ids)
    D1, _ = one.search(q, 8, model_version=V)
    np.testing.assert_array_equal(D, D1)
    assert (I[:, 5:] == -1).all() and (D[:, 5:] == PAD_DISTANCE).all()
    assert_topk(D[:, :5], I[:, :5], db, ids, q, 5)


def test_remove_then_search(empty, data):
    db, ids, q = data
    sh = empty
    sh.add(db, ids, model_version=V)
    rng = np.random.default_rng(5)
    gone = rng.choice(ids, 2000, replace=False)
    assert sh.remove(np.concatenate([gone, gone[:10]])) == 2000  # repeats count once
    keep = ~np.isin(ids, gone)
    assert sh.ntotal == N - 2000
    np.testing.assert_array_equal(sh.ids(), np.sort(ids[keep]))
    # the nearest neighbours of removed codes themselves: the removed ids must not come back
    qq = np.concatenate([db[np.isin(ids, gone)][:50], q])
    one = SiloIndex(BITS, V)
    one.add(db, ids)
    one.remove(gone)
    for k in (1, 20):
        D, I = sh.search(qq, k, model_version=V)
        assert not np.isin(I, gone).any()
        assert_topk(D, I, db[keep], ids[keep], qq, k)
        assert_same_as(D, I, *one.search(qq, k, model_version=V))
    assert sh.remove([]) == 0


def test_refusals_change_nothing(empty, data):
    db, ids, q = data
    sh = empty
    sh.add(db[:3000], ids[:3000], model_version=V)
    before_ids = sh.ids()
    before = sh.search(q, 10, model_version=V)

    def unchanged():
        np.testing.assert_array_equal(sh.ids(), before_ids)
        D, I = sh.search(q, 10, model_version=V)
        np.testing.assert_array_equal(D, before[0])
        np.testing.assert_array_equal(I, before[1])

    unknown = np.array([1, 2, 4], np.int64)  # never stored (stored ids are 2 mod 3; 2 is not one of them)
    assert not np.isin(unknown, ids).any()
    with pytest.raises(UnknownIdsError, match="nothing was removed") as e:
        sh.remove(np.concatenate([ids[:500], unknown]))  # known ids on every shard, and three unknown
    assert "[1, 2, 4]" in str(e.value)
    unchanged()
    with pytest.raises(FedhashError, match="already in the index"):  # one stored id among new ones
        sh.add(db[2999:3100], ids[2999:3100], model_version=V)
    with pytest.raises(FedhashError, match="duplicate ids"):
        sh.add(db[3000:3002], np.array([ids[3000]] * 2), model_version=V)
    with pytest.raises(FedhashError, match=">= 0"):
        sh.add(db[3000:3001], np.array([-5]), model_version=V)
    with pytest.raises(ModelVersionError):
        sh.add(db[3000:3100], ids[3000:3100], model_version="other")
    with pytest.raises(ModelVersionError):
        sh.add(Codes(db[3000:3100], "other"), ids[3000:3100])
    with pytest.raises(CodeLengthError):
        sh.add(db[3000:3100, :4], ids[3000:3100])
    unchanged()
    # searches: another model's queries, contradictory versions, none at all, wrong length, bad k
    with pytest.raises(ModelVersionError, match="cannot be searched"):
        sh.search(q, 10, model_version="other")
    with pytest.raises(ModelVersionError, match="cannot be searched"):
        sh.search(Codes(q, "other"), 10)
    with pytest.raises(ModelVersionError, match="was passed"):
        sh.search(Codes(q, V), 10, model_version="other")
    with pytest.raises(FedhashError, match="must say which model"):
        sh.search(q, 10)
    with pytest.raises(CodeLengthError):
        sh.search(q[:, :4], 10, model_version=V)
    with pytest.raises(FedhashError, match="k must be"):
        sh.search(q, 0, model_version=V)
    unchanged()


def test_module_imports_neither_ray_nor_flwr():
    code = ("import sys, hashing.shards; bad = [m for m in ('ray', 'flwr', 'psutil') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_shard_of_and_merge_without_ray():
    ids = np.arange(30_000, dtype=np.int64)
    for n in (1, 2, 3, 4):
        s = shard_of(ids, n)
        assert s.dtype == np.int64 and s.min() >= 0 and s.max() < n
        np.testing.assert_array_equal(s, shard_of(ids.copy(), n))  # deterministic
        for ids_ in (ids, ids * n, ids * 3 + 2):  # sequential ids, and ids that a plain modulo would pile up
            counts = np.bincount(shard_of(ids_, n), minlength=n)
            assert counts.min() > len(ids) / n * 0.95
    assert shard_of(np.array([2**63 - 1]), 7)[0] in range(7)
    with pytest.raises(FedhashError):
        shard_of(ids, 0)
    D, I = merge_topk([(np.array([[1, 3, PAD_DISTANCE]], np.int32), np.array([[9, 4, -1]])),
                       (np.array([[1, 2, 3]], np.int32), np.array([[5, 7, 2]]))], 5)
    np.testing.assert_array_equal(D, [[1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(I, [[5, 9, 7, 2, 4]])
    with pytest.raises(FedhashError):
        ShardedIndex(BITS, V, 0)  # refused before Ray is touched
    with pytest.raises(FedhashError):
        ShardedIndex(BITS, "", 2)


# --------------------------------------------------------------------------- lifetime


def test_close_kills_the_shards_and_the_ray_it_started(sharded, connected):
    import ray

    # a Ray this index did not start (the test's connection) stays up after close
    a = sharded  # the shared index, closed here (its fixture's close is then a no-op)
    where = a.placement()
    node_ips = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert len(where) == 3 and all(w["ip"] in node_ips for w in where)
    pids = [w["pid"] for w in where]
    handles = list(a._actors)
    a.close()
    a.close()  # twice is fine
    assert ray.is_initialized()
    for h in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.ntotal.remote(), timeout=60)
    deadline = time.time() + 30
    while any(_pid_live(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_pid_live(p) for p in pids)
    with pytest.raises(FedhashError, match="closed"):
        a.search(np.zeros((1, 8), np.uint8), 1, model_version=V)

    # a Ray it connected to itself: shut down when the last index sharing that start closes
    ray.shutdown()
    try:
        b = ShardedIndex(BITS, V, 1, address=connected.address)
        c = ShardedIndex(BITS, V, 1, address=connected.address)
        assert ray.is_initialized()
        b.close()
        assert ray.is_initialized()
        c.add(np.zeros((1, 8), np.uint8), [1], model_version=V)
        assert c.search(np.zeros((1, 8), np.uint8), 1, model_version=V)[1][0, 0] == 1
        c.close()
        assert not ray.is_initialized()
    finally:
        if not ray.is_initialized():
            connected.connect(timeout=60)
