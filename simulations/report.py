"""The run folder of a federated simulation: tables, per-round CSV/JSON, plots and ``report.md``.

The runner builds one plain, JSON-able ``summary`` dict and calls ``write_report(run_dir, summary)``:

    summary = {
        "run_id": ..., "scenario": {...}, "bits": 64, "mode": "probe", "supervised": True, "strategy": "fedavg",
        "silos":  [{"id": 0, "name": "silo-0", "n_train": .., "n_query": .., "n_db": .., "label_hist": [..], "domain": ..}],
        "rounds": [{"round": 1, "train_loss": .., "bit_balance": .., "seconds": .., "bytes_down": .., "bytes_up": ..,
                    "clients_ok": .., "clients_failed": .., "map": {"silo-0": ..}, "mean_map": ..}, ...],
        "final":  {"federated": {"per_silo": {"silo-0": ..}, "mean": .., "bit_balance": .., "seconds": ..},
                   "local-only": {...}, "centralized": {...}, "itq": {...}, ...any other method...},
        "cross_silo": {"federated": {"per_silo": {"silo-0": ..}, "mean": .., "answered": .., "failed": [..]},
                       "centralized": {...}, "best single silo": {..., "model_of": "silo-3"}, "itq": {...}, ...},
        "references_note": "...", "timings": {"features": .., "total": ..},
        "artifacts": {"checkpoints": "checkpoints/", "indexes": [...]}, "partition_plot": "partition.png",
    }

Every key but ``final`` is optional (and ``final`` may be empty). Every file is written atomically.
``format_table`` is the plain-text table the CLI prints; ``table.md`` holds the same tables in Markdown
(own-silo, then cross-silo: each silo's queries against the union of every silo's database).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hashing import atomic, plots
from hashing.errors import FedhashError

log = logging.getLogger("fedhash")

K = 1000  # mAP@K of the final table
WIDE = 10  # above this many silos the tables show statistics over silos, not a column per silo (all in the CSV)
SPREAD = ("mean", "median", "worst decile", "worst", "best")
ROUND_COLUMNS = ("round", "mean_map", "train_loss", "bit_balance", "seconds", "bytes_down", "bytes_up",
                 "clients_ok", "clients_failed")
REFERENCE_ORDER = ("local-only", "centralized", "itq")
REFERENCE_NOTES = {
    "federated": "the hash function learnt by the federation: silos share model updates only, never images; "
                 "each silo encodes and searches its own query/database split with the global model.",
    "local-only": "each silo trains alone on its own data and is scored on its own query/database split "
                  "(what a silo gets without the federation).",
    "centralized": "all silos' training data pooled in one place and trained on together (the upper bound a "
                   "federation aims at), scored per silo on the same query/database splits.",
    "itq": "ITQ (iterative quantization, PCA + rotation) fitted on the same backbone features, scored per silo "
           "(a classical unsupervised baseline: no network is trained).",
}
PLOT_TITLES = {
    "map_rounds": "mean mAP by round",
    "map_silos": "mAP per silo and method",
    "bit_balance": "bit balance by round",
    "loss": "training loss by round",
    "comm": "communication per round",
    "partition": "data partition across silos",
}


# --------------------------------------------------------------------------- small helpers


def _num(v: Any) -> float | None:
    """A finite float, or None for anything missing, non-numeric or NaN/inf."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _f4(v: Any, missing: str = "-") -> str:
    f = _num(v)
    return missing if f is None else f"{f:.4f}"


def _secs(v: Any, missing: str = "-") -> str:
    f = _num(v)
    return missing if f is None else f"{f:.1f}"


def _bytes(v: Any) -> str:
    f = _num(v)
    if f is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(f) < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return "-"


def _cell(v: Any) -> str:
    """A value as one Markdown table cell (dicts/lists as compact JSON, pipes escaped)."""
    if isinstance(v, (dict, list, tuple)):
        s = json.dumps(v, default=str, separators=(", ", ": "))
    elif isinstance(v, float):
        s = f"{v:g}"
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def silo_name(silo: Mapping[str, Any] | str | int) -> str:
    """The name a silo goes by in ``map``/``per_silo`` dicts: its ``name``, else ``silo-<id>``."""
    if isinstance(silo, Mapping):
        if silo.get("name") is not None:
            return str(silo["name"])
        if silo.get("id") is not None:
            return f"silo-{silo['id']}"
        return "silo"
    return str(silo)


def _silo_names(silos: Sequence[Any] | None, final: Mapping | None = None, rounds: Sequence | None = None) -> list[str]:
    """Silo names in the order of ``silos``, then any others the results name, in first-seen order."""
    names = [silo_name(s) for s in silos or ()]
    for row in (final or {}).values():
        if isinstance(row, Mapping):
            names += [str(n) for n in (row.get("per_silo") or {})]
    for r in rounds or ():
        if isinstance(r, Mapping):
            names += [str(n) for n in (r.get("map") or {})]
    return list(dict.fromkeys(names))


def method_order(final: Mapping[str, Any]) -> list[str]:
    """Federated rows first, then local-only, centralized, itq, then any other method (alphabetically).

    A fixed order, because summary.json is written with sorted keys and the table must read the same after
    ``load_summary``.
    """
    keys = [str(m) for m in final]
    fed = sorted((m for m in keys if m.startswith("federated")), key=lambda m: (m != "federated", m))
    refs = [m for m in REFERENCE_ORDER if m in keys]
    rest = sorted(m for m in keys if m not in fed and m not in refs)
    return fed + refs + rest


def _row(final: Mapping[str, Any], method: str) -> Mapping[str, Any]:
    row = final.get(method)
    return row if isinstance(row, Mapping) else {}


def method_mean(row: Mapping[str, Any]) -> float | None:
    """The row's ``mean``, else the mean of its finite per-silo values, else None."""
    m = _num(row.get("mean"))
    if m is not None:
        return m
    vals = [v for v in (_num(x) for x in (row.get("per_silo") or {}).values()) if v is not None]
    return float(np.mean(vals)) if vals else None


def ratios(final: Mapping[str, Any], reference: str = "centralized") -> list[tuple[str, str, float]]:
    """(federated row, its reference row, mean / reference mean) for every federated row.

    A row "federated (unsupervised)" is compared with "centralized (unsupervised)" when that
    row exists (the same CroVCA mode), else with plain ``reference``; rows whose reference is
    missing or has no positive mean are left out.
    """
    out = []
    for m in method_order(final):
        if not m.startswith("federated"):
            continue
        suffix = m[len("federated"):]
        ref_name = reference + suffix if (reference + suffix) in final else reference
        if ref_name not in final:
            continue
        ref = method_mean(_row(final, ref_name))
        v = method_mean(_row(final, m))
        if ref is not None and ref > 0 and v is not None:
            out.append((m, ref_name, v / ref))
    return out


def ratio_lines(final: Mapping[str, Any], reference: str = "centralized") -> list[str]:
    """["federated / centralized = 0.97x", "federated (unsupervised) / centralized (unsupervised) = 0.92x", ...]."""
    return [f"{m} / {ref} = {r:.2f}x" for m, ref, r in ratios(final, reference)]


# --------------------------------------------------------------------------- the final table


def spread(row: Mapping[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    """A row's statistics over its silos: the row's mean (:func:`method_mean`), the median, the worst decile
    (the mean of the worst tenth of the silos, at least one), the worst and the best silo; None without values."""
    per = row.get("per_silo") or {}
    vals = np.sort([v for v in (_num(per.get(n)) for n in names) if v is not None])
    if not vals.size:
        return dict.fromkeys(SPREAD) | {"mean": method_mean(row)}
    tenth = max(1, math.ceil(vals.size / 10))
    return {"mean": method_mean(row), "median": float(np.median(vals)), "worst decile": float(vals[:tenth].mean()),
            "worst": float(vals[0]), "best": float(vals[-1])}


def spread_sentence(n: int, csv_name: str = "final.csv") -> str:
    return (f"{n} silos: statistics over them (worst decile: the mean of the worst tenth); "
            f"every silo's figure: {csv_name}")


def format_table(final: Mapping[str, Any], silos: Sequence[Any] | None = None, *, markdown: bool = False,
                 with_ratios: bool = True, per_silo: bool | None = None, csv_name: str = "final.csv") -> str:
    """The final table: one row per method, a column per silo, the mean, and bit balance/seconds when present.

    mAP@1000 to 4 decimals; ``-`` where a method has no value. ``silos`` is the summary's silo list (dicts) or a
    list of names; silos that only the results name are appended. With more than :data:`WIDE` silos (or
    ``per_silo=False``) the silo columns give way to statistics over the silos (:func:`spread`), so that the
    table fits a terminal at any scale; :func:`final_csv` keeps every silo's figure. Below the table, unless
    ``with_ratios`` is false, one line "federated / centralized = 0.97x" per federated row. ``markdown=True``
    gives the Markdown form written to table.md; otherwise an aligned plain-text table for a terminal.
    """
    final = final or {}
    methods = method_order(final)
    names = _silo_names(silos, final)
    wide = len(names) > WIDE if per_silo is None else not per_silo
    has_bb = any(_num(_row(final, m).get("bit_balance")) is not None for m in methods)
    has_s = any(_num(_row(final, m).get("seconds")) is not None for m in methods)
    header = (["method", "silos", *SPREAD] if wide else ["method", *names, "mean"]) + \
        (["bit balance"] if has_bb else []) + (["seconds"] if has_s else [])
    rows = []
    for m in methods:
        r = _row(final, m)
        per = r.get("per_silo") or {}
        if wide:
            st = spread(r, names)
            cells = [m, str(sum(_num(per.get(n)) is not None for n in names)), *(_f4(st[k]) for k in SPREAD)]
        else:
            cells = [m, *(_f4(per.get(n)) for n in names), _f4(method_mean(r))]
        if has_bb:
            cells.append(_f4(r.get("bit_balance")))
        if has_s:
            cells.append(_secs(r.get("seconds")))
        rows.append(cells)
    rl = ratio_lines(final) if with_ratios else []
    said = [spread_sentence(len(names), csv_name)] if wide and rows else []
    if markdown:
        text = _md_table(header, [[_cell(c) for c in r] for r in rows]) if rows else "_no final results_"
        if said or rl:
            text += "\n\n" + "\n".join(f"- {line}" for line in said + rl)
        return text + "\n"
    if not rows:
        return "no final results\n"
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [fmt(header), "-" * len(fmt(header)), *(fmt(r) for r in rows)]
    if said or rl:
        lines += ["", *said, *rl]
    return "\n".join(lines) + "\n"


def final_csv(final: Mapping[str, Any], silos: Sequence[Any] | None = None) -> str:
    """Every method's figure for every silo, whatever the number of silos: a row per method, a column per
    silo, then mean, bit balance and seconds (``final.csv`` and ``cross_silo.csv`` of a run folder)."""
    final = final or {}
    names = _silo_names(silos, final)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *names, "mean", "bit_balance", "seconds"])
    for m in method_order(final):
        r = _row(final, m)
        per = r.get("per_silo") or {}
        vals = [_num(per.get(n)) for n in names] + [method_mean(r), _num(r.get("bit_balance")), _num(r.get("seconds"))]
        w.writerow([m, *("" if v is None else repr(v) for v in vals)])
    return buf.getvalue()


OWN_SILO_SENTENCE = "Each silo is scored on its own query and database split; the mean is over silos."
CROSS_SILO_SENTENCE = (
    "Each silo's queries are searched against the union of every silo's database (what a shared hash function "
    "is for: one hospital asking all the others by code); the federated rows are answered through the "
    "fan-out to the silos' own indexes, the references by the same ranking over their pooled codes; a column "
    "is the querying silo, the mean is over querying silos.")


def cross_silo_notes(cross: Mapping[str, Any]) -> list[str]:
    """The lines under the cross-silo table: ratios to the best single silo, which silo that is, who answered."""
    out = []
    for m in method_order(cross):
        if not m.startswith("federated"):
            continue
        suffix = m[len("federated"):]
        best = _row(cross, "best single silo" + suffix)
        v, b = method_mean(_row(cross, m)), method_mean(best)
        if v is not None and b:
            out.append(f"- {m} / best single silo{suffix} ({best.get('model_of', '?')}'s local model used by every "
                       f"silo) = {v / b:.2f}x")
        failed = _row(cross, m).get("failed") or []
        if failed:
            who = sorted({f.get("silo") or f"node {f.get('node')}" for f in failed})
            out.append(f"- {m}: {len(failed)} fan-out replies missing ({', '.join(who)}); those silos' databases "
                       "are absent from these figures")
    return out


def tables_md(summary: Mapping[str, Any], run_id: str) -> str:
    """table.md: the own-silo table and, when the run has one, the cross-silo table."""
    final, silos = summary.get("final") or {}, summary.get("silos") or []
    text = f"# mAP@{K} per silo: {summary.get('run_id') or run_id}\n\n{OWN_SILO_SENTENCE}\n\n" + \
        format_table(final, silos, markdown=True)
    cross = summary.get("cross_silo") or {}
    if cross:
        text += (f"\n# mAP@{K} across silos (each silo's queries against every silo's database)\n\n"
                 f"{CROSS_SILO_SENTENCE}\n\n" + format_table(cross, silos, markdown=True, csv_name="cross_silo.csv"))
        notes = cross_silo_notes(cross)
        text += ("\n" + "\n".join(notes) + "\n") if notes else ""
    return text


# --------------------------------------------------------------------------- per-round data


def rounds_csv(rounds: Sequence[Mapping[str, Any]], silos: Sequence[Any] | None = None) -> str:
    """One row per round: the standard columns, any other scalar keys, then ``map_<silo>`` per silo."""
    rounds = [r for r in rounds or () if isinstance(r, Mapping)]
    names = _silo_names(silos, rounds=rounds)
    extra = [k for r in rounds for k, v in r.items()
             if k not in ROUND_COLUMNS and k != "map" and not isinstance(v, (dict, list, tuple))]
    cols = list(ROUND_COLUMNS) + list(dict.fromkeys(extra)) + [f"map_{n}" for n in names]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rounds:
        per = r.get("map") or {}
        row = {**r, **{f"map_{n}": per.get(n) for n in names}}
        w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return buf.getvalue()


def _round_no(r: Mapping[str, Any], i: int) -> float:
    n = _num(r.get("round"))
    return float(i + 1) if n is None else n


def _series(rounds: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(round numbers, values) for rounds that hold a finite ``key``."""
    xs, ys = [], []
    for i, r in enumerate(rounds):
        v = _num(r.get(key))
        if v is not None:
            xs.append(_round_no(r, i))
            ys.append(v)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _mean_map_series(rounds: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean mAP per round: ``mean_map``, else the mean of the round's per-silo mAPs."""
    xs, ys = [], []
    for i, r in enumerate(rounds):
        v = _num(r.get("mean_map"))
        if v is None:
            v = method_mean({"per_silo": r.get("map") or {}})
        if v is not None:
            xs.append(_round_no(r, i))
            ys.append(v)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


# --------------------------------------------------------------------------- plots (hashing.plots draws them)


def _plot_map_rounds(rounds: Sequence[Mapping[str, Any]], final: Mapping[str, Any], silos: Sequence[Any] | None,
                     path: Path) -> bool:
    """Mean mAP per round, each silo's mAP, and the references' final means."""
    names = _silo_names(silos, rounds=rounds)
    per = {n: _series([{"round": r.get("round"), "v": (r.get("map") or {}).get(n)} for r in rounds], "v")
           for n in names}
    refs = {m: v for m in REFERENCE_ORDER if m in (final or {}) and (v := method_mean(_row(final, m))) is not None}
    return plots.plot_map_rounds(_mean_map_series(rounds), per, refs, path)


def _plot_map_silos(final: Mapping[str, Any], silos: Sequence[Any] | None, path: Path) -> bool:
    """Grouped bars: silos on x, one bar per method; a last group for the mean."""
    methods = [m for m in method_order(final or {}) if _row(final, m)]
    names = _silo_names(silos, final)
    if not methods or not names:
        return False
    if len(names) > WIDE:  # bars for a hundred silos are unreadable: each method's distribution over the silos
        per = {m: [v for n in names if (v := _num((_row(final, m).get("per_silo") or {}).get(n))) is not None]
               for m in methods}
        return plots.plot_map_distribution({m: v for m, v in per.items() if v}, path)
    values = {m: [_num((_row(final, m).get("per_silo") or {}).get(n)) for n in names] + [method_mean(_row(final, m))]
              for m in methods}
    return plots.plot_map_silos(names + ["mean"], values, path)


# --------------------------------------------------------------------------- report.md


def _label_summary(hist: Any) -> str:
    counts = [c for c in (_num(x) for x in hist or ()) if c is not None] if isinstance(hist, (list, tuple)) else []
    total = sum(counts)
    if not counts or total <= 0:
        return "-"
    order = sorted(range(len(counts)), key=lambda i: -counts[i])[:3]
    top = ", ".join(f"c{i} {100 * counts[i] / total:.0f}%" for i in order if counts[i] > 0)
    present = sum(c > 0 for c in counts)
    return f"{present}/{len(counts)} classes; top: {top}"


def _silos_section(silos: Sequence[Any]) -> list[str]:
    rows = []
    for s in silos:
        s = s if isinstance(s, Mapping) else {"name": s}
        n = lambda k: "-" if _num(s.get(k)) is None else f"{int(_num(s.get(k)))}"  # noqa: E731
        rows.append([_cell(silo_name(s)), n("n_train"), n("n_query"), n("n_db"), _cell(s.get("domain", "-")),
                     _label_summary(s.get("label_hist"))])
    return [_md_table(["silo", "train", "query", "database", "domain", "labels"], rows)]


def _sampled(r: Mapping[str, Any], part: str, whole: str) -> bool:
    a, b = _num(r.get(part)), _num(r.get(whole))
    return a is not None and b is not None and a < b


def _rounds_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rounds' table; where silos were sampled (fraction-train, fraction-evaluate), how many of how many."""
    rows = []
    evaluated = any(_sampled(r, "evaluated", "evaluated_of") for r in rounds)
    for i, r in enumerate(rounds):
        mm = _mean_map_series([r])[1]
        ok, failed = r.get("clients_ok"), r.get("clients_failed")
        clients = "-" if ok is None and failed is None else f"{ok if ok is not None else '-'} ok" + (
            f", {failed} failed" if failed else "")
        if _sampled(r, "clients_sent", "clients_connected"):
            clients = f"{r['clients_sent']} of {r['clients_connected']} sampled: {clients}"
        row = [_cell(r.get("round", i + 1)), _f4(mm[0] if len(mm) else None)]
        if evaluated:
            row.append(f"{r['evaluated']} of {r['evaluated_of']}" if r.get("evaluated_of") else "-")
        rows.append(row + [_f4(r.get("train_loss")), _f4(r.get("bit_balance")), _secs(r.get("seconds")),
                           f"{_bytes(r.get('bytes_down'))} / {_bytes(r.get('bytes_up'))}", clients])
    header = ["round", "mean mAP"] + (["silos scored"] if evaluated else []) + \
        ["train loss", "bit balance", "seconds", "bytes down / up", "clients"]
    out = [_md_table(header, rows)]
    if evaluated:
        out += ["", "The mean mAP of a round is over the silos that scored it (a seeded sample, `fraction-evaluate`); "
                "the final table scores every silo."]
    return out


def _artifact_lines(artifacts: Mapping[str, Any]) -> list[str]:
    lines = []
    for k, v in artifacts.items():
        if isinstance(v, (list, tuple)):
            lines.append(f"- {k}: " + (", ".join(f"`{x}`" for x in v) if v else "none"))
        elif isinstance(v, Mapping):
            lines.append(f"- {k}: " + ", ".join(f"{a} `{b}`" for a, b in v.items()))
        else:
            lines.append(f"- {k}: `{v}`")
    return lines


def _ray_fact(ray: Any) -> str | None:
    """Where the simulated silos ran: Ray started by the run, or the cluster it attached to (ray-address)."""
    if not isinstance(ray, Mapping) or not ray.get("nodes"):
        return None
    where = f"the Ray cluster at {ray['address']}" if ray.get("address") else "Ray started by the run"
    return f"simulated silos on {where} ({ray['nodes']} node{'s' if ray['nodes'] != 1 else ''}, {ray.get('cpus')} CPUs)"


def render_report(summary: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """report.md's text. ``plots`` maps a plot key (map_rounds, map_silos, ...) to its file name in the run folder."""
    plots = plots or {}
    final = summary.get("final") or {}
    silos = summary.get("silos") or []
    rounds = [r for r in summary.get("rounds") or () if isinstance(r, Mapping)]
    run_id = summary.get("run_id") or "federated run"
    out = [f"# fedhash federated run {run_id}", ""]
    facts = [f"{summary['bits']} bits" if summary.get("bits") is not None else None,
             f"mode {summary['mode']}" if summary.get("mode") else None,
             ("supervised" if summary["supervised"] else "unsupervised") if "supervised" in summary else None,
             f"strategy {summary['strategy']}" if summary.get("strategy") else None,
             f"{len(silos)} silos" if silos else None,
             f"{len(rounds)} rounds" if rounds else None,
             _ray_fact(summary.get("ray"))]
    facts = [f for f in facts if f]
    if facts:
        out += [", ".join(facts) + ".", ""]

    scenario = summary.get("scenario")
    if isinstance(scenario, Mapping) and scenario:
        out += ["## Scenario", "", _md_table(["key", "value"], [[_cell(k), _cell(v)] for k, v in scenario.items()]), ""]

    if silos:
        out += ["## Silos", "", *_silos_section(silos), ""]
        if "partition" in plots:
            out += [f"![{PLOT_TITLES['partition']}]({plots['partition']})", ""]

    out += [f"## Results: mAP@{K} per silo", "",
            OWN_SILO_SENTENCE, "",
            format_table(final, silos, markdown=True).rstrip(), ""]
    cross = summary.get("cross_silo") or {}
    if cross:
        out += [f"## Results across silos: mAP@{K} per querying silo", "", CROSS_SILO_SENTENCE, "",
                format_table(cross, silos, markdown=True, csv_name="cross_silo.csv").rstrip(), "",
                *cross_silo_notes(cross), ""]

    figs = [k for k in ("map_rounds", "map_silos", "bit_balance", "loss", "comm") if k in plots]
    if figs:
        out += ["## Plots", ""]
        out += [line for k in figs for line in (f"![{PLOT_TITLES[k]}]({plots[k]})", "")]

    if rounds:
        out += ["## Rounds", "", *_rounds_section(rounds), "", "Every round's numbers: `rounds.csv`, `rounds.json`.", ""]

    timings = summary.get("timings")
    if isinstance(timings, Mapping) and timings:
        out += ["## Timings", "", _md_table(["stage", "seconds"], [[_cell(k), _secs(v)] for k, v in timings.items()]),
                ""]

    artifacts = summary.get("artifacts")
    if isinstance(artifacts, Mapping) and artifacts:
        out += ["## Artifacts", "", "Paths relative to this folder.", "", *_artifact_lines(artifacts), ""]

    out += ["## What the rows mean", ""]
    known = [m for m in ("federated", *REFERENCE_ORDER) if m in final] or ["federated", *REFERENCE_ORDER]
    out += [f"- **{m}**: {REFERENCE_NOTES[m]}" for m in known]
    if any(m.startswith("federated") for m in final) and "centralized" in final:
        out += ["- **federated / centralized**: the federated mean over the centralized mean; 1.00x means the "
                "federation lost nothing to keeping the data apart."]
    note = summary.get("references_note")
    if note:
        out += ["", str(note).strip()]
    out += ["", "The whole summary: `summary.json`; the table alone: `table.md`; every silo's figure: `final.csv`"
            + (", `cross_silo.csv`" if cross else "") + ".", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- the run folder


def write_report(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> dict[str, Path]:
    """Write a federated run's folder (atomically, file by file) and return {key: path} of what was written.

    Keys: ``summary`` (summary.json), ``rounds_csv``, ``rounds_json``, ``table`` (table.md), ``final_csv``
    (final.csv: every silo's figure; ``cross_silo_csv`` too when the run has a cross-silo table), ``report``
    (report.md), and the plots that had data: ``map_rounds``, ``map_silos``, ``bit_balance``, ``loss``, ``comm``.
    The data files come first, so a failing plot (logged, then left out of report.md) loses no numbers.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = summary.get("final") or {}
    silos = summary.get("silos") or []
    rounds = [r for r in summary.get("rounds") or () if isinstance(r, Mapping)]
    paths: dict[str, Path] = {}

    def write(key: str, name: str, fn, *args) -> None:
        p = run_dir / name
        fn(p, *args)
        paths[key] = p

    write("summary", "summary.json", atomic.write_json, dict(summary))
    write("rounds_json", "rounds.json", atomic.write_json, rounds)
    write("rounds_csv", "rounds.csv", atomic.write_text, rounds_csv(rounds, silos))
    write("table", "table.md", atomic.write_text, tables_md(summary, run_dir.name))
    write("final_csv", "final.csv", atomic.write_text, final_csv(final, silos))
    if summary.get("cross_silo"):
        write("cross_silo_csv", "cross_silo.csv", atomic.write_text, final_csv(summary["cross_silo"], silos))

    jobs = {
        "map_rounds": lambda p: _plot_map_rounds(rounds, final, silos, p),
        "map_silos": lambda p: _plot_map_silos(final, silos, p),
        "bit_balance": lambda p: plots.plot_round_metric(_series(rounds, "bit_balance"), p, "bit balance",
                                                         "bit balance of the global codes by round"),
        "loss": lambda p: plots.plot_round_metric(_series(rounds, "train_loss"), p, "train loss",
                                                  "training loss by round"),
        "comm": lambda p: plots.plot_comm(_series(rounds, "bytes_down"), _series(rounds, "bytes_up"), p),
    }
    drawn: dict[str, str] = {}
    for key, job in jobs.items():
        p = run_dir / f"{key}.png"
        try:
            if job(p):
                paths[key] = p
                drawn[key] = p.name
        except Exception as e:  # a plot is a view of numbers already on disk: never lose the report for one
            log.warning("report: could not draw %s (%s: %s)", p.name, type(e).__name__, e)
    part = summary.get("partition_plot")
    if part and (run_dir / str(part)).is_file():
        drawn["partition"] = str(part)

    write("report", "report.md", atomic.write_text, render_report(summary, drawn))
    return paths


def load_summary(run_dir: str | os.PathLike) -> dict:
    """The summary dict a run folder's summary.json holds (as write_report wrote it)."""
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        raise FedhashError(f"{run_dir} holds no summary.json; pass the folder of a finished federated run")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FedhashError(f"{p} is not valid JSON ({e}); re-run the simulation or write_report again") from e
