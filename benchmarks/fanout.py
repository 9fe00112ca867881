"""Latency of one cross-silo fan-out: 100 query codes to the demo's 5 silos, merged to the global top-k.

    .venv/bin/python benchmarks/fanout.py --run runs/<demo run> [--repeat 50] [--k 20] [--out benchmarks/results/fanout.md]

The query codes are the first 100 of silo-0's query split, encoded with the run's federated model. Three
ways, side by side in one invocation:

1. **local**: one silo's own index (``SearchIndex.search_codes`` with ties by content id, what a silo runs for
   each search message), the same batch, --repeat times.
2. **simulation**: ``fedhash search --run``'s Flower simulation of the run's 5 silos (each ClientApp searching
   the index folder the run left); the batch is fanned out --repeat times in one simulation
   (``search_simulation(repeat=)``); each fan-out's seconds are timed by the server (send, wait, merge).
3. **loopback deployment**: a SuperLink with TLS and SuperNode authentication and 5 SuperNodes on 127.0.0.1,
   each serving one of the run's silo index folders from its own node config (``out-dir``, ``silo``); the
   batch goes through ``fedhash search --federation``'s door (a Flower run; the answer comes back through
   ``flwr log``), --loopback-repeat fan-outs in that one run (``search.repeat``), and --calls whole calls timed end to
   end (encoding excluded: the codes are computed once). Every process started is stopped by its pid.

Each answer is checked against brute force over the union of the 5 indexes' codes. Medians and p99 go to
--out (markdown, with the command and date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "sites"))
sys.path.insert(0, str(ROOT))

import make_certs  # noqa: E402
import run_loopback as lb  # noqa: E402

from hashing import retrieval  # noqa: E402
from hashing.federated.search import brute_force  # noqa: E402
from simulations import federated_search as F  # noqa: E402


def stats(xs: list[float]) -> str:
    a = np.asarray(xs, float)
    return f"{np.median(a) * 1000:.1f} ms | {np.percentile(a, 99) * 1000:.1f} ms | {len(a)}"


def check(answer: dict, want, n: int) -> None:
    for q in range(n):
        got = [(h["silo"], h["id"], h["distance"]) for h in answer["queries"][q]]
        assert got == [(h["silo"], h["id"], h["distance"]) for h in want.hits(q)], f"query {q} differs from brute force"


def loopback(work: Path, fed: Path, names: list[str], codes: np.ndarray, k: int, version: str, repeat: int,
             calls: int) -> tuple[dict, list[float]]:
    """Start the deployment, run the searches, stop every process by pid."""
    work.mkdir(parents=True, exist_ok=True)
    home, logs = work / "flwr-home", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = lb.flwr_env(home)
    procs = lb.Procs(logs, env)
    summary: dict = {}
    with lb.guarded(procs, summary, work, 10.0):
        creds = make_certs.make_all(work / "certs", ["127.0.0.1", "localhost"], names)
        port = lb.free_port()
        address = f"127.0.0.1:{port}"
        lb.write_connection(home, lb.CONNECTION, address, creds["ca_cert"])
        link = procs.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(creds["ca_cert"]), "--ssl-certfile", str(creds["server_cert"]),
            "--ssl-keyfile", str(creds["server_key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(home / "superlink-state.db")])
        lb.wait_https(port, creds["ca_cert"], link)
        ids = {}
        for name in names:
            res = lb.flwr_json(env, "supernode", "register", str(creds["nodes"][name][1]), lb.CONNECTION, "--name", name)
            ids[name] = str(res["node-id"])
        for name in names:  # each site serves its index from its own node config; data is not read by a search
            procs.start(f"supernode-{name}", [
                "flower-supernode", "--superlink", address, "--root-certificates", str(creds["ca_cert"]),
                "--auth-supernode-private-key", str(creds["nodes"][name][0]), "--host", "127.0.0.1",
                "--port", str(lb.free_port()), "--node-config",
                f'data="{work / "no-data"}" silo="{name}" out-dir="{fed}" threads=1'])
        deadline = time.monotonic() + 120
        while True:
            nodes = lb.flwr_json(env, "supernode", "ls", lb.CONNECTION)["nodes"]
            if {str(n["node-id"]) for n in nodes if n["status"] == "online"} >= set(ids.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNodes not online: {nodes}")
            time.sleep(1)
        answer = F.search_deployment(lb.CONNECTION, codes, k, version, env=env, repeat=repeat, timeout=60)
        procs.track_descendants()
        walls = []
        for _ in range(calls):
            t0 = time.perf_counter()
            F.search_deployment(lb.CONNECTION, codes, k, version, env=env, timeout=60)
            walls.append(time.perf_counter() - t0)
            procs.track_descendants()
    assert summary.get("alive_after_stop") == [], summary
    return answer, walls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a fedhash demo (simulate) run folder")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--n", type=int, default=100, help="query codes per fan-out")
    p.add_argument("--repeat", type=int, default=50, help="fan-outs per Flower run")
    p.add_argument("--calls", type=int, default=3, help="whole fedhash search --federation calls on loopback")
    p.add_argument("--loopback-repeat", type=int, default=10, help="fan-outs in the one loopback search run")
    p.add_argument("--work", default="/tmp/fedhash-fanout")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fanout.md"))
    p.add_argument("--no-loopback", action="store_true")
    args = p.parse_args()

    run = Path(args.run).resolve()
    cfg, fed = F.run_config(run)
    names = sorted(p.name for p in (fed / "silos").iterdir())
    enc = F.query_encoder(fed)
    union = {}
    for name in names:
        with retrieval.open_index(fed / "silos" / name) as idx:
            union[name] = idx.cat.codes(idx.model_version)
    from hashing.silos import make_silos, source_dataset

    silo0 = make_silos(source_dataset(cfg), cfg)[0]
    q = silo0.splits.query[: args.n]
    codes = np.asarray(enc.codes(silo0.ds, q))
    want = brute_force(union, codes, args.k)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    head = (f"{started}  {platform.node()}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}  "
            f"{len(codes)} query codes x {len(names)} silos ({sum(len(v[0]) for v in union.values())} codes), "
            f"{enc.bits} bits, k={args.k}")
    print(head, flush=True)

    rows = []
    with retrieval.open_index(fed / "silos" / names[0]) as idx:
        idx.search_codes(codes, args.k, model_version=enc.version, ties="id")  # warm
        local = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            idx.search_codes(codes, args.k, model_version=enc.version, ties="id")
            local.append(time.perf_counter() - t0)
    rows.append(("local: one silo's index (search_codes, ties by id)", stats(local)))
    print(rows[-1], flush=True)

    t0 = time.perf_counter()
    sim = F.search_simulation(run, codes, args.k, enc.version, repeat=args.repeat)
    sim_wall = time.perf_counter() - t0
    check(sim, want, len(codes))
    assert sim["answered"] == names, sim["answered"]
    rows.append(("simulation: one fan-out (server: send, wait, merge)", stats(sim["latencies"])))
    rows.append(("simulation: the whole `search_simulation` call (Ray and 5 ClientApps start)", stats([sim_wall])))
    print(rows[-2:], flush=True)

    if not args.no_loopback:
        ans, walls = loopback(Path(args.work), fed, names, codes, args.k, enc.version, args.loopback_repeat, args.calls)
        check(ans, want, len(codes))
        assert ans["answered"] == names and ans["asked"] == len(names), ans["answered"]
        rows.append(("loopback (TLS, SuperNode auth): one fan-out (server: send, wait, merge)", stats(ans["latencies"])))
        rows.append(("loopback: one whole `fedhash search --federation` call (a Flower run, flwr log)", stats(walls)))
        print(rows[-2:], flush=True)

    cmd = "python " + shlex.join(["benchmarks/fanout.py", *sys.argv[1:]])
    text = [f"# One cross-silo fan-out ({started})", "", f"`{cmd}`", "", head, "",
            "| what | median | p99 | samples |", "|---|---|---|---|", *(f"| {a} | {b} |" for a, b in rows), "",
            "Every answer equalled brute force over the union of the silos' codes.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
