"""Run folders that tell the truth (issue 13): ``fedhash simulate --resume`` writes nothing until every check has
passed, refuses other settings (naming the key), refuses fewer rounds and a complete run, and extends a finished
run with more rounds without rewriting its earlier checkpoints; afterwards scenario.json, the checkpoints and the
report describe the same run. One 2-round simulation on digits, then its extension to 3 rounds (two Flower runs)."""
from __future__ import annotations

import json
from pathlib import Path

import flwr.simulation  # noqa: F401 - Flower's log handler binds sys.stderr at import: not a test's capsys stream
import pytest

from server import checkpoint as ckpt
from simulations.cli import main

from .conftest import toml_text

SCENARIO = {
    "name": "resume-truth", "references": [], "also-unsupervised": False,
    "data": "digits", "n-images": 0, "partitioner": "dirichlet", "alpha": 0.3, "num-silos": 3, "seed": 0,
    "bits": 16, "size": 32, "views": 2, "batch-size": 64, "num-server-rounds": 2, "min-train-nodes": 3,
    "supervised": True, "mode": "probe", "client-threads": 1,
}




def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run folder but the run log (which a refused resume may append to)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "log.txt"}


def _refused(capsys, args: list[str], *needles: str) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err[-3:]
    line = err[-1]
    assert line.startswith("fedhash: error: --resume") and "Traceback" not in "\n".join(err), err
    for n in needles:
        assert n in line, (n, line)
    return line


def test_resume_refuses_what_would_rewrite_history_and_extends_a_finished_run(tmp_path, cache_dir, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("FEDHASH_CACHE", str(cache_dir))
    scn = tmp_path / "resume.toml"
    scn.write_text(toml_text(SCENARIO | {"cache-dir": str(cache_dir)}))
    runs = tmp_path / "runs"
    assert main(["simulate", str(scn), "--runs-dir", str(runs)]) == 0
    capsys.readouterr()
    (run,) = list(runs.iterdir())
    before = _snapshot(run)
    assert json.loads((run / "scenario.json").read_text())["num-server-rounds"] == 2
    assert "round-0002.pt" in " ".join(before) and "round-0003.pt" not in " ".join(before)

    resume = ["simulate", str(scn), "--resume", str(run)]
    # other settings: refused, naming the key, before anything is written (scenario.json is not overwritten)
    _refused(capsys, [*resume, "--set", "bits=32"], "bits = 16", "now 32")
    _refused(capsys, [*resume, "--set", "lr=0.01"], "lr = 0.001", "now 0.01")
    # fewer rounds: refused; the same rounds on a complete run: nothing to resume
    _refused(capsys, [*resume, "--set", "num-server-rounds=1"], "has done 2 rounds", "num-server-rounds of at least 2")
    _refused(capsys, resume, "complete (2 rounds)", "num-server-rounds=3")
    assert _snapshot(run) == before, "a refused resume changed the run folder"

    # more rounds extend the finished run: rounds 1-2 are not rewritten, round 3 is trained from round 2's model
    assert main([*resume, "--set", "num-server-rounds=3"]) == 0
    capsys.readouterr()
    after = _snapshot(run)
    for name in ("federated/checkpoints/round-0001.pt", "federated/checkpoints/round-0002.pt"):
        assert after[name] == before[name], name
    assert json.loads((run / "scenario.json").read_text())["num-server-rounds"] == 3
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "federated"))
    assert last["round"] == 3 and [h["round"] for h in last["history"]] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["artifacts"]["federated"]["model_version"] == last["model_version"]
    fed = json.loads((run / "federated" / "federation.json").read_text())
    assert fed["status"] == "done" and fed["model_version"] == last["model_version"]
    assert [r["round"] for r in json.loads((run / "rounds.json").read_text())] == [1, 2, 3]


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "scn.toml").write_text(toml_text(SCENARIO))
    _refused(capsys, ["simulate", str(tmp_path / "scn.toml"), "--resume", str(tmp_path)], "no scenario.json")
    (tmp_path / "scenario.json").write_text("{not json")
    _refused(capsys, ["simulate", str(tmp_path / "scn.toml"), "--resume", str(tmp_path)], "unreadable")


@pytest.mark.parametrize("change, needle", [({"bits": 32}, "bits = 16"), ({"strategy": "fedprox"}, "strategy"),
                                            ({"num_server_rounds": 1}, "has done 2 rounds")])
def test_server_side_resume_check_names_the_key(change, needle):
    from hashing.config import Config
    from hashing.errors import ModelVersionError

    was = Config(bits=16, num_server_rounds=2).to_dict()
    ckpt.check_same_run(was, 2, Config(bits=16, num_server_rounds=5, out_dir="elsewhere", round_timeout=5.0), "x")
    with pytest.raises(ModelVersionError, match=needle):
        ckpt.check_same_run(was, 2, Config(**({"bits": 16, "num_server_rounds": 2} | change)), "x")
