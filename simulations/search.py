"""``fedhash index build|add|remove|upgrade|rollback|info|audit``, ``fedhash search`` and ``fedhash serve``:
a silo's index from the command line (the work is :mod:`hashing.retrieval`'s)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from hashing import catalogue as C
from hashing import retrieval as R
from hashing.errors import FedhashError
from . import options


def _open(args) -> R.SearchIndex:
    return R.open_index(args.index, weights=args.weights, cache_dir=args.cache_dir)


def build(args) -> int:
    t0 = time.perf_counter()
    idx, rep = R.build(args.out, args.model, args.data, weights=args.weights, cache_dir=args.cache_dir,
                       strict=args.strict, overwrite=args.overwrite,
                       command=args.command_line)
    with idx:
        print(f"index {args.out}: {rep.summary()}")
        print(f"  {len(idx)} images, model {idx.model_version} ({idx.bits} bits); {time.perf_counter() - t0:.1f} s in all")
    return 0


def add(args) -> int:
    with _open(args) as idx:
        rep = idx.add(args.data, strict=args.strict, command=args.command_line, readd=args.readd)
        print(f"index {args.index}: {rep.summary()}; {len(idx)} images now")
    return 0


def _manifest_entries(path: str) -> tuple[list[str], list[str]]:
    """(ids, paths) listed in a removal manifest: a CSV with a header naming 'id' or 'path' (or one
    bare path or id per line)."""
    ids, paths = [], []
    try:
        rows = list(csv.reader(Path(path).read_text("utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FedhashError(f"cannot read the removal manifest {path} ({e}); give a CSV with a column 'id' or 'path'") from e
    rows = [r for r in rows if r and "".join(r).strip()]
    if not rows:
        raise FedhashError(f"the removal manifest {path} lists nothing to remove")
    head = [c.strip().lower() for c in rows[0]]
    if "id" in head or "path" in head:
        for r in rows[1:]:
            for col, out in (("id", ids), ("path", paths)):
                if col in head and head.index(col) < len(r) and r[head.index(col)].strip():
                    out.append(r[head.index(col)].strip())
    else:
        for r in rows:
            v = r[0].strip()
            (ids if len(v) == 16 and all(c in "0123456789abcdefABCDEF" for c in v) else paths).append(v)
    return ids, paths


def remove(args) -> int:
    ids, paths = list(args.id or []), list(args.path or [])
    if args.manifest:
        mi, mp = _manifest_entries(args.manifest)
        ids, paths = ids + mi, paths + mp
    images = list(args.image or [])
    if not (ids or paths or images):
        raise FedhashError("name what to remove: --id, --path, --image (by content) or --manifest")
    with _open(args) as idx:
        n, unknown = idx.remove_named(ids=ids, paths=paths, images=images, missing_ok=args.missing_ok,
                                      command=args.command_line)
        msg = f"index {args.index}: removed {n} image(s); {len(idx)} left"
        if unknown:
            msg += f"; {len(unknown)} not in the index, left as they were (first: {unknown[0]})"
        print(msg)
    return 0


def upgrade(args) -> int:
    with _open(args) as idx:
        old = idx.model_version
        n = idx.upgrade(args.model, command=args.command_line)
        print(f"index {args.index}: {n} images re-encoded; model {old} -> {idx.model_version} "
              f"(the old one is kept: fedhash index rollback --index {args.index})")
    return 0


def rollback(args) -> int:
    with _open(args) as idx:
        cur = idx.model_version
        prev = idx.rollback(command=args.command_line)
        print(f"index {args.index}: back to model {prev} (from {cur})")
    return 0


def info(args) -> int:
    with _open(args) as idx:
        print(json.dumps(idx.stats(), indent=2, default=str))
    return 0


def audit(args) -> int:
    with _open(args) as idx:
        rows = idx.cat.audit()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'#':>4}  {'time (UTC)':<29} {'action':<9} {'count':>7}  {'model':<16}  command")
    for r in rows:
        print(f"{r['seq']:>4}  {r['time']:<29} {r['action']:<9} {r['count']:>7}  {r['model_version'] or '-':<16}  {r['command']}")
    return 0


def _queries(spec: str) -> tuple[list[str], list]:
    if Path(spec).is_dir():
        ds = R.load_images(spec, strict=True)
        return list(ds.paths or []), [ds.image(i) for i in range(len(ds))]
    return [spec], [R.read_query(spec)]


def search(args) -> int:
    where = [w for w in ("index", "federation", "run") if getattr(args, w)]
    if len(where) != 1:
        raise FedhashError("name one place to search: --index (this silo's index), --federation (every site, "
                           "through a SuperLink) or --run (every silo of a fedhash simulate run)")
    if where[0] != "index":
        return search_federation(args)
    if args.model or args.mode:
        raise FedhashError("--model and --mode are for --federation and --run; a local index encodes with its own model")
    names, images = _queries(args.image)
    with _open(args) as idx:
        t0 = time.perf_counter()
        idx.encoder().backbone() if idx.encoder().reads_features else None  # built once, not a query's cost
        timings: dict[str, float] = {"load model": time.perf_counter() - t0}
        results = idx.search(images, args.k, asymmetric=args.asymmetric, timings=timings)
        version = idx.model_version
    if args.json:
        print(json.dumps({"model_version": version, "queries": [
            {"query": q, "results": [h.to_json() for h in hits]}
            for q, hits in zip(names, results)]}, indent=2))
        return 0
    dist = "asymmetric distance" if args.asymmetric else "Hamming"
    for q, hits in zip(names, results):
        print(f"query {q} (model {version}): top {len(hits)}")
        print(f"{'rank':>4}  {'id':<16}  {dist:>10}  {'labels':<20}  path")
        for h in hits:
            d = f"{h.distance:.3f}" if args.asymmetric else f"{int(h.distance)}"
            print(f"{h.rank:>4}  {C.fmt_id(h.id)}  {d:>10}  {','.join(h.labels) or '-':<20}  "
                  f"{h.path or '(kept in the catalogue)'}")
    ms = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items())
    print(f"({ms})")
    return 0


def search_federation(args) -> int:
    """``fedhash search --federation CONN --model M`` or ``--run RUN``: the query encoded here, codes to every silo."""
    from . import federated_search as F

    if args.asymmetric:
        raise FedhashError("--asymmetric re-ranks with the soft query, which never leaves this site; across silos "
                           "search is by Hamming distance of the codes")
    names, images = _queries(args.image)
    t0 = time.perf_counter()
    ans = F.search_federation(images, federation=args.federation, run=args.run, model=args.model, k=args.k,
                              mode=args.mode, weights=args.weights, cache_dir=args.cache_dir, app=args.app,
                              timeout=args.timeout)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**ans, "queries": [{"query": q, "results": hits}
                                              for q, hits in zip(names, ans["queries"])]}, indent=2))
        return 0 if ans["answered"] else 1
    for q, hits in zip(names, ans["queries"]):
        print(f"query {q} (model {ans['model_version']}): top {len(hits)} across {len(ans['answered'])} silos")
        print(f"{'rank':>4}  {'silo':<16}  {'id':<16}  {'Hamming':>7}  labels")
        for h in hits:
            print(f"{h['rank']:>4}  {h['silo']:<16}  {h['id']:<16}  {h['distance']:>7}  "
                  f"{','.join(h['labels']) if 'labels' in h else '(not shared)'}")
    print(f"asked {ans['asked']} silos; answered: {', '.join(ans['answered']) or 'none'}")
    for f in ans["failed"]:
        who = f"node {f['node']}" + (f" ({f['silo']})" if f.get("silo") else "")
        print(f"  no answer from {who}: {f['reason'][-200:]}")
    print(f"(fan-out {ans['seconds'] * 1000:.0f} ms; {seconds:.1f} s in all, encoding and the Flower run included)")
    return 0 if ans["answered"] else 1


def serve(args) -> int:
    from client.search_service import serve as run

    run(args.index, host=args.host, port=args.port, token_file=args.token_file, weights=args.weights,
        cache_dir=args.cache_dir, max_upload_mb=args.max_upload_mb)
    return 0


def add_parsers(sub) -> None:
    """The index, search and serve commands on the ``fedhash`` parser."""
    def common(p):
        p.add_argument("--weights", default=None,
                       help="this site's backbone weights file (default: the weights that ship with fedhash)")
        p.add_argument("--cache-dir", default=None, help="feature cache folder (default ~/.cache/fedhash/features)")

    ix = sub.add_parser("index", help="a silo's image index: build, add, remove, upgrade, rollback, info, audit")
    isub = ix.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="encode a folder, manifest or data set with a model and index it")
    b.add_argument("--model", required=True, help="a model file, a fedhash train run or a federated run folder")
    b.add_argument("--data", required=True, help="a folder of images, of class/*.png, a CSV manifest path,labels, "
                                                 "an image file, or fashion-mnist | digits")
    b.add_argument("--out", required=True, help="the index folder to create")
    b.add_argument("--overwrite", action="store_true",
                   help="replace the content of an index already in --out (its audit log is kept)")
    b.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    common(b)
    b.set_defaults(func=build)
    a = isub.add_parser("add", help="encode and add new images (only those not indexed yet)")
    a.add_argument("--index", required=True)
    a.add_argument("--data", required=True)
    a.add_argument("--strict", action="store_true")
    a.add_argument("--readd", action="store_true",
                   help="index images that were removed from this index before (default: left out, reported)")
    common(a)
    a.set_defaults(func=add)
    r = isub.add_parser("remove", help="delete images by id, path, content or a manifest (index and catalogue)")
    r.add_argument("--index", required=True)
    r.add_argument("--id", action="append", help="a content id (16 hex digits, as search prints); repeatable")
    r.add_argument("--path", action="append", help="an indexed image's path; repeatable")
    r.add_argument("--image", action="append", help="an image file: removes the indexed image with its pixels")
    r.add_argument("--manifest", help="a CSV with a column 'id' or 'path' (or one id or path per line)")
    r.add_argument("--missing-ok", action="store_true",
                   help="remove those held and report the others (default: if any is unknown, remove nothing)")
    common(r)
    r.set_defaults(func=remove)
    u = isub.add_parser("upgrade", help="re-encode every image under a new model, then swap atomically")
    u.add_argument("--index", required=True)
    u.add_argument("--model", required=True)
    common(u)
    u.set_defaults(func=upgrade)
    rb = isub.add_parser("rollback", help="back to the model before the last upgrade")
    rb.add_argument("--index", required=True)
    common(rb)
    rb.set_defaults(func=rollback)
    inf = isub.add_parser("info", help="what the index holds: count, model version, privacy guarantee")
    inf.add_argument("--index", required=True)
    common(inf)
    inf.set_defaults(func=info)
    au = isub.add_parser("audit", help="the append-only audit log: every build, add, remove, upgrade, rollback")
    au.add_argument("--index", required=True)
    au.add_argument("--json", action="store_true")
    common(au)
    au.set_defaults(func=audit)

    s = sub.add_parser("search", help="the top-k of a query image: in a silo's index, or across every silo by code")
    where = s.add_argument_group("where (one of)")
    where.add_argument("--index", help="this silo's index folder")
    where.add_argument("--federation", metavar="CONNECTION",
                       help="every site of a federation: a SuperLink connection of the Flower config (as flwr run "
                            "takes it); the query is encoded here and only its code travels")
    where.add_argument("--run", help="every silo of a fedhash simulate run folder (a Flower simulation of its silos)")
    s.add_argument("--image", required=True, help="a query image file (or a folder of them)")
    s.add_argument("-k", type=options.positive_int, default=10)
    s.add_argument("--model", help="--federation: this site's copy of the federation's hash function (its index "
                                   "folder, a model.pt or run folder); --run: default the run's federated model")
    s.add_argument("--mode", choices=("supervised", "unsupervised"),
                   help="--run: which of the run's federations (default: its headline one)")
    s.add_argument("--app", help="--federation: the fedhash Flower app folder (default: where fedhash is installed from)")
    s.add_argument("--timeout", type=options.positive_float, default=120.0,
                   help="--federation: seconds each site may take to answer (the run's round-timeout)")
    s.add_argument("--asymmetric", action="store_true",
                   help="re-rank a Hamming shortlist by the soft query (sum |sigmoid(z) - b|)")
    s.add_argument("--json", action="store_true")
    common(s)
    s.set_defaults(func=search)

    v = sub.add_parser("serve", help="the index's HTTP API and search page (a bearer token guards all but /health)")
    v.add_argument("--index", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=options.port, default=8080)
    v.add_argument("--token-file", default=None,
                   help="a file holding the bearer token (default: $FEDHASH_TOKEN, else a new one in <index>/serve.token)")
    v.add_argument("--max-upload-mb", type=options.positive_float, default=20)
    common(v)
    v.set_defaults(func=serve)
