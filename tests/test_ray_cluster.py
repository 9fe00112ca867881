"""``fedhash simulate`` on a Ray cluster it did not start (config ``ray-address``).

The test starts a two-node Ray cluster on loopback, as the README says (``ray start --head``, then ``ray
start --address`` for the second node, one CPU each), runs a small scenario on it through the CLI, and
compares it with the same scenario on the Ray that fedhash starts itself: the same model, bit for bit (a
plain run's sums do not depend on which silo answers first). Every process of the cluster carries an
environment marker; the test stops each of them by its id, whatever happened."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from .conftest import toml_text
from .test_interrupts import _cmdline, _marked

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCENARIO = {
    "name": "cluster", "references": [], "also-unsupervised": False,
    "data": "digits", "n-images": 0, "partitioner": "dirichlet", "alpha": 0.3, "num-silos": 3, "seed": 0,
    "bits": 16, "size": 32, "views": 2, "batch-size": 64, "min-train-nodes": 3, "num-server-rounds": 2,
    "supervised": True, "mode": "probe", "client-threads": 1,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict) -> None:
    r = subprocess.run([str(BIN / "ray"), *args], env=env, cwd="/", stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"ray {' '.join(args)}: {r.stdout[-1500:]}{r.stderr[-1500:]}"


@contextlib.contextmanager
def two_node_cluster(cache: Path):
    """A head and a second node, one CPU each, on 127.0.0.1; yields the head's address. Afterwards every
    process the cluster started (found by the marker in its environment) is stopped by its pid: SIGTERM,
    then SIGKILL for any left after 20 s."""
    tag = f"ray-cluster-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fhray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, FEDHASH_TEST_TAG=tag, FEDHASH_CACHE=str(cache), RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    try:
        _ray(["start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *common], env)
        _ray(["start", f"--address=127.0.0.1:{port}", *common], env)
        yield f"127.0.0.1:{port}"
    finally:  # as `ray stop` does it, but by pid: SIGTERM, then SIGKILL for what is left after a grace
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 20)):
            for pid in _marked(tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while _marked(tag) and time.monotonic() < deadline:
                time.sleep(0.3)
        left = _marked(tag)
        assert not left, f"the Ray cluster's processes are still running: {[(p, _cmdline(p)) for p in left]}"


def _simulate(tmp: Path, name: str, cache: Path, **extra) -> tuple[dict, str]:
    scn = tmp / f"{name}.toml"
    scn.write_text(toml_text(SCENARIO | {"cache-dir": str(cache)} | extra))
    runs = tmp / f"runs-{name}"
    r = subprocess.run([str(BIN / "fedhash"), "simulate", str(scn), "--runs-dir", str(runs)], cwd=ROOT,
                       env=dict(os.environ, MPLBACKEND="Agg"), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(runs.iterdir())
    return json.loads((run / "summary.json").read_text()), (run / "report.md").read_text()


def test_simulate_on_a_two_node_ray_cluster_gives_the_local_model(tmp_path, cache_dir):
    local, _ = _simulate(tmp_path, "local", cache_dir)
    assert local["ray"]["address"] == "" and local["ray"]["nodes"] == 1
    with two_node_cluster(cache_dir) as address:
        on, report = _simulate(tmp_path, "cluster", cache_dir, **{"ray-address": address})
    assert on["ray"] == {"address": address, "nodes": 2, "cpus": 2}
    assert f"the Ray cluster at {address} (2 nodes, 2 CPUs)" in report
    assert on["artifacts"]["federated"]["model_version"] == local["artifacts"]["federated"]["model_version"]
    assert on["final"]["federated"]["per_silo"] == local["final"]["federated"]["per_silo"]
    assert on["cross_silo"]["federated"]["per_silo"] == local["cross_silo"]["federated"]["per_silo"]


def test_a_ray_address_where_no_cluster_answers_fails_in_one_line_before_any_work(tmp_path, cache_dir):
    scn = tmp_path / "nobody.toml"
    scn.write_text(toml_text(SCENARIO | {"cache-dir": str(cache_dir), "ray-address": f"127.0.0.1:{_free_port()}"}))
    t0 = time.monotonic()
    r = subprocess.run([str(BIN / "fedhash"), "simulate", str(scn), "--runs-dir", str(tmp_path / "runs")], cwd=ROOT,
                       env=dict(os.environ, MPLBACKEND="Agg"), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if "ray-address" in ln]
    assert line and "no Ray cluster answers there" in line[0] and "ray start --head" in line[0], r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing was written
    assert time.monotonic() - t0 < 120


def test_a_malformed_ray_address_is_refused_by_the_config():
    from hashing.config import Config
    from hashing.errors import ConfigError

    with pytest.raises(ConfigError, match="ray.address") as e:
        Config(ray_address="not an address").check()
    assert "ray start --head" in str(e.value)
    for fine in ("", "auto", "10.0.0.5:6379", "head.example.org:6379", "ray://10.0.0.5:10001"):
        Config(ray_address=fine).check()
