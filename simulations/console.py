"""What the terminal shows: fedhash's own progress and results. Everything else that libraries say
(Flower's and Ray's log lines, alembic's, Python warnings, the simulated silos' output) goes to the
run folder's ``log.txt``; ``--verbose`` shows it on the terminal as well."""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(levelname)s %(name)s: %(message)s"
_CONSOLE = "fedhash-console"
_FILE = "fedhash-run-log"


class _Own(logging.Filter):
    """fedhash's own records (and anything CRITICAL); the rest is the run log's. A silo's failure reaches
    the terminal as fedhash's one line (``fedhash.server``); Flower's traceback of it is in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "fedhash" or record.name.startswith("fedhash.") or record.levelno >= logging.CRITICAL


def setup(verbose: bool = False) -> None:
    """The terminal's handler on the root logger (once per process; a second call updates it)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _CONSOLE), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.set_name(_CONSOLE)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    handler.stream = sys.stderr  # the terminal now (not setStream: it flushes the old one, maybe closed)
    handler.filters.clear()
    if not verbose:
        handler.addFilter(_Own())
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("fedhash").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines say which SIMD build it found
    logging.captureWarnings(True)  # a warning is one log line ("py.warnings"), never a source line under it


@contextlib.contextmanager
def run_log(path: str | Path) -> Iterator[Path]:
    """Every log record (all libraries, DEBUG and up) also goes to ``path`` while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.set_name(_FILE)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


class _ToLog:
    """A text stream that appends to the run log (what Ray forwards from the simulated silos)."""

    def __init__(self, path: Path):
        self._f = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, s: str) -> int:
        return self._f.write(s)

    def flush(self) -> None:
        self._f.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # faulthandler (Ray enables it) writes a crash's traceback here
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def quiet_flower(log_path: Path | None, verbose: bool) -> Iterator:
    """While Flower's simulation runs: Flower's own terminal handler is off (its records reach the root
    handlers, so the run log, and the terminal with ``--verbose``), and what the simulated silos print
    (forwarded by Ray to this process's stdout and stderr) goes to the run log. Yields the terminal's
    stream, for fedhash's progress bars."""
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    terminal = sys.stderr
    removed = console_handler in FLOWER_LOGGER.handlers
    if removed:
        FLOWER_LOGGER.removeHandler(console_handler)
    out, err = sys.stdout, sys.stderr
    sink = _ToLog(log_path) if (log_path is not None and not verbose) else None
    try:
        if sink is not None:
            sys.stdout = sys.stderr = sink
        yield terminal
    finally:
        sys.stdout, sys.stderr = out, err
        if sink is not None:
            sink.close()
        if removed:
            FLOWER_LOGGER.addHandler(console_handler)
