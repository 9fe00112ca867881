"""The ``fedhash`` command line.

    fedhash train --data fashion-mnist --bits 64        centralized CroVCA on cached features (probe mode)
    fedhash eval --run runs/<id>                         CroVCA vs ITQ, PCA, LSH and float cosine at 16/32/64 bits
    fedhash export-codes --run runs/<id> --out codes.npz codes of the run's query and database splits
    fedhash simulate simulations/scenarios/<name>.toml   a federated scenario on Flower's simulation engine
    fedhash demo                                         the default scenario: 5 simulated hospitals, end to end
    fedhash privacy-sweep --scenario dp-demo             the privacy-utility curve (sample- and client-level DP)
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hashing import atomic
from hashing.errors import FedhashError

log = logging.getLogger("fedhash")
BITS_CHOICES = (16, 32, 64)


# --------------------------------------------------------------------------- run folders


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(s).name if "/" in s else s).strip("-")[:24] or "data"


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh folder ``root/<YYYYmmdd-HHMMSS>-<name>`` (suffixed -1, -2, ... when taken)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = Path(root) / (f"{stamp}-{name}" if i == 0 else f"{stamp}-{name}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise FedhashError(f"cannot create a run folder under {root}")


def read_run(run: Path) -> dict:
    cfg = run / "config.json"
    if not cfg.exists():
        raise FedhashError(f"{run} is not a fedhash run folder (no config.json); pass --run runs/<id> from fedhash train")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise FedhashError(f"{cfg} is not valid JSON ({e}); re-run fedhash train") from e


def _from_dict(cls, d: dict, what: str):
    """A config dataclass from a run's config.json section, refusing keys it does not know."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise FedhashError(f"run config has unknown {what} keys {sorted(unknown)}; was it written by another fedhash version?")
    return cls(**d)


def _data_cfg(d: dict):
    from hashing.pipeline import DataConfig

    return _from_dict(DataConfig, d, "data")


def _train_cfg(d: dict):
    from hashing.train import TrainConfig

    return _from_dict(TrainConfig, d, "train")


def _open_run(args: argparse.Namespace):
    """An existing run folder with its data prepared as at training time: (run, config, prepared data)."""
    from hashing.pipeline import prepare

    run = Path(args.run)
    rc = read_run(run)
    dcfg = _data_cfg(rc["data"])
    if args.cache_dir:
        dcfg.cache_dir = args.cache_dir
    prep = prepare(dcfg)
    _check_splits(run, prep)
    return run, rc, prep


def _load_run_model(path: Path, prep):
    """A model of the run, refused if it was trained on other backbone weights or input size than ``prep``'s."""
    from hashing.model import load_model

    coder, rec = load_model(path)
    if rec["config"]["weights"] != prep.weights_id or rec["config"]["size"] != prep.cfg.size:
        raise FedhashError(f"{path} was trained on other backbone weights or input size; retrain it")
    return coder, rec


def _check_splits(run: Path, prep) -> None:
    """The run's recorded splits must be the ones the data gives now (same data, same seed)."""
    f = run / "splits.npz"
    if not f.exists():
        return
    with np.load(f) as z:
        for name in ("train", "query", "database"):
            if not np.array_equal(z[name], getattr(prep.splits, name)):
                raise FedhashError(
                    f"the data behind {run} changed since training ({name} split differs); retrain with fedhash train"
                )


# --------------------------------------------------------------------------- train


def _library_versions() -> dict:
    import faiss
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "faiss": faiss.__version__, "numpy": np.__version__}


def cmd_train(args: argparse.Namespace) -> int:
    from hashing import plots
    from hashing.codes import logits_to_codes, unpack
    from hashing.index import SiloIndex
    from hashing.metrics import retrieval_metrics
    from hashing.model import save_model
    from hashing.pipeline import DataConfig, prepare
    from hashing.train import TrainConfig, encode, train_head

    t0 = time.perf_counter()
    dcfg = DataConfig(
        data=args.data, seed=args.seed, n_query=args.n_query, n_train=args.n_train, size=args.size, views=args.views,
        backbone=args.backbone, weights=args.weights, cache_dir=args.cache_dir, strict=args.strict, limit=args.limit,
    )
    tcfg = TrainConfig(bits=args.bits, supervised=args.supervised, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, variant=args.variant, seed=args.seed)
    prep = prepare(dcfg)
    _report_skipped(prep.ds)
    t_feat = time.perf_counter()
    labels = prep.labels(prep.splits.train) if tcfg.supervised else None
    coder, hist = train_head(prep.train_views, labels, tcfg)
    t_train = time.perf_counter()

    q, db = prep.splits.query, prep.splits.database
    q_logits, db_logits = encode(coder, prep.clean[q]), encode(coder, prep.clean[db])
    db_codes = logits_to_codes(db_logits)
    sym = retrieval_metrics(q_logits, db_codes, prep.labels(q), prep.labels(db), asymmetric=False, pr=False)
    asym = retrieval_metrics(q_logits, db_codes, prep.labels(q), prep.labels(db), asymmetric=True, pr=False)
    balance = unpack(db_codes).mean(0)

    run = new_run_dir(args.runs_dir, f"{_slug(args.data)}-{tcfg.bits}b-{'sup' if tcfg.supervised else 'unsup'}")
    version = save_model(run / "model.pt", coder, backbone=prep.backbone, weights=prep.weights_id, size=dcfg.size,
                         extra={"train": tcfg.to_dict(), "data": dcfg.to_dict()})
    with atomic.atomic_path(run / "splits.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **prep.splits.to_dict())
    atomic.write_json(run / "config.json", {
        "data": dcfg.to_dict(), "train": tcfg.to_dict(), "model_version": version, "backbone": prep.backbone,
        "weights_id": prep.weights_id, "feature_dim": prep.feature_dim, "n_images": len(prep.ds),
        "n_skipped": len(prep.ds.skipped), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _library_versions(), "command": sys.argv,
    })
    seconds = {**prep.seconds, "train": t_train - t_feat, "total": time.perf_counter() - t0}
    atomic.write_json(run / "metrics.json", {
        "model_version": version, "symmetric": sym, "asymmetric": asym, "epochs": hist.epoch,
        "step_loss": hist.step_loss, "bit_balance": balance.tolist(), "seconds": seconds,
        "skipped_images": [list(s) for s in prep.ds.skipped],
    })
    index = SiloIndex(tcfg.bits, version, backbone=prep.backbone)
    index.add(db_codes, db)
    index.save(run / "index.faiss")
    steps_per_epoch = len(hist.step_loss) // max(tcfg.epochs, 1)
    plots.plot_loss(hist.step_loss, steps_per_epoch, run / "loss.png")
    plots.plot_bit_balance(balance, run / "bit_balance.png")

    mode = "supervised" if tcfg.supervised else "unsupervised"
    print(f"CroVCA {mode}, {tcfg.bits} bits, {dcfg.backbone} @ {dcfg.size}px, {len(prep.splits.train)} train images")
    print(f"  mAP@1000 {sym['mAP@1000']:.4f} (Hamming)  {asym['mAP@1000']:.4f} (asymmetric)   "
          f"P@100 {sym['P@100']:.4f}   bits balanced {balance.min():.2f}..{balance.max():.2f}")
    print(f"  time: features {seconds['features']:.1f}s, training {seconds['train']:.1f}s, total {seconds['total']:.1f}s")
    print(f"  model version {version}; database index: {run / 'index.faiss'} ({len(index)} codes)")
    print(f"run folder: {run}")
    return 0


def _report_skipped(ds) -> None:
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable image(s); listed in metrics.json:", file=sys.stderr)
        for p, why in ds.skipped[:10]:
            print(f"  {p}: {why}", file=sys.stderr)


# --------------------------------------------------------------------------- eval


def _load_or_train(run: Path, prep, tcfg, supervised: bool, bits: int):
    """The run's own model when (mode, bits) match, else a companion trained once on the same features and kept."""
    from dataclasses import replace

    from hashing.model import save_model
    from hashing.train import train_head

    if tcfg.supervised == supervised and tcfg.bits == bits:
        coder, rec = _load_run_model(run / "model.pt", prep)
        return coder, rec["model_version"], "run model"
    path = run / "companions" / f"{'sup' if supervised else 'unsup'}-{bits}.pt"
    if path.exists():
        coder, rec = _load_run_model(path, prep)
        return coder, rec["model_version"], "companion (cached)"
    cfg = replace(tcfg, supervised=supervised, bits=bits)
    labels = prep.labels(prep.splits.train) if supervised else None
    coder, _ = train_head(prep.train_views, labels, cfg)
    version = save_model(path, coder, backbone=prep.backbone, weights=prep.weights_id, size=prep.cfg.size,
                         extra={"train": cfg.to_dict(), "data": prep.cfg.to_dict()})
    return coder, version, "companion (trained now)"


def cmd_eval(args: argparse.Namespace) -> int:
    from hashing import plots
    from hashing.baselines import fit_baseline
    from hashing.codes import logits_to_codes
    from hashing.metrics import float_retrieval_metrics, plot_pr_curves, retrieval_metrics
    from hashing.train import encode

    if (Path(args.run) / "federation.json").exists():
        return _eval_federated(Path(args.run))
    bits_list = [int(b) for b in args.bits.split(",")]
    run, rc, prep = _open_run(args)
    dcfg, tcfg = prep.cfg, _train_cfg(rc["train"])
    q, db = prep.splits.query, prep.splits.database
    ql, dl = prep.labels(q), prep.labels(db)
    qf, dbf = np.asarray(prep.clean[q], dtype=np.float32), np.asarray(prep.clean[db], dtype=np.float32)
    train_clean = np.asarray(prep.clean[prep.splits.train], dtype=np.float32)
    k = args.k
    rows, curves = [], {b: {} for b in bits_list}

    def add(method, bits, res, asym=None, note=""):
        row = {"method": method, "bits": bits, f"mAP@{k}": res[f"mAP@{k}"], "P@100": res["P@100"],
               "P@r2": res.get("P@r2"), f"mAP@{k} asym": asym[f"mAP@{k}"] if asym else None, "note": note}
        rows.append(row)
        print(_fmt_row(row, k), flush=True)

    print(_fmt_header(k))
    for bits in bits_list:
        for sup in (False, True):
            coder, version, note = _load_or_train(run, prep, tcfg, sup, bits)
            q_logits, db_codes = encode(coder, qf), logits_to_codes(encode(coder, dbf))
            res = retrieval_metrics(q_logits, db_codes, ql, dl, asymmetric=False, k=k)
            asym = retrieval_metrics(q_logits, db_codes, ql, dl, asymmetric=True, k=k, pr=False)
            name = f"CroVCA {'sup' if sup else 'unsup'}"
            add(name, bits, res, asym, f"{note}, version {version}")
            curves[bits][name] = res["pr"]
        for base in ("itq", "pca", "lsh"):
            b = fit_baseline(base, train_clean, bits, seed=dcfg.seed)
            res = retrieval_metrics(b.encode(qf), b.encode(dbf), ql, dl, asymmetric=False, k=k)
            add(base.upper(), bits, res)
            curves[bits][base.upper()] = res["pr"]
    fl = float_retrieval_metrics(qf, dbf, ql, dl, k=k)
    add("float cosine", 0, fl, note=f"{prep.feature_dim}-d float features")

    out = {"run": str(run), "k": k, "n_queries": int(len(q)), "n_db": int(len(db)), "rows": rows,
           "backbone": prep.backbone, "size": dcfg.size, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic.write_json(run / "eval.json", out)
    atomic.write_text(run / "eval.md", _markdown(rows, k, run))
    for bits in bits_list:
        curves[bits]["float cosine"] = fl["pr"]
        plot_pr_curves(curves[bits], run / f"pr_{bits}bits.png", title=f"precision-recall, {bits} bits")
    plots.plot_table_bars(rows, f"mAP@{k}", run / "map_bars.png", f"mAP@{k} by method and code length")
    print(f"wrote {run / 'eval.json'}, {run / 'eval.md'}, PR curves pr_<bits>bits.png and map_bars.png")
    return 0


def _fmt_header(k: int) -> str:
    h = f"{'method':<14} {'bits':>4} {'mAP@' + str(k):>9} {'P@100':>7} {'P@r2':>7} {'asym mAP':>9}"
    return h + "\n" + "-" * len(h)


def _fmt_row(r: dict, k: int) -> str:
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
    bits = str(r["bits"]) if r["bits"] else "-"
    return f"{r['method']:<14} {bits:>4} {f(r[f'mAP@{k}']):>9} {f(r['P@100']):>7} {f(r['P@r2']):>7} {f(r[f'mAP@{k} asym']):>9}"


def _markdown(rows: list[dict], k: int, run: Path) -> str:
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else "–"  # noqa: E731
    lines = [f"# Retrieval on {run.name}", "", f"| method | bits | mAP@{k} | P@100 | P@r2 | mAP@{k} (asymmetric) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits'] or '–'} | {f(r[f'mAP@{k}'])} | {f(r['P@100'])} | {f(r['P@r2'])} | "
                     f"{f(r[f'mAP@{k} asym'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- export-codes


def format_privacy(priv: dict) -> str:
    """One paragraph: the guarantee a federated model was trained under."""
    unit = priv.get("unit", "none")
    if unit == "none":
        return "privacy: none (no differential privacy)"
    lines = [f"privacy: {unit}; {priv.get('mechanism', '')}",
             f"  ε = {priv.get('epsilon', float('nan')):.3f} at δ = {priv.get('delta'):g} ({priv.get('accountant')}), "
             f"after {priv.get('rounds')} rounds"]
    if "epsilon_per_silo" in priv:
        lines.append("  per silo: " + ", ".join(f"{k} ε={v:.3f}" for k, v in priv["epsilon_per_silo"].items()))
        for key in ("noise_multiplier", "moments_noise", "sample_rate", "steps"):
            vals = priv.get(key) or {}
            if vals:
                lines.append(f"  {key.replace('_', ' ')}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in vals.items()))
        lines.append(f"  per-image clipping norm {priv.get('max_grad_norm')}")
    else:
        lines.append(f"  noise multiplier {priv.get('noise_multiplier'):.4g}, clipping norm {priv.get('clipping_norm')} "
                     f"({priv.get('clipping')}), {priv.get('silos')} silos")
    return "\n".join(lines)


def _eval_federated(run: Path) -> int:
    """A federated run folder (fedhash simulate's federated/, or a ServerApp's out-dir): its final
    per-silo mAP and the privacy guarantee its model was trained under."""
    try:
        st = json.loads((run / "federation.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FedhashError(f"{run / 'federation.json'} is unreadable ({e}); the run did not finish writing it") from e
    last = st["rounds"][-1] if st.get("rounds") else {}
    print(f"federated run {run}: status {st.get('status')}, model {st.get('model_version')}, "
          f"{len(st.get('rounds', []))} rounds")
    for name, m in sorted(last.get("map", {}).items()):
        print(f"  {name}: mAP@1000 {m:.4f}")
    if "mean_map" in last:
        print(f"  mean mAP@1000 {last['mean_map']:.4f}, bit balance {last.get('bit_balance', float('nan')):.3f}")
    print(format_privacy(st.get("privacy", {"unit": "none"})))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hashing.codes import logits_to_codes
    from hashing.train import encode

    run, _, prep = _open_run(args)
    coder, rec = _load_run_model(run / "model.pt", prep)
    q, db = prep.splits.query, prep.splits.database
    q_logits = encode(coder, prep.clean[q])
    arrays = {
        "query_codes": logits_to_codes(q_logits),
        "db_codes": logits_to_codes(encode(coder, prep.clean[db])),
        "query_logits": q_logits.astype(np.float32),
        "query_labels": prep.labels(q).astype(np.int64),
        "db_labels": prep.labels(db).astype(np.int64),
        "bits": np.int64(coder.bits),
    }
    out = Path(args.out)
    with atomic.atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    print(f"wrote {out}: {len(q)} query and {len(db)} database codes of {coder.bits} bits "
          f"(model version {rec['model_version']})")
    return 0


# --------------------------------------------------------------------------- main


def _bits(s: str) -> int:
    from hashing.codes import check_bits

    try:
        return check_bits(int(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits {s!r} is not an integer; use 16, 32 or 64")
    except FedhashError as e:
        raise argparse.ArgumentTypeError(str(e))


def _overrides(items: list[str]) -> dict:
    """--set key=value pairs (TOML values: numbers, true/false, "strings"; bare words are strings)."""
    import tomllib

    out = {}
    for item in items or []:
        if "=" not in item:
            raise FedhashError(f"--set {item!r}: write key=value, e.g. --set num-server-rounds=3")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    from .runner import print_summary, simulate
    from .scenario import load_scenario

    scn = load_scenario(args.scenario, overrides=_overrides(args.set))
    run_dir, summary = simulate(scn, runs_dir=args.runs_dir, resume=args.resume, verbose=args.verbose)
    print_summary(run_dir, summary)
    return 0


def cmd_privacy_sweep(args: argparse.Namespace) -> int:
    from .scenario import load_scenario
    from .sweep import format_sweep, parse_epsilons, parse_noises, sweep

    eps = parse_epsilons(args.epsilons)
    noises = parse_noises(args.client_noise)
    scn = load_scenario(args.scenario, overrides=_overrides(args.set))
    run_dir, summary = sweep(scn, eps, noises, client_clip=args.client_clip, nodp_lr=args.nodp_lr,
                             runs_dir=args.runs_dir)
    print()
    print(format_sweep(summary["rows"]))
    print(f"table: {run_dir / 'table.md'}  plot: {run_dir / 'privacy_utility.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhash", description="Federated image hashing with CroVCA.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="centralized CroVCA on cached backbone features (probe mode)")
    t.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist | digits | folder of IDX files | folder of class/*.png | CSV manifest path,labels")
    t.add_argument("--bits", type=_bits, default=64, help="code length, a multiple of 8 (16, 32, 64)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--supervised", action="store_true", help="class-prototype targets from the labels")
    mode.add_argument("--unsupervised", dest="supervised", action="store_false", help="cross-view targets (default)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--variant", choices=("small", "large"), default="small", help="HashCoder size")
    t.add_argument("--size", type=int, default=None, help="backbone input size in pixels (default: see pipeline.DEFAULT_SIZE)")
    t.add_argument("--views", type=int, default=4, help="augmented views cached per training image")
    t.add_argument("--n-train", type=int, default=10000, help="training images drawn from the database split")
    t.add_argument("--n-query", type=int, default=1000, help="query images")
    t.add_argument("--limit", type=int, default=None, help="use only the first N images of the data set")
    t.add_argument("--seed", type=int, default=0, help="seed of the splits, the augmentations and training")
    t.add_argument("--backbone", default=None, help="timm model name (default tf_efficientnet_lite0)")
    t.add_argument("--weights", default=None, help="local weights file for the backbone (a state_dict)")
    t.add_argument("--cache-dir", default=None, help="feature cache folder (default ~/.cache/fedhash/features or $FEDHASH_CACHE)")
    t.add_argument("--runs-dir", default="runs")
    t.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="table of CroVCA vs ITQ, PCA, LSH and float cosine, with PR curves")
    e.add_argument("--run", required=True, help="a run folder written by fedhash train, or a federated run folder "
                                                "(runs/<id>/federated: its mAP and privacy guarantee)")
    e.add_argument("--bits", default="16,32,64", help="comma-separated code lengths")
    e.add_argument("--k", type=int, default=1000, help="mAP@k")
    e.add_argument("--cache-dir", default=None)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export-codes", help="write the run's query/database codes, logits and labels to .npz")
    x.add_argument("--run", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--cache-dir", default=None)
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("simulate", help="run a federated scenario (TOML) on Flower's simulation engine")
    s.add_argument("scenario", help="a scenario .toml, or the name of one in simulations/scenarios/")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a crashed run in RUN_DIR from its last checkpoint")
    s.set_defaults(func=cmd_simulate)

    v = sub.add_parser("privacy-sweep", help="the privacy-utility curve: sample-level DP at each ε, client-level DP, "
                                             "LSH and DP-ITQ beside them; table and plot")
    v.add_argument("--scenario", default="dp-demo", help="a scenario .toml or the name of one (default dp-demo)")
    v.add_argument("--epsilons", default="inf,8,4,1", help="target ε per silo, comma-separated; inf = no DP")
    v.add_argument("--client-noise", default="0.5,1,2", help="client-level DP noise multipliers ('' for none)")
    v.add_argument("--client-clip", type=float, default=0.05, help="client-level DP: update norm bound")
    v.add_argument("--nodp-lr", type=float, default=1e-3, help="learning rate of the ε = inf run (the demo's)")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    v.add_argument("--runs-dir", default="runs")
    v.set_defaults(func=cmd_privacy_sweep)

    d = sub.add_parser("demo", help="the default scenario: 5 simulated hospitals (Dirichlet 0.3, Fashion-MNIST, 64 bits)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    d.add_argument("--runs-dir", default="runs")
    d.set_defaults(func=cmd_simulate, scenario="demo", resume=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines say which SIMD build it found
    if getattr(args, "backbone", None) is None and args.command == "train":
        from hashing.backbones import DEFAULT_BACKBONE

        args.backbone = DEFAULT_BACKBONE
    if getattr(args, "size", None) is None and args.command == "train":
        from hashing.pipeline import DEFAULT_SIZE

        args.size = DEFAULT_SIZE
    try:
        return args.func(args)
    except FedhashError as e:
        print(f"fedhash: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedhash: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
