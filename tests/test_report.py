"""simulations.report: the run folder of a federated simulation (tables, CSV/JSON, plots, report.md)."""
from __future__ import annotations

import copy
import csv
import re

import numpy as np
import pytest

from hashing.errors import FedhashError
from simulations.report import WIDE, format_table, load_summary, ratio_lines, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SILOS = ["silo-0", "silo-1", "silo-2"]
PLOTS = ("map_rounds", "map_silos", "bit_balance", "loss", "comm")


def _map(r: int, s: int) -> float:
    return round(0.50 + 0.05 * r + 0.01 * s, 4)


def make_summary() -> dict:
    silos = [{"id": i, "name": n, "n_train": 1800 + i, "n_query": 200, "n_db": 1800 + i,
              "label_hist": [100 * (j == i) + 10 for j in range(10)], "domain": "none" if i else "blur"}
             for i, n in enumerate(SILOS)]
    rounds = []
    for r in range(1, 5):
        per = {n: _map(r, s) for s, n in enumerate(SILOS)}
        rounds.append({"round": r, "train_loss": 0.7 - 0.05 * r, "bit_balance": 0.9 + 0.01 * r, "seconds": 4.0 + r,
                       "bytes_down": 100_000 * r, "bytes_up": 90_000 * r, "clients_ok": 3, "clients_failed": 0,
                       "map": per, "mean_map": round(sum(per.values()) / 3, 4)})
    return {
        "run_id": "20261122-153000-demo",
        "scenario": {"name": "demo", "silos": 3, "partition": "dirichlet", "alpha": 0.3, "rounds": 4},
        "bits": 64, "mode": "probe", "supervised": True, "strategy": "fedavg",
        "silos": silos,
        "rounds": rounds,
        "final": {
            "federated": {"per_silo": {"silo-0": 0.75, "silo-1": 0.76, "silo-2": 0.77}, "mean": 0.76,
                          "bit_balance": 0.95, "seconds": 40.0},
            "local-only": {"per_silo": {"silo-0": 0.60, "silo-1": 0.62, "silo-2": 0.64}, "mean": 0.62,
                           "seconds": 10.0},
            "centralized": {"per_silo": {"silo-0": 0.79, "silo-1": 0.80, "silo-2": 0.81}, "mean": 0.80,
                            "bit_balance": 0.97, "seconds": 8.0},
            "itq": {"per_silo": {"silo-0": 0.41, "silo-1": 0.42, "silo-2": 0.43}, "mean": 0.42},
            "federated (unsupervised)": {"per_silo": {"silo-0": 0.5, "silo-1": 0.6, "silo-2": 0.7}},
        },
        "references_note": "References use the same splits and backbone features.",
        "timings": {"features": 12.0, "federated": 40.0, "local-only": 10.0, "centralized": 8.0, "total": 80.0},
        "artifacts": {"checkpoints": "checkpoints/", "indexes": [f"{n}/index.faiss" for n in SILOS]},
    }


def _is_png(p) -> bool:
    data = p.read_bytes()
    return len(data) > 100 and data[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    summary = make_summary()
    return run, summary, write_report(run, summary)


def test_every_file_written(written):
    run, _, paths = written
    for name in ("rounds.csv", "rounds.json", "summary.json", "table.md", "final.csv", "report.md",
                 *(f"{p}.png" for p in PLOTS)):
        assert (run / name).is_file(), name
    assert set(paths) == {"summary", "rounds_csv", "rounds_json", "table", "final_csv", "report", *PLOTS}
    assert all(p.parent == run and p.is_file() for p in paths.values())
    for k in PLOTS:
        assert _is_png(paths[k]), k
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp files


def test_rounds_csv(written):
    run, summary, _ = written
    with open(run / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for r, row in enumerate(rows, start=1):
        assert int(row["round"]) == r
        for s, n in enumerate(SILOS):
            assert float(row[f"map_{n}"]) == pytest.approx(_map(r, s))
        assert float(row["mean_map"]) == pytest.approx(summary["rounds"][r - 1]["mean_map"])
        assert float(row["train_loss"]) == pytest.approx(0.7 - 0.05 * r)
        assert int(row["bytes_down"]) == 100_000 * r
    assert load_summary(run)["rounds"] == summary["rounds"]


def test_table_numbers_and_ratio(written):
    run, summary, _ = written
    table = (run / "table.md").read_text()
    for v in ("0.7500", "0.7600", "0.7700", "0.8000", "0.6200", "0.4200", "0.9500"):
        assert v in table
    assert re.search(r"federated / centralized = 0\.95x", table)  # 0.76 / 0.80
    assert re.search(r"federated \(unsupervised\) / centralized = 0\.75x", table)  # mean of per-silo 0.6 / 0.80
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", *SILOS, "mean", "bit balance", "seconds"]
    fed = next(line for line in table.splitlines() if line.startswith("| federated |"))
    assert [c.strip() for c in fed.strip("|").split("|")] == ["federated", "0.7500", "0.7600", "0.7700", "0.7600",
                                                                "0.9500", "40.0"]
    itq = next(line for line in table.splitlines() if line.startswith("| itq |"))
    assert itq.rstrip().endswith("| - | - |")  # no bit balance, no seconds


def test_plain_table_is_what_the_cli_prints():
    s = make_summary()
    text = format_table(s["final"], s["silos"])
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["method", *SILOS, "mean"]
    assert lines[2].split()[0] == "federated"  # federated rows first, whatever the dict order
    assert "federated / centralized = 0.95x" in text
    assert "|" not in text
    # the same numbers however the keys are ordered (summary.json sorts them)
    shuffled = dict(reversed(list(s["final"].items())))
    assert format_table(shuffled, s["silos"]) == text
    assert ratio_lines({"federated": {"mean": 0.5}}) == []  # no centralized row, no ratio


def test_report_links_every_png(written):
    run, summary, _ = written
    report = (run / "report.md").read_text()
    for png in run.glob("*.png"):
        assert f"]({png.name})" in report, png.name
    for k in ("Scenario", "Silos", "Timings", "Artifacts", "dirichlet", "silo-2/index.faiss", summary["run_id"],
              "federated / centralized = 0.95x", summary["references_note"], "each silo trains alone",
              "pooled", "same backbone features", "blur"):
        assert k in report, k


def test_partition_plot_linked_when_present(tmp_path, written):
    src = written[0] / "loss.png"
    (tmp_path / "partition.png").write_bytes(src.read_bytes())
    s = make_summary()
    s["partition_plot"] = "partition.png"
    write_report(tmp_path, s)
    assert "](partition.png)" in (tmp_path / "report.md").read_text()
    s["partition_plot"] = "missing.png"
    write_report(tmp_path, s)
    assert "missing.png" not in (tmp_path / "report.md").read_text()


def test_missing_itq_and_rounds(tmp_path):
    s = make_summary()
    del s["final"]["itq"], s["rounds"]
    paths = write_report(tmp_path, s)
    report = (tmp_path / "report.md").read_text()
    assert "map_silos" in paths and _is_png(paths["map_silos"])
    for k in ("map_rounds", "bit_balance", "loss", "comm"):
        assert k not in paths and not (tmp_path / f"{k}.png").exists()
        assert f"({k}.png)" not in report
    assert "itq" not in (tmp_path / "table.md").read_text()
    assert "federated / centralized = 0.95x" in report
    with open(tmp_path / "rounds.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
    assert load_summary(tmp_path) == s


def test_minimal_summary(tmp_path):
    paths = write_report(tmp_path, {"final": {}})
    assert {"summary", "rounds_csv", "rounds_json", "table", "report"} <= set(paths)
    assert "no final results" in (tmp_path / "table.md").read_text()
    # rounds without per-silo maps or optional keys, a failed round, NaN values
    s = {"run_id": "x", "rounds": [{"round": 1, "mean_map": 0.5}, {"round": 2, "clients_failed": 2,
                                                                    "mean_map": float("nan")}],
         "final": {"federated": {"per_silo": {"a": 0.5}}}}
    paths = write_report(tmp_path / "b", s)
    assert "map_rounds" in paths and "loss" not in paths
    assert "federated" in (tmp_path / "b" / "table.md").read_text()


def test_round_trip(written, tmp_path):
    run, summary, _ = written
    assert load_summary(run) == summary
    again = copy.deepcopy(load_summary(run))
    write_report(tmp_path, again)
    assert (tmp_path / "table.md").read_text() == (run / "table.md").read_text()
    with pytest.raises(FedhashError, match="summary.json"):
        load_summary(tmp_path / "nowhere")


def test_each_federated_mode_is_compared_with_centralized_of_the_same_mode():
    from simulations.report import ratio_lines

    final = {"federated": {"mean": 0.8}, "centralized": {"mean": 0.82},
             "federated (unsupervised)": {"mean": 0.65}, "centralized (unsupervised)": {"mean": 0.70}}
    lines = ratio_lines(final)
    assert "federated / centralized = 0.98x" in lines
    assert "federated (unsupervised) / centralized (unsupervised) = 0.93x" in lines


def _many_silos(n: int) -> dict:
    """A summary of n silos with known per-silo figures (own-silo and cross-silo), for the readable-at-scale
    tests."""
    names = [f"silo-{i}" for i in range(n)]
    rng = np.random.default_rng(3)
    rows = {m: {"per_silo": {s: round(float(v), 4) for s, v in zip(names, rng.uniform(lo, lo + 0.4, n))}}
            for m, lo in (("federated", 0.5), ("local-only", 0.3), ("centralized", 0.55))}
    for r in rows.values():
        r["mean"] = float(np.mean(list(r["per_silo"].values())))
    rounds = [{"round": k, "map": {s: 0.4 + 0.05 * k for s in names}, "mean_map": 0.4 + 0.05 * k, "train_loss": 0.5,
               "seconds": 1.0, "bytes_down": 10, "bytes_up": 10} for k in (1, 2, 3)]
    return {"run_id": "many", "bits": 64, "silos": [{"id": i, "name": s, "n_train": 100} for i, s in enumerate(names)],
            "rounds": rounds, "final": rows, "cross_silo": copy.deepcopy(rows)}


def test_with_many_silos_the_table_shows_statistics_over_them_and_fits_a_terminal():
    s = _many_silos(50)
    text = format_table(s["final"], s["silos"])
    assert max(len(line) for line in text.splitlines()) <= 120
    header, _, fed = text.splitlines()[:3]
    assert header.split()[:3] == ["method", "silos", "mean"] and "median" in header and "silo-7" not in text
    v = np.sort(list(s["final"]["federated"]["per_silo"].values()))
    want = [50, v.mean(), np.median(v), v[:5].mean(), v[0], v[-1]]  # worst decile: the worst 5 of 50
    got = [float(x) for x in fed.split()[1:]]
    assert got[0] == 50 and got[1:] == pytest.approx(want[1:], abs=5e-5)
    assert "50 silos" in text and "final.csv" in text
    assert "federated / centralized" in text
    # WIDE silos keep their columns; one more gives way to the statistics, and per_silo= chooses either way
    few = _many_silos(WIDE)
    assert "silo-9" in format_table(few["final"], few["silos"])
    assert "median" in format_table(few["final"], few["silos"], per_silo=False)
    assert "silo-10" not in format_table(_many_silos(WIDE + 1)["final"], _many_silos(WIDE + 1)["silos"])
    assert "silo-49" in format_table(s["final"], s["silos"], per_silo=True)


def test_with_many_silos_the_run_folder_keeps_every_figure_in_csv_and_plots_the_distribution(tmp_path):
    s = _many_silos(200)
    paths = write_report(tmp_path, s)
    for key, table in (("final_csv", "final"), ("cross_silo_csv", "cross_silo")):
        with open(paths[key], newline="") as f:
            rows = {r["method"]: r for r in csv.DictReader(f)}
        assert set(rows) == set(s[table])
        for m, row in s[table].items():
            assert {k: float(rows[m][k]) for k in row["per_silo"]} == row["per_silo"]
            assert float(rows[m]["mean"]) == pytest.approx(row["mean"])
    assert _is_png(paths["map_silos"]) and _is_png(paths["map_rounds"])
    report = (tmp_path / "report.md").read_text()
    results = report.split("## Results: mAP@1000 per silo")[1].split("## ")[0]
    assert "| median |" in results and "silo-150" not in results and "200 silos" in results
    assert "silo-150" in report.split("## Silos")[1]  # the silos' own table still lists every silo
    table = (tmp_path / "table.md").read_text()
    assert "cross_silo.csv" in table and "final.csv" in table
