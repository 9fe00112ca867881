"""``fedhash-superlink``: the federation's SuperLink. It takes every ``flower-superlink`` option and runs
Flower's SuperLink with its environment arranged and its stop made clean:

- this venv's ``bin`` folder first on ``PATH`` (Flower's SuperLink starts ``flower-superexec`` by name, so
  from a shell where the venv is not activated ``.venv/bin/flower-superlink`` dies with
  ``FileNotFoundError: 'flower-superexec'``), and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``;
- SIGTERM or Ctrl-C stops the SuperLink and every process it started (SuperExec, the ServerApp of a run in
  flight) within ``--grace`` seconds plus two: SIGTERM, then SIGKILL, by PID. (Flower's SuperLink alone
  keeps running with a run in flight until it is killed.) A run stopped that way is resumed with
  ``resume=true`` once the SuperLink is back (README, "Sites that come and go").

    .venv/bin/fedhash-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\
        --enable-supernode-auth --host 0.0.0.0 --port 9093 --database /var/lib/fedhash/superlink.db
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hashing.federated.processes import Tree, die_with_parent, flower_env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="fedhash-superlink", add_help=False)
    p.add_argument("--grace", type=float, default=3.0)
    p.add_argument("-h", "--help", action="store_true")
    own, flower_args = p.parse_known_args(argv)
    if own.help:
        print(__doc__)
        print("fedhash's own option: --grace S (default 3); every other option is flower-superlink's "
              "(flower-superlink --help)")
        return 0
    if "--disable-runtime-dependency-installation" not in flower_args:
        flower_args.append("--disable-runtime-dependency-installation")
    tree = Tree()
    stopping = threading.Event()

    def on_signal(_signum, _frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    link = subprocess.Popen([str(Path(sys.executable).parent / "flower-superlink"), *flower_args],
                            env=flower_env(), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    tree.add(link)
    try:
        while not stopping.is_set() and link.poll() is None:
            tree.track()
            stopping.wait(0.5)
    finally:
        left = tree.stop(own.grace)
        if left:
            print(f"fedhash-superlink: processes still alive after the stop: {left}", file=sys.stderr)
    return 0 if stopping.is_set() else (link.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
