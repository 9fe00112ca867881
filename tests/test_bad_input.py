"""Bad input gets a one-line answer before any work (issue 13).

Each case of the issue's "Why" list, through the command line a user types; then property-based tests
(hypothesis, 600 generated cases in all) of ``fedhash train`` arguments, scenario files, ``--set`` strings and
manifests: every outcome is a success or a one-line ``fedhash: error:`` with exit code 2, never a traceback
and never a hang. The commands' work is replaced by a recorder in the property tests (the validation is what
is tested, and a success must hand the work a config in range)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hashing.codes import MAX_BITS
from hashing.config import MAX_SIZE, MAX_VIEWS, MIN_SIZE, Config
from hashing.errors import FedhashError
from simulations import cli

from .conftest import toml_text, write_png


def _one_line_error(capsys, args: list[str], *needles: str) -> str:
    t0 = time.perf_counter()
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse's own refusals (a value that is not a number)
        rc = e.code
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err[-3:])
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert "error:" in line, line
    for n in needles:
        assert n in line, (n, line)
    assert seconds < 10, f"{args}: the refusal took {seconds:.1f} s (work started before the check?)"
    return line


# --------------------------------------------------------------------------- the cases, as typed


@pytest.mark.parametrize("option, value, needles", [
    ("--bits", "100000", ("100000", "1024")),
    ("--batch-size", "0", ("batch-size", "at least 1")),
    ("--size", "0", ("size", "is 0", f"{MIN_SIZE}")),
    ("--size", "5", ("size", "is 5", f"{MIN_SIZE}")),
    ("--size", "100000", ("size", f"{MAX_SIZE}")),
    ("--epochs", "-1", ("epochs", "at least 1")),
    ("--views", "0", ("views",)),
    ("--views", "1000", ("views", f"{MAX_VIEWS}")),
    ("--lr", "inf", ("lr", "finite")),
    ("--lr", "nan", ("lr",)),
])
def test_train_refuses_out_of_range_options_before_any_work(tmp_path, capsys, option, value, needles):
    runs = tmp_path / "runs"
    _one_line_error(capsys, ["train", "--data", "digits", "--runs-dir", str(runs), option, value], *needles)
    assert not runs.exists(), "a run folder was created for a refused command"


@pytest.mark.parametrize("args, needles", [
    (["eval", "--run", "R", "--bits", "x"], ("--bits", "16,32,64")),
    (["eval", "--run", "R", "--bits", "16,100000"], ("--bits", "1024")),
    (["eval", "--run", "R", "--k", "0"], ("--k", "at least 1")),
    (["search", "--index", "I", "--image", "q.png", "-k", "0"], ("-k", "at least 1")),
    (["search", "--index", "I", "--image", "q.png", "--timeout", "-1"], ("--timeout", "above 0")),
    (["serve", "--index", "I", "--port", "99999"], ("--port", "65535")),
    (["serve", "--index", "I", "--max-upload-mb", "nan"], ("--max-upload-mb", "finite")),
    (["privacy-sweep", "--client-clip", "-1"], ("--client-clip", "above 0")),
    (["privacy-sweep", "--nodp-lr", "inf"], ("--nodp-lr", "finite")),
    (["privacy-sweep", "--epsilons", "0"], ("--epsilons", "> 0")),
    (["status", "R", "--watch", "0"], ("--watch", "above 0")),
])
def test_other_commands_refuse_out_of_range_numbers_before_any_work(capsys, args, needles):
    _one_line_error(capsys, args, *needles)


def test_clamped_counts_are_said_in_one_line(caplog):
    from hashing.pipeline import clamped_counts

    with caplog.at_level(logging.WARNING, logger="fedhash"):
        assert clamped_counts(Config(n_query=1000, n_train=99999), 30) == (3, 27)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "n-query 1000" in lines[0] and "using 3 query images" in lines[0]
    assert "n-train 99999" in lines[1] and "all 27" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedhash"):
        assert clamped_counts(Config(n_query=3, n_train=27), 30) == (3, 27)
    assert not caplog.records  # counts that fit: nothing said


def test_n_images_above_the_data_set_is_said(caplog):
    from hashing.silos import source_dataset

    with caplog.at_level(logging.WARNING, logger="fedhash"):
        ds = source_dataset(Config(data="digits", n_images=99999))
    assert len(ds) == 1797
    (rec,) = caplog.records
    assert "n-images 99999" in rec.getMessage() and "all 1797" in rec.getMessage()


@pytest.mark.parametrize("labels, needle", [("0;;1", "empty label"), ("0;1;0", "twice"), (";", "no label"),
                                            (" ", "no label")])
def test_manifest_label_fields_that_are_not_a_label_list_are_refused(tmp_path, capsys, labels, needle):
    import numpy as np

    write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    man = tmp_path / "m.csv"
    man.write_text(f"path,labels\na.png,{labels}\n")
    line = _one_line_error(capsys, ["train", "--data", str(man), "--runs-dir", str(tmp_path / "runs")], needle,
                           "line 2")
    assert "a.png" in line


def test_a_bad_set_value_is_blamed_on_set_not_on_the_scenario(capsys, tmp_path):
    line = _one_line_error(capsys, ["simulate", "demo", "--set", "bits=7", "--runs-dir", str(tmp_path)],
                           "--set bits=7", "demo.toml", "'bits' is 7")
    assert line.index("--set") < line.index("demo.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("bits = 7\n")
    line = _one_line_error(capsys, ["simulate", str(bad), "--set", "seed=1", "--runs-dir", str(tmp_path)],
                           "bad.toml", "'bits' is 7")
    assert "--set" not in line  # the file's own error names the file


# --------------------------------------------------------------------------- properties


class _Recorded(Exception):
    pass


@pytest.fixture
def recorder(monkeypatch):
    """The commands' work replaced: what it was handed is kept (and the command returns 0)."""
    got: dict = {}

    def train_run(cfg, runs_dir):
        got["cfg"] = cfg
        return None

    def simulate(scn, **kw):
        got["scn"] = scn
        raise _Recorded

    import simulations.centralized as centralized
    import simulations.runner as runner

    monkeypatch.setattr(centralized, "train_run", train_run)
    monkeypatch.setattr(runner, "simulate", simulate)
    return got


def _run(args: list[str], capsys) -> tuple[int, list[str]]:
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    except _Recorded:
        rc = 0
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _assert_outcome(rc, err, what):
    event("went ahead" if rc == 0 else "refused")
    text = "\n".join(err)
    assert "Traceback" not in text, (what, text)
    if rc != 0:
        assert rc == 2, (what, rc, err[-3:])
        assert err and "error:" in err[-1], (what, err)
        errors = [ln for ln in err if "error:" in ln]
        assert len(errors) == 1, (what, err)


def _in_range(cfg: Config) -> None:
    """What a command that went ahead may rely on."""
    assert 8 <= cfg.bits <= MAX_BITS and cfg.bits % 8 == 0
    assert MIN_SIZE <= cfg.size <= MAX_SIZE and 1 <= cfg.views <= MAX_VIEWS
    assert cfg.views >= 2 or cfg.supervised
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.n_query >= 1 and cfg.n_train >= 1 and cfg.n_images >= 0
    for f in ("lr", "lr_min", "weight_decay", "lam", "eps", "alpha", "round_timeout"):
        assert math.isfinite(getattr(cfg, f)), f
    assert cfg.lr > 0 and cfg.eps > 0


_numbers = st.one_of(st.integers(-10**6, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["0", "-0", "1e400", "nan", "inf", "", " ", "8", "64", "x", "1.5", "0x10"]))
_train_options = ["--bits", "--epochs", "--batch-size", "--size", "--views", "--n-train", "--n-query", "--limit",
                  "--seed", "--lr"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_train_options), _numbers), max_size=5),
       st.sampled_from([[], ["--supervised"], ["--unsupervised"], ["--variant", "large"], ["--variant", "huge"]]))
def test_property_train_arguments(recorder, capsys, tmp_path, opts, extra):
    recorder.clear()
    args = ["train", "--data", "digits", "--runs-dir", str(tmp_path / "runs")] + extra
    for o, v in opts:
        args += [o, str(v)]
    rc, err = _run(args, capsys)
    _assert_outcome(rc, err, args)
    if rc == 0:
        _in_range(recorder["cfg"])
    else:
        assert "cfg" not in recorder  # refused before the work was handed anything


_keys = st.sampled_from(Config.keys() + ["name", "references", "also-unsupervised", "description", "unsupervised-lr",
                                         "supervised-bits", "nonsense", "Bits", "bits ", "0"])
_toml_values = st.recursive(
    st.one_of(st.integers(-10**6, 10**12), st.floats(allow_nan=False), st.booleans(),
              st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
              st.sampled_from(["fedavg", "probe", "lora", "iid", "dirichlet", "digits", "sample", "none", "silo-1@2"])),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["a", "bits"]), children,
                                                                      max_size=2),
    max_leaves=4)




@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(_keys, _toml_values, max_size=6), st.sampled_from(["", "bits = \n", "[x\n", "= 3\n", "\x00"]))
def test_property_scenario_files(recorder, capsys, tmp_path, values, junk):
    recorder.clear()
    f = tmp_path / "generated.toml"
    f.write_text(toml_text(values) + junk)
    rc, err = _run(["simulate", str(f), "--runs-dir", str(tmp_path / "runs")], capsys)
    _assert_outcome(rc, err, f.read_text())
    if rc == 0:
        scn = recorder["scn"]
        _in_range(scn.cfg)
        for sup in (True, False):
            _in_range(scn.config_for(sup))


_set_items = st.one_of(
    st.tuples(_keys, st.one_of(_numbers.map(str), st.sampled_from(['"x"', "true", "[1, 2]", "{a = 1}", "'", '"'])))
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=12))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_set_items, max_size=4))
def test_property_set_strings(recorder, capsys, tmp_path, items):
    recorder.clear()
    args = ["simulate", "demo", "--runs-dir", str(tmp_path / "runs")]
    for it in items:
        args += ["--set", it]
    rc, err = _run(args, capsys)
    _assert_outcome(rc, err, items)
    if rc == 0:
        _in_range(recorder["scn"].cfg)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a.png", "b.png", "a.png", "b.png", "sub/../b.png", "missing.png", "", " ", "sub/../a.png", "a.png,x"]),
                          st.one_of(st.sampled_from(["0", "1", "0;1", "cat"]), st.text(alphabet="01;, x\"", max_size=6))),
                max_size=5),
       st.one_of(st.just("path,labels"), st.sampled_from(["labels,path", "", "path", "PATH, Labels"])))
def test_property_manifests(tmp_path_factory, rows, header):
    import numpy as np

    from hashing.data import load_manifest

    d = tmp_path_factory.mktemp("manifest")
    write_png(d / "a.png", np.zeros((8, 8), np.uint8))
    write_png(d / "b.png", np.full((8, 8), 255, np.uint8))
    man = d / "m.csv"
    man.write_text("\n".join([header] + [f"{p},{labs}" for p, labs in rows]) + "\n")
    try:
        ds = load_manifest(man)
    except FedhashError as e:
        event("refused")
        assert "\n" not in str(e) and str(e)
        return
    event("went ahead")
    assert len(ds) >= 1 and len(ds.labels) == len(ds)
    for p in ds.paths:
        assert Path(p).is_file()
