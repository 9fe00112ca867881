"""Ctrl-C and SIGTERM (issue 13): ``fedhash simulate`` and ``fedhash train`` stop within seconds with exit code
128 + the signal and one line on stderr; they stop Ray and every process they started; the federation's
``federation.json`` says ``"status": "interrupted"`` with the last complete round, whose checkpoint is whole,
no temp file is left, and ``--resume`` continues after that round without rewriting the earlier ones.

Each test runs ``fedhash`` as a subprocess in a session of its own, marked by an environment variable that
Ray's processes inherit: afterwards nothing of it may be left (the group is killed if it is, and the test fails).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from server import checkpoint as ckpt
from simulations.runs import read_status

from .conftest import toml_text

ROOT = Path(__file__).resolve().parents[1]
FEDHASH = str(Path(sys.executable).parent / "fedhash")
EXIT_WITHIN = 15.0  # seconds from the signal to the exit

SCENARIO = {
    "name": "interrupts", "references": [], "also-unsupervised": False,
    "data": "digits", "n-images": 0, "partitioner": "dirichlet", "alpha": 0.3, "num-silos": 2, "seed": 0,
    "bits": 16, "size": 32, "views": 2, "batch-size": 64, "min-train-nodes": 2,
    "supervised": True, "mode": "probe", "client-threads": 1,
}




def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def _marked(tag: str) -> list[int]:
    """Every live process whose environment carries FEDHASH_TEST_TAG=tag (fedhash, Ray's daemons and workers)."""
    out = []
    needle = f"FEDHASH_TEST_TAG={tag}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                stat = (d / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie holds nothing
                    out.append(int(d.name))
        except OSError:
            continue
    return out


def _signal_state() -> str:
    """This process's blocked and ignored signals (/proc/self/status), for a failure's message."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return " ".join(ln.replace("\t", "") for ln in lines if ln.startswith(("SigBlk", "SigIgn")))


def _as_from_a_shell() -> None:
    """In the child before exec: the signal state a command started from a shell has. A child inherits the blocked
    mask and the ignored signals of this pytest process, which a library an earlier test loaded may have changed
    (a fresh clone's full run twice started fedhash with SIGINT not delivered); fedhash keeps an ignored SIGINT
    ignored on purpose (nohup), so the test must not hand it one."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


class Fedhash:
    """``fedhash ARGS`` in a new session (its own process group), stdout and stderr to files."""

    def __init__(self, tmp: Path, args: list[str], cache: Path):
        self.tag = uuid.uuid4().hex
        self.err_path, self.out_path = tmp / f"{self.tag}.err", tmp / f"{self.tag}.out"
        env = dict(os.environ, FEDHASH_CACHE=str(cache), FEDHASH_TEST_TAG=self.tag, MPLBACKEND="Agg",
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.parent_signals = _signal_state()
            self.proc = subprocess.Popen([FEDHASH, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, preexec_fn=_as_from_a_shell)

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal_and_wait(self, sig: int) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(EXIT_WITHIN + 30)  # a slow exit fails below, with its time, not here
        except subprocess.TimeoutExpired:  # a hang: where each thread of fedhash is (cli: faulthandler on SIGUSR1)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            pytest.fail(f"fedhash did not exit within {EXIT_WITHIN + 30:.0f} s of {signal.Signals(sig).name} "
                        f"(pytest's signals when it started: {self.parent_signals}; now: {_signal_state()}); "
                        f"its stderr (thread stacks last):\n{self.err[-6000:]}")
        return rc, time.monotonic() - t0

    def wait_for(self, what: str, done, timeout: float) -> None:
        t0 = time.monotonic()
        while not done():
            if self.proc.poll() is not None:
                pytest.fail(f"fedhash exited ({self.proc.returncode}) before {what}: {self.err[-2000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"no {what} within {timeout:.0f} s: {self.err[-2000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        """Kill whatever is left of the session, then check that nothing of it is."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(30)
        # Ray's daemons and workers exit on their own after ray.shutdown(), some seconds after fedhash did
        # (once, 15 s were not enough on a CI run with nothing else on the machine)
        deadline = time.monotonic() + 40
        while _marked(self.tag) and time.monotonic() < deadline:
            time.sleep(0.3)
        left = _marked(self.tag)
        names = [_cmdline(pid) for pid in left]
        if left:  # by their ids: the group this test created, then each straggler of it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the fedhash run were left behind: {list(zip(left, names))}"


@contextlib.contextmanager
def fedhash(tmp: Path, args: list[str], cache: Path):
    run = Fedhash(tmp, args, cache)
    try:
        yield run
    finally:
        run.close()


def _one_line(err: str, sig: int) -> str:
    """stderr holds the progress bars and exactly one other line: the interrupt's."""
    assert "Traceback" not in err and "received at time" not in err, err[-3000:]
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)  # tqdm's cursor moves
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", plain) if ln.strip() and "%|" not in ln]
    name = signal.Signals(sig).name
    assert len(lines) == 1 and lines[0].startswith(f"fedhash: interrupted ({name})"), lines[-5:]
    return lines[0]


def _temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def _fed(runs: Path) -> dict:
    """federation.json of the (one) simulate run under ``runs``, {} before there is one."""
    return next((read_status(d / "federated") for d in runs.glob("*")), {}) if runs.exists() else {}


def _scenario(tmp: Path, cache: Path, rounds: int) -> Path:
    scn = tmp / "interrupts.toml"
    scn.write_text(toml_text(SCENARIO | {"num-server-rounds": rounds, "cache-dir": str(cache)}))
    return scn


def _interrupt_simulate(tmp: Path, cache: Path, sig: int, rounds: int, *, after_round: int):
    """``fedhash simulate`` stopped by ``sig`` once ``after_round`` rounds are complete (0: during round 1);
    checks the exit, the stderr line, federation.json, the checkpoints and the temp files; returns
    (scenario path, run folder, {checkpoint name: bytes})."""
    scn = _scenario(tmp, cache, rounds)
    runs = tmp / "runs"
    with fedhash(tmp, ["simulate", str(scn), "--runs-dir", str(runs)], cache) as run:
        if after_round:
            run.wait_for(f"round {after_round}", lambda: len(_fed(runs).get("rounds", [])) >= after_round, 400)
        else:
            run.wait_for("round 1's training", lambda: _fed(runs).get("phase") == "train", 400)
        rc, seconds = run.signal_and_wait(sig)
        err = run.err
    assert rc == 128 + sig, (rc, err[-2000:])
    assert seconds < EXIT_WITHIN, f"exit took {seconds:.1f} s"
    line = _one_line(err, sig)
    assert "--resume" in line, line
    (run_dir,) = list(runs.iterdir())
    out = run_dir / "federated"
    status = read_status(out)
    assert status["status"] == "interrupted", status.get("status")
    last = ckpt.latest_checkpoint(out)
    done = int(ckpt.load_checkpoint(last)["round"]) if last else 0
    assert done >= after_round and status["round"] == done == status["last_checkpoint_round"], (status["round"], done)
    assert status["round_in_flight"] == done + 1 and done < rounds
    assert [r["round"] for r in status["rounds"]] == list(range(1, done + 1))
    files = {}
    for p in sorted(ckpt.checkpoint_dir(out).glob("round-*.pt")):
        rec = ckpt.load_checkpoint(p)  # every checkpoint is whole
        assert [h["round"] for h in rec["history"]] == list(range(1, rec["round"] + 1))
        files[p.name] = p.read_bytes()
    assert len(files) == done
    assert not (out / "model.pt").exists() and not (run_dir / "report.md").exists()
    assert not _temp_files(run_dir), _temp_files(run_dir)
    return scn, run_dir, files


@pytest.mark.slow
def test_sigint_mid_round_stops_cleanly_and_resume_continues(tmp_path, cache_dir):
    scn, run_dir, before = _interrupt_simulate(tmp_path, cache_dir, signal.SIGINT, 4, after_round=1)
    done = len(before)
    with fedhash(tmp_path, ["simulate", str(scn), "--resume", str(run_dir)], cache_dir) as run:
        rc = run.proc.wait(600)
        assert rc == 0, run.err[-3000:]
    out = run_dir / "federated"
    for name, data in before.items():  # no round is rewritten (those still kept: keep-checkpoints = 3)
        if name in ("round-0002.pt", "round-0003.pt"):
            assert (ckpt.checkpoint_dir(out) / name).read_bytes() == data, name
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert last["round"] == 4 and [h["round"] for h in last["history"]] == [1, 2, 3, 4]
    names = sorted(p.name for p in ckpt.checkpoint_dir(out).glob("round-*.pt"))
    assert names == [f"round-{r:04d}.pt" for r in range(2, 5)] and done < 4
    status = read_status(out)
    assert status["status"] == "done" and status["model_version"] == last["model_version"]
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())] == [1, 2, 3, 4]
    assert (out / "model.pt").exists() and (run_dir / "report.md").exists()
    assert not _temp_files(run_dir), _temp_files(run_dir)


@pytest.mark.slow
def test_sigterm_after_a_round_stops_cleanly(tmp_path, cache_dir):
    _interrupt_simulate(tmp_path, cache_dir, signal.SIGTERM, 6, after_round=1)


def test_sigterm_during_the_first_round_stops_cleanly(tmp_path, cache_dir):
    """The default suite's simulate interrupt: SIGTERM while round 1 trains (no checkpoint yet: round 0)."""
    _interrupt_simulate(tmp_path, cache_dir, signal.SIGTERM, 3, after_round=0)


def test_sigint_during_fedhash_train_leaves_no_run_folder(tmp_path, cache_dir):
    """``fedhash train`` writes its run folder only once training is over: interrupted while it trains, it
    exits with 130 and leaves no folder at all (and no temp file in the feature cache)."""
    runs = tmp_path / "runs"
    args = ["train", "--data", "digits", "--bits", "16", "--size", "32", "--views", "2", "--n-train", "600",
            "--n-query", "100", "--epochs", "2000", "--batch-size", "128", "--runs-dir", str(runs),
            "--cache-dir", str(cache_dir)]
    with fedhash(tmp_path, args, cache_dir) as run:
        run.wait_for("training's second epoch", lambda: "epoch 2/2000" in run.err, 300)
        rc, seconds = run.signal_and_wait(signal.SIGINT)
        err = run.err
    assert rc == 130, (rc, err[-2000:])
    assert seconds < 5.0, f"exit took {seconds:.1f} s"
    _one_line(err, signal.SIGINT)
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))
    assert not [p for p in Path(cache_dir).rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_kill_9_of_the_whole_group_mid_round_loses_only_that_round(tmp_path, cache_dir):
    """SIGKILL of fedhash simulate and every process of its group (as an OOM killer or a power cut would stop
    it) while round 2 trains: no handler runs, yet the folder's files agree (round 1's checkpoint whole,
    federation.json's rounds those of the checkpoints, no model.pt, no report) and --resume continues from
    round 1 without rewriting it."""
    rounds = 3
    scn = _scenario(tmp_path, cache_dir, rounds)
    runs = tmp_path / "runs"
    with fedhash(tmp_path, ["simulate", str(scn), "--runs-dir", str(runs)], cache_dir) as run:
        run.wait_for("round 1", lambda: len(_fed(runs).get("rounds", [])) >= 1 and _fed(runs).get("phase") == "train", 400)
        os.killpg(run.proc.pid, signal.SIGKILL)
        assert run.proc.wait(30) == -signal.SIGKILL
    (run_dir,) = list(runs.iterdir())
    out = run_dir / "federated"
    status = read_status(out)
    done = int(ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["round"])
    assert 1 <= done < rounds and [r["round"] for r in status["rounds"]] == list(range(1, done + 1))
    before = {}
    for p in sorted(ckpt.checkpoint_dir(out).glob("round-*.pt")):
        rec = ckpt.load_checkpoint(p)
        assert [h["round"] for h in rec["history"]] == list(range(1, rec["round"] + 1))
        before[p.name] = p.read_bytes()
    assert not (out / "model.pt").exists() and not (run_dir / "report.md").exists()
    assert json.loads((run_dir / "scenario.json").read_text())["num-server-rounds"] == rounds
    with fedhash(tmp_path, ["simulate", str(scn), "--resume", str(run_dir)], cache_dir) as again:
        assert again.proc.wait(600) == 0, again.err[-3000:]
    for name, data in before.items():  # the rounds done before the kill are not rewritten
        assert (ckpt.checkpoint_dir(out) / name).read_bytes() == data, name
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert last["round"] == rounds and [h["round"] for h in last["history"]] == list(range(1, rounds + 1))
    status = read_status(out)
    assert status["status"] == "done" and status["model_version"] == last["model_version"]
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())] == list(range(1, rounds + 1))
    assert (out / "model.pt").exists() and (run_dir / "report.md").exists()
    assert not _temp_files(run_dir), _temp_files(run_dir)
