"""Centralized CroVCA on one machine: ``fedhash train``, ``fedhash eval`` and ``fedhash export-codes``.

A run folder (``runs/<id>/``) holds ``config.json`` (the run's :class:`hashing.config.Config` and
provenance), ``model.pt`` (:mod:`hashing.model`'s one format), ``splits.npz``, ``metrics.json``,
``index.faiss`` and the plots; ``eval`` adds its table and figures, and the CroVCA variants it needed
beside the run's own model in ``companions/``.

**Verified on read** (:func:`check_run`, before ``eval`` or ``export-codes`` does any work): ``model.pt`` by
its model version and digest (:func:`hashing.model.read_record`); ``config.json`` by its own ``digest``
(sha256 of a canonical JSON of its other fields) and against ``model.pt`` (model version, backbone
weights, the whole config, which the model record's digest covers); ``splits.npz`` by the sha256 that
``config.json`` records; ``index.faiss`` by its sidecar (:meth:`hashing.index.SiloIndex.load`: bytes and
fields), its model version against ``model.pt``'s and its ids against the database split. A mismatch is an
:class:`~hashing.errors.IntegrityError` naming the file and the fix. A run folder written before these
checksums (no digest in ``config.json``) is still read: what it lacks goes unchecked, the rest is checked.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hashing import atomic, plots
from hashing.codes import logits_to_codes, unpack
from hashing.config import Config
from hashing.errors import FedhashError, IntegrityError
from hashing.hashers import Hasher
from hashing.model import identity, load_model, read_record, save_model
from hashing.pipeline import Prepared, prepare
from hashing.train import History, fit

from .runs import new_run_dir, read_run, run_config, slug

if TYPE_CHECKING:
    from hashing.index import SiloIndex


def _library_versions() -> dict:
    import faiss
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "faiss": faiss.__version__, "numpy": np.__version__}


def train_model(cfg: Config, prep: Prepared, *, progress: bool = True) -> tuple[Hasher, History]:
    """A fresh probe head trained on the prepared features (seeded by ``cfg.seed``)."""
    return fit(prep.train_views, prep.labels(prep.splits.train) if cfg.supervised else None, cfg, progress=progress)


def train_run(cfg: Config, runs_dir: str | Path) -> Path:
    """``fedhash train``: features, training, evaluation, the run folder; prints the summary."""
    from hashing.index import SiloIndex
    from hashing.metrics import retrieval_metrics

    t0 = time.perf_counter()
    prep = prepare(cfg)
    _report_skipped(prep.ds)
    t_feat = time.perf_counter()
    hasher, hist = train_model(cfg, prep)
    t_train = time.perf_counter()

    q, db = prep.splits.query, prep.splits.database
    q_logits, db_logits = hasher.encode(prep.inputs, q), hasher.encode(prep.inputs, db)
    db_codes = logits_to_codes(db_logits)
    sym = retrieval_metrics(q_logits, db_codes, prep.labels(q), prep.labels(db), asymmetric=False, pr=False)
    asym = retrieval_metrics(q_logits, db_codes, prep.labels(q), prep.labels(db), asymmetric=True, pr=False)
    balance = unpack(db_codes).mean(0)

    run = new_run_dir(runs_dir, f"{slug(cfg.data)}-{cfg.bits}b-{'sup' if cfg.supervised else 'unsup'}")
    ident = identity(hasher, backbone=cfg.backbone, weights_id=prep.weights_id, size=cfg.size)
    version = save_model(run / "model.pt", hasher, ident, extra={"config": cfg.to_dict()})
    with atomic.atomic_path(run / "splits.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **prep.splits.to_dict())
    atomic.write_json(run / "config.json", atomic.sealed({
        "config": cfg.to_dict(), "model_version": version, "weights_id": prep.weights_id,
        "feature_dim": prep.feature_dim, "n_images": len(prep.ds), "n_skipped": len(prep.ds.skipped),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": _library_versions(),
        "command": sys.argv, "splits_sha256": atomic.sha256_file(run / "splits.npz"),
    }))
    seconds = {**prep.seconds, "train": t_train - t_feat, "total": time.perf_counter() - t0}
    atomic.write_json(run / "metrics.json", {
        "model_version": version, "symmetric": sym, "asymmetric": asym, "epochs": hist.epoch,
        "step_loss": hist.step_loss, "bit_balance": balance.tolist(), "seconds": seconds,
        "skipped_images": [list(s) for s in prep.ds.skipped],
    })
    index = SiloIndex(cfg.bits, version, backbone=cfg.backbone)
    index.add(db_codes, db)
    index.save(run / "index.faiss")
    plots.plot_loss(hist.step_loss, len(hist.step_loss) // max(cfg.epochs, 1), run / "loss.png")
    plots.plot_bit_balance(balance, run / "bit_balance.png")

    mode = "supervised" if cfg.supervised else "unsupervised"
    print(f"CroVCA {mode}, {cfg.bits} bits, {cfg.backbone} @ {cfg.size}px, {len(prep.splits.train)} train images")
    print(f"  mAP@1000 {sym['mAP@1000']:.4f} (Hamming)  {asym['mAP@1000']:.4f} (asymmetric)   "
          f"P@100 {sym['P@100']:.4f}   bits balanced {balance.min():.2f}..{balance.max():.2f}")
    print(f"  time: features {seconds['features']:.1f}s, training {seconds['train']:.1f}s, total {seconds['total']:.1f}s")
    print(f"  model version {version}; database index: {run / 'index.faiss'} ({len(index)} codes)")
    print(f"run folder: {run}")
    return run


def _report_skipped(ds) -> None:
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable image(s); listed in metrics.json:", file=sys.stderr)
        for p, why in ds.skipped[:10]:
            print(f"  {p}: {why}", file=sys.stderr)


# --------------------------------------------------------------------------- an existing run folder


RETRAIN = "restore the file or retrain with fedhash train"


def check_run(run: Path, rc: dict) -> SiloIndex:
    """Verify a run folder's files against each other before any work (see the module docstring); return its
    verified index. ``rc``: its config.json as read."""
    from hashing.index import SiloIndex

    cj = run / "config.json"
    if "digest" in rc and atomic.json_digest(rc) != rc["digest"]:
        raise IntegrityError(f"{cj}: its digest does not match its fields; the file was changed or damaged: {RETRAIN}")
    rec = read_record(run / "model.pt")
    extra = rec.get("extra") or {}
    pairs = [("model_version", rc.get("model_version"), rec["model_version"]),
             ("weights_id", rc.get("weights_id"), rec["identity"].get("weights_id"))]
    if isinstance(extra.get("config"), dict):
        pairs.append(("config", rc.get("config"), extra["config"]))
    for key, here, there in pairs:
        if here == there:
            continue
        if key != "config":
            shown = f"{key} {here!r} does not match model.pt's {there!r}"
        elif not isinstance(here, dict):
            shown = "config section is missing"
        else:
            diff = [f"{k} = {here.get(k)!r}, model.pt's {there.get(k)!r}" for k in sorted(set(here) | set(there))
                    if here.get(k) != there.get(k)]
            shown = f"config differs from the one model.pt was trained with ({'; '.join(diff[:3])})"
        raise IntegrityError(f"{cj}: its {shown}; config.json was edited or damaged: {RETRAIN}")
    splits = run / "splits.npz"
    if "splits_sha256" in rc and (not splits.is_file() or atomic.sha256_file(splits) != rc["splits_sha256"]):
        raise IntegrityError(f"{splits}: {'it is missing' if not splits.is_file() else 'its sha256 does not match'} "
                             f"the one config.json records; the file was changed or damaged: {RETRAIN}")
    path = run / "index.faiss"
    if not path.is_file():
        raise IntegrityError(f"{path} is missing; the run did not finish writing its folder: {RETRAIN}")
    return SiloIndex.load(path, model_version=rec["model_version"])


def open_run(run: str | Path, cache_dir: str | None = None) -> tuple[Path, Config, Prepared]:
    """An existing run folder, its files verified (:func:`check_run`), with its data prepared as at training
    time: (run, config, prepared data)."""
    run = Path(run)
    rc = read_run(run)
    index = check_run(run, rc)
    cfg = run_config(run, rc)
    if cache_dir:
        cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    prep = prepare(cfg, say_clamps=False)  # fedhash train said them when it made the run
    _check_splits(run, prep)
    if not np.array_equal(index.ids(), np.sort(np.asarray(prep.splits.database, dtype=np.int64))):
        raise IntegrityError(f"{run / 'index.faiss'} holds other ids than the run's database split; "
                             f"the file was replaced: {RETRAIN}")
    return run, cfg, prep


def _check_splits(run: Path, prep: Prepared) -> None:
    """The run's recorded splits must be the ones the data gives now (same data, same seed)."""
    f = run / "splits.npz"
    if not f.exists():
        return
    try:
        z = np.load(f)
    except Exception as e:
        raise IntegrityError(f"{f} is unreadable ({type(e).__name__}: {e}); {RETRAIN}") from e
    with z:
        for name in ("train", "query", "database"):
            if not np.array_equal(z[name], getattr(prep.splits, name)):
                raise FedhashError(
                    f"the data behind {run} changed since training ({name} split differs); retrain with fedhash train"
                )


def load_run_model(path: Path, prep: Prepared) -> tuple[Hasher, dict]:
    """A model of the run, refused if it was trained on other backbone weights or input size than ``prep``'s."""
    hasher, rec = load_model(path)
    ident = rec["identity"]
    if ident["weights_id"] != prep.weights_id or ident["size"] != prep.cfg.size:
        raise FedhashError(f"{path} was trained on other backbone weights or input size; retrain it")
    return hasher, rec


def _load_or_train(run: Path, cfg: Config, prep: Prepared, supervised: bool, bits: int) -> tuple[Hasher, str, str]:
    """The run's own model when (mode, bits) match, else a companion trained once on the same features and kept."""
    if cfg.supervised == supervised and cfg.bits == bits:
        hasher, rec = load_run_model(run / "model.pt", prep)
        return hasher, rec["model_version"], "run model"
    path = run / "companions" / f"{'sup' if supervised else 'unsup'}-{bits}.pt"
    if path.exists():
        hasher, rec = load_run_model(path, prep)
        return hasher, rec["model_version"], "companion (cached)"
    c = dataclasses.replace(cfg, supervised=supervised, bits=bits)
    hasher, _ = train_model(c, prep)
    ident = identity(hasher, backbone=c.backbone, weights_id=prep.weights_id, size=c.size)
    version = save_model(path, hasher, ident, extra={"config": c.to_dict()})
    return hasher, version, "companion (trained now)"


def eval_run(run_dir: str | Path, bits_list: list[int], k: int = 1000, cache_dir: str | None = None) -> int:
    """``fedhash eval``: CroVCA (both modes) against ITQ, PCA, LSH and float cosine at each code length."""
    from hashing.baselines import fit_baseline
    from hashing.metrics import float_retrieval_metrics, retrieval_metrics

    run, cfg, prep = open_run(run_dir, cache_dir)
    q, db = prep.splits.query, prep.splits.database
    ql, dl = prep.labels(q), prep.labels(db)
    qf, dbf = np.asarray(prep.clean[q], dtype=np.float32), np.asarray(prep.clean[db], dtype=np.float32)
    train_clean = np.asarray(prep.clean[prep.splits.train], dtype=np.float32)
    rows, curves = [], {b: {} for b in bits_list}

    def add(method, bits, res, asym=None, note=""):
        row = {"method": method, "bits": bits, f"mAP@{k}": res[f"mAP@{k}"], "P@100": res["P@100"],
               "P@r2": res.get("P@r2"), f"mAP@{k} asym": asym[f"mAP@{k}"] if asym else None, "note": note}
        rows.append(row)
        print(_fmt_row(row, k), flush=True)

    print(_fmt_header(k))
    for bits in bits_list:
        for sup in (False, True):
            hasher, version, note = _load_or_train(run, cfg, prep, sup, bits)
            q_logits, db_codes = hasher.encode_features(qf), logits_to_codes(hasher.encode_features(dbf))
            res = retrieval_metrics(q_logits, db_codes, ql, dl, asymmetric=False, k=k)
            asym = retrieval_metrics(q_logits, db_codes, ql, dl, asymmetric=True, k=k, pr=False)
            name = f"CroVCA {'sup' if sup else 'unsup'}"
            add(name, bits, res, asym, f"{note}, version {version}")
            curves[bits][name] = res["pr"]
        for base in ("itq", "pca", "lsh"):
            b = fit_baseline(base, train_clean, bits, seed=cfg.seed)
            res = retrieval_metrics(b.encode(qf), b.encode(dbf), ql, dl, asymmetric=False, k=k)
            add(base.upper(), bits, res)
            curves[bits][base.upper()] = res["pr"]
    fl = float_retrieval_metrics(qf, dbf, ql, dl, k=k)
    add("float cosine", 0, fl, note=f"{prep.feature_dim}-d float features")

    out = {"run": str(run), "k": k, "n_queries": int(len(q)), "n_db": int(len(db)), "rows": rows,
           "backbone": cfg.backbone, "size": cfg.size, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic.write_json(run / "eval.json", out)
    atomic.write_text(run / "eval.md", _markdown(rows, k, run))
    for bits in bits_list:
        curves[bits]["float cosine"] = fl["pr"]
        plots.plot_pr_curves(curves[bits], run / f"pr_{bits}bits.png", title=f"precision-recall, {bits} bits")
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


# --------------------------------------------------------------------------- a federated run folder


def format_privacy(priv: dict) -> str:
    """One paragraph: the guarantee a federated model was trained under."""
    unit = priv.get("unit", "none")
    if unit == "none":
        return "privacy: none (no differential privacy)"
    lines = [f"privacy: {unit}; {priv.get('mechanism', '')}",
             f"  ε = {priv.get('epsilon', float('nan')):.3f} at δ = {priv.get('delta'):g} ({priv.get('accountant')}), "
             f"after {priv.get('rounds')} rounds"
             + (f"; RDP's ε {priv['epsilon_rdp']:.3f}" if "epsilon_rdp" in priv else "")]
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


def eval_federated(run: Path) -> int:
    """A federated run folder (fedhash simulate's federated/, or a ServerApp's out-dir): its final
    per-silo mAP and the privacy guarantee its model was trained under."""
    try:
        st = json.loads((run / "federation.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FedhashError(f"{run / 'federation.json'} is unreadable ({e}); the run did not finish writing it") from e
    if st.get("status") == "done" and (run / "model.pt").is_file():  # the model the report is about, verified
        rec = read_record(run / "model.pt")
        if rec["model_version"] != st.get("model_version"):
            raise IntegrityError(f"{run / 'federation.json'}: its model_version {st.get('model_version')!r} does not "
                                 f"match model.pt's {rec['model_version']!r}; a file was edited or replaced: restore "
                                 "it or rerun the federation")
    last = st["rounds"][-1] if st.get("rounds") else {}
    print(f"federated run {run}: status {st.get('status')}, model {st.get('model_version')}, "
          f"{len(st.get('rounds', []))} rounds")
    for name, m in sorted(last.get("map", {}).items()):
        print(f"  {name}: mAP@1000 {m:.4f}")
    if "mean_map" in last:
        print(f"  mean mAP@1000 {last['mean_map']:.4f}, bit balance {last.get('bit_balance', float('nan')):.3f}")
    print(format_privacy(st.get("privacy", {"unit": "none"})))
    return 0


def export_codes(run_dir: str | Path, out: str | Path, cache_dir: str | None = None) -> int:
    """``fedhash export-codes``: the run's query and database codes, query logits and labels."""
    run, _, prep = open_run(run_dir, cache_dir)
    hasher, rec = load_run_model(run / "model.pt", prep)
    q, db = prep.splits.query, prep.splits.database
    q_logits = hasher.encode(prep.inputs, q)
    arrays = {
        "query_codes": logits_to_codes(q_logits),
        "db_codes": logits_to_codes(hasher.encode(prep.inputs, db)),
        "query_logits": q_logits.astype(np.float32),
        "query_labels": prep.labels(q).astype(np.int64),
        "db_labels": prep.labels(db).astype(np.int64),
        "bits": np.int64(hasher.bits),
    }
    out = Path(out)
    with atomic.atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    print(f"wrote {out}: {len(q)} query and {len(db)} database codes of {hasher.bits} bits "
          f"(model version {rec['model_version']})")
    return 0
