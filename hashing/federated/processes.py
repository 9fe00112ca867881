"""The processes a launcher starts, and every process those start, stopped by PID (never by name).

``fedhash-superlink`` and ``fedhash-supernode`` run Flower's executables as children; Flower's own
children (SuperExec, ServerApp, ClientApp) may outlive a parent that is killed and be re-parented to
init. A :class:`Tree` remembers every descendant it has seen, with its start time (so a reused PID is
never signalled), and :meth:`Tree.stop` sends SIGTERM, waits, then SIGKILLs what is left. Linux only
(``/proc``); Flower-free, so both sides of the wire use it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def flower_env(base: dict | None = None) -> dict:
    """The environment Flower's executables need: this venv's bin first on PATH (Flower starts
    ``flower-superexec`` by name) and no dependency installs at run time."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def die_with_parent() -> None:
    """``preexec_fn`` of a launcher's child: the kernel sends it SIGKILL when the launcher dies, even by
    ``kill -9`` (Linux ``prctl(PR_SET_PDEATHSIG)``), so no Flower process outlives its launcher."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process; None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """True while ``pid`` runs (a zombie is dead) and, when ``start`` is given, is still the process that
    started then."""
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[2] == start)


def children_map() -> dict[int, list[int]]:
    """parent pid -> the pids of its live children, from one listing of /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st is not None:
                kids.setdefault(st[1], []).append(int(d))
    return kids


@dataclass
class Tree:
    """Processes this launcher started (the roots) and every descendant seen since, by (pid, start time)."""

    roots: list[int] = field(default_factory=list)
    known: dict[int, int] = field(default_factory=dict)  # pid -> start time
    popens: list[subprocess.Popen] = field(default_factory=list)

    def add(self, p: subprocess.Popen | int) -> None:
        pid = p if isinstance(p, int) else p.pid
        if not isinstance(p, int):
            self.popens.append(p)
        st = proc_stat(pid)
        if st is not None and pid not in self.known:
            self.known[pid] = st[2]
            self.roots.append(pid)

    def track(self) -> None:
        """Remember the live descendants of every known live process."""
        kids = children_map()
        todo = [pid for pid, start in self.known.items() if alive(pid, start)]
        while todo:
            for kid in kids.get(todo.pop(), []):
                st = proc_stat(kid)
                if kid not in self.known and st is not None:
                    self.known[kid] = st[2]
                    todo.append(kid)

    def living(self, pids: list[int] | None = None) -> list[int]:
        for p in self.popens:
            p.poll()  # reap our own children
        return [pid for pid in (self.known if pids is None else pids) if alive(pid, self.known[pid])]

    def _signal(self, pids: list[int], sig: int) -> None:
        for pid in self.living(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _wait(self, pids: list[int], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.living(pids):
            time.sleep(0.1)

    def stop(self, grace: float = 5.0) -> list[int]:
        """SIGTERM the roots and wait up to ``grace``; then SIGTERM every descendant, wait a little more,
        and SIGKILL what is left. Returns the pids still alive (none, or a process ignored SIGKILL)."""
        self.track()
        self._signal(self.roots, signal.SIGTERM)
        self._wait(self.roots, grace)
        self.track()
        everyone = list(self.known)
        self._signal(everyone, signal.SIGTERM)
        self._wait(everyone, min(grace, 2.0))
        self._signal(everyone, signal.SIGKILL)
        self._wait(everyone, 2.0)
        return self.living()
