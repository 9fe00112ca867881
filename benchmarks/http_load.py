"""A bounded loopback load test of ``fedhash serve``: concurrent image searches with a few deletes.

    .venv/bin/python benchmarks/http_load.py --clients 16 --seconds 30

It prepares (once, under --work, default /tmp/fedhash-http-load) a model trained on Fashion-MNIST and an
index of the 1,797 scikit-learn digits plus 5,000 Fashion-MNIST test images, copies the index afresh for
each run, starts ``fedhash serve`` on a free loopback port (stopped by its pid at the end, whatever
happens), and then for --seconds runs --clients threads that each POST PNG uploads of database images
to /search, while one more thread DELETEs --deletes images spread over the run. A third of the
searches ask for the deleted images' own pixels, so a stale index would show. It reports requests/s,
p50/p99 latency, the 4xx/5xx counts (5xx must be 0) and checks that no search that *started* after a
DELETE had returned got the removed id back; the markdown table goes to --out with the command and date.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN_NAME = "token"


def sh(cmd: list[str], **kw) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def prepare(work: Path, n_fashion: int) -> tuple[Path, str]:
    """(the pristine index folder, its model version), built once under ``work``."""
    from hashing import retrieval as R
    from hashing.data import load_dataset, load_digits, subset

    pristine = work / "index-pristine"
    if (pristine / "catalogue.sqlite").is_file() and (pristine / "READY").is_file():
        with R.open_index(pristine, cache_dir=work / "cache") as idx:
            return pristine, idx.model_version
    runs = work / "runs"
    if not runs.is_dir() or not any(runs.iterdir()):
        sh([str(Path(sys.executable).with_name("fedhash")), "train", "--data", "fashion-mnist", "--limit", "6000",
            "--bits", "64", "--size", "32", "--epochs", "2", "--views", "2", "--runs-dir", str(runs),
            "--cache-dir", str(work / "cache")])
    (run,) = sorted(runs.iterdir())[-1:]
    fm = load_dataset("fashion-mnist")
    test = subset(fm, np.arange(60000, 60000 + n_fashion))  # the t10k images, none of them trained on
    shutil.rmtree(pristine, ignore_errors=True)
    t0 = time.perf_counter()
    idx, rep = R.build(pristine, run, test, cache_dir=work / "cache", command="benchmarks/http_load.py prepare")
    with idx:
        rep2 = idx.add(load_digits(), command="benchmarks/http_load.py prepare")
        print(f"index: {rep.summary()}; digits: {rep2.summary()}; {len(idx)} images, model {idx.model_version} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        version = idx.model_version
    (pristine / "READY").write_text("ok\n")
    return pristine, version


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, token_file: Path, cache_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    import httpx

    cmd = [str(Path(sys.executable).with_name("fedhash")), "serve", "--index", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--token-file", str(token_file), "--cache-dir", str(cache_dir)]
    print("+", shlex.join(cmd), f"> {log_path}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"fedhash serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"fedhash serve did not answer /health within 120 s; see {log_path}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent search clients (threads)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the load runs")
    ap.add_argument("--deletes", type=int, default=20, help="images deleted during the run, evenly spread")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n-fashion", type=int, default=5000, help="Fashion-MNIST test images in the index")
    ap.add_argument("--work", default="/tmp/fedhash-http-load", help="model, index and logs (kept for reruns)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "http_load.md"))
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.seconds <= 600 and 0 <= args.deletes <= 1000):
        ap.error("keep it bounded: --clients 1..64, --seconds 1..600, --deletes 0..1000")
    import httpx

    from hashing import catalogue as C
    from hashing import retrieval as R

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pristine, version = prepare(work, args.n_fashion)
    folder = work / "index-run"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder)
    token = __import__("secrets").token_urlsafe(32)
    token_file = work / TOKEN_NAME
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    # the query pool: PNGs of database images; the victims (deleted during the run) are queried too
    rng = np.random.default_rng(0)
    with R.open_index(folder, cache_dir=work / "cache") as idx:
        ids, codes = idx.cat.codes(version)
        _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        unique = ids[counts[inv.ravel()] == 1]  # images with a code of their own: each is its own top hit
        victims = [int(i) for i in rng.choice(unique, size=args.deletes, replace=False)]
        gone = set(victims)
        pool_ids = [int(i) for i in rng.choice(ids, size=400, replace=False) if int(i) not in gone]
        queries = {i: png(idx.image(i)) for i in pool_ids + victims}
        n_index = len(idx)

    load_before = os.getloadavg()[0]
    port = free_port()
    proc = start_server(folder, token_file, work / "cache", port, work / "serve.log")
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    lock = threading.Lock()
    searches: list[tuple[float, float, int, int, set[str]]] = []  # (start, end, status, queried id, ids)
    deletes: dict[str, tuple[float, float, int]] = {}  # id -> (start, end, status)
    errors: list[str] = []
    stop_at = [0.0]
    try:
        # one warm-up request per client connection is not counted
        with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
            r = c.post("/search", params={"k": args.k}, files={"image": ("q.png", queries[victims[0] if victims else pool_ids[0]], "image/png")})
            r.raise_for_status()
        start = threading.Barrier(args.clients + 2)

        def searcher(seed: int) -> None:
            rr = np.random.default_rng(seed)
            with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
                start.wait()
                while time.monotonic() < stop_at[0]:
                    if victims and rr.random() < 1 / 3:
                        qid = victims[int(rr.integers(len(victims)))]
                    else:
                        qid = pool_ids[int(rr.integers(len(pool_ids)))]
                    t0 = time.monotonic()
                    try:
                        r = c.post("/search", params={"k": args.k},
                                   files={"image": ("q.png", queries[qid], "image/png")})
                        status = r.status_code
                        got = {h["id"] for h in r.json()["results"][0]} if status == 200 else set()
                    except Exception as e:  # a dropped connection counts as a server failure
                        status, got = 599, set()
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")
                    with lock:
                        searches.append((t0, time.monotonic(), status, qid, got))

        def deleter() -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
                start.wait()
                t_start = time.monotonic()
                gap = args.seconds / (len(victims) + 1)
                for j, vid in enumerate(victims):
                    time.sleep(max(0.0, t_start + gap * (j + 1) - time.monotonic()))
                    gid = C.fmt_id(vid)
                    t0 = time.monotonic()
                    try:
                        status = c.delete(f"/items/{gid}").status_code
                    except Exception as e:
                        status = 599
                        with lock:
                            errors.append(f"DELETE {gid}: {type(e).__name__}: {e}")
                    with lock:
                        deletes[gid] = (t0, time.monotonic(), status)

        threads = [threading.Thread(target=searcher, args=(s,), daemon=True) for s in range(args.clients)]
        threads.append(threading.Thread(target=deleter, daemon=True))
        for t in threads:
            t.start()
        stop_at[0] = time.monotonic() + args.seconds + 1e9  # set for real at the barrier below
        start.wait()
        t_begin = time.monotonic()
        stop_at[0] = t_begin + args.seconds
        for t in threads:
            t.join(timeout=args.seconds + 300)
        t_end = time.monotonic()
        health = httpx.get(f"{base}/health", timeout=30).json()
    finally:
        stop_server(proc)

    # ------------------------------------------------------------------ the figures
    wall = t_end - t_begin
    lat = [(e - s) * 1000 for s, e, st, _, _ in searches if st == 200]
    dlat = [(e - s) * 1000 for s, e, st in deletes.values() if st == 200]
    statuses = [s[2] for s in searches] + [d[2] for d in deletes.values()]
    n5xx = sum(st >= 500 for st in statuses)
    n4xx = sum(400 <= st < 500 for st in statuses)
    done = {gid: end for gid, (_, end, st) in deletes.items() if st == 200}
    stale = [(s, gid) for s, _, st, _, got in searches for gid, end in done.items() if st == 200 and s > end and gid in got]
    asked_after = sum(1 for s, _, st, qid, _ in searches if st == 200 and C.fmt_id(qid) in done and s > done[C.fmt_id(qid)])
    found_before = sum(1 for s, e, st, qid, got in searches
                       if st == 200 and C.fmt_id(qid) in done and e < deletes[C.fmt_id(qid)][0] and C.fmt_id(qid) in got)
    asked_before = sum(1 for s, e, st, qid, _ in searches
                       if st == 200 and C.fmt_id(qid) in done and e < deletes[C.fmt_id(qid)][0])
    total = len(searches) + len(deletes)
    rows = [
        ("index", f"{n_index:,} images (5,000 Fashion-MNIST test + 1,797 digits), 64-bit model {version}"),
        ("clients", f"{args.clients} search threads + 1 delete thread, keep-alive httpx, loopback"),
        ("duration", f"{wall:.1f} s"),
        ("requests", f"{total:,} ({len(searches):,} searches, {len(deletes)} deletes)"),
        ("throughput", f"{total / wall:.1f} requests/s ({len(searches) / wall:.1f} searches/s)"),
        ("search latency", f"p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {max(lat, default=float('nan')):.1f} ms"),
        ("delete latency", f"p50 {pct(dlat, 50):.1f} ms, p99 {pct(dlat, 99):.1f} ms"),
        ("5xx responses", f"{n5xx}" + (f" (first: {errors[0]})" if errors else "")),
        ("4xx responses", f"{n4xx}"),
        ("deleted ids returned by a search that started after the DELETE returned",
         f"{len(stale)} (of {asked_after:,} searches for a deleted image's own pixels after its DELETE)"),
        ("deleted images found (rank <= k) before their DELETE", f"{found_before:,} of {asked_before:,} searches for them"),
        ("index count after", f"{health['count']:,} (expected {n_index - len(done):,})"),
    ]
    ok = n5xx == 0 and not stale and health["count"] == n_index - len(done) and len(done) == len(victims)
    cmd = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                      os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else argv))
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    table = "\n".join(["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {platform.python_version()}"
    md = (f"# HTTP load test of `fedhash serve`\n\n"
          f"Command (from the repository root): `{cmd}`\n\n"
          f"Date: {date}\n\n"
          f"Machine: {cpu}; the server and the clients share these cores (1-minute load average "
          f"{load_before:.2f} before the run).\n\n"
          f"{table}\n\n"
          f"Result: {'PASS' if ok else 'FAIL'} (no 5xx, no removed id after its DELETE returned, the count adds up).\n\n"
          "Each search is a multipart PNG upload of a database image (one third of them the images that get "
          f"deleted during the run), k={args.k}; the server decodes it, encodes it with the index's model "
          "(backbone + hash head; as many encodings at a time as the cores hold torch's threads: one on 2 cores) "
          "and searches the FAISS index under the index's lock, which deletes take too; so on this machine "
          "encodings run one at a time and search latency grows with the number of clients.\n")
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
