"""The ``fedhash`` command line (argparse only; each command's work lives in its own module).

    fedhash train --data fashion-mnist --bits 64        centralized CroVCA on cached features (probe mode)
    fedhash eval --run runs/<id>                         CroVCA vs ITQ, PCA, LSH and float cosine at 16/32/64 bits
    fedhash export-codes --run runs/<id> --out codes.npz codes of the run's query and database splits
    fedhash simulate simulations/scenarios/<name>.toml   a federated scenario on Flower's simulation engine
    fedhash demo                                         the default scenario: 5 simulated hospitals, end to end
    fedhash privacy-sweep --scenario dp-demo             the privacy-utility curve (sample- and client-level DP)
    fedhash leakage --scenario leakage-demo              the gradient-leakage lab: attacks on a silo's messages
    fedhash index build --model M --data D --out I       a silo's searchable index (also add, remove, upgrade,
                                                         rollback, info, audit: simulations/search.py)
    fedhash search --index I --image q.png -k 10         the top-k of a query image
    fedhash search --federation C --model M --image q.png  every site's top-k, by code only (also --run R)
    fedhash serve --index I --port 8080                  the index's HTTP API and search page
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from hashing.errors import FedhashError

from . import console, options


def cmd_train(args: argparse.Namespace) -> int:
    from hashing.config import DEFAULT_SIZE, Config

    from .centralized import train_run

    values = {"data": args.data, "seed": args.seed, "n-query": args.n_query, "n-train": args.n_train,
              "size": DEFAULT_SIZE if args.size is None else args.size, "views": args.views, "strict": args.strict,
              "n-images": args.limit or 0, "bits": args.bits, "supervised": args.supervised, "epochs": args.epochs,
              "batch-size": args.batch_size, "lr": args.lr, "variant": args.variant}
    for key, value in (("backbone", args.backbone), ("weights", args.weights), ("cache-dir", args.cache_dir)):
        if value:
            values[key] = value
    train_run(Config.from_dict(values, source="fedhash train"), args.runs_dir)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .centralized import eval_federated, eval_run

    if (Path(args.run) / "federation.json").exists():
        return eval_federated(Path(args.run))
    return eval_run(args.run, [int(b) for b in args.bits.split(",")], k=args.k, cache_dir=args.cache_dir)


def cmd_export(args: argparse.Namespace) -> int:
    from .centralized import export_codes

    return export_codes(args.run, args.out, cache_dir=args.cache_dir)


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


def cmd_leakage(args: argparse.Namespace) -> int:
    from .leakage.study import format_table, plan_from, run_study
    from .scenario import load_scenario

    scn = load_scenario(args.scenario, overrides=_overrides(args.set))
    plan = plan_from(scn, attacks=args.attack, batch_sizes=args.batch_sizes, local_steps=args.local_steps,
                     epsilons=args.epsilons, trials=args.trials)
    run_dir, summary = run_study(scn, plan, runs_dir=args.runs_dir, model=args.model)
    print()
    print(format_table(summary["rows"]))
    print(f"table: {run_dir / 'table.md'}  json: {run_dir / 'leakage.json'}  plots: {run_dir}/*.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhash", description="Federated image hashing with CroVCA.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Flower's, Ray's and the libraries' log lines too (always kept in the run's log.txt)")
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
    t.add_argument("--size", type=int, default=None, help="backbone input size in pixels (default 96)")
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
    e.add_argument("--bits", type=options.bits_list, default="16,32,64", help="comma-separated code lengths")
    e.add_argument("--k", type=options.positive_int, default=1000, help="mAP@k")
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
    v.add_argument("--epsilons", default="inf,8,4,1", help="target ε per silo, comma-separated; inf = no DP, and the DP head at "
                   "noise 0.01")
    v.add_argument("--client-noise", default="0.5,1,2", help="client-level DP noise multipliers ('' for none)")
    v.add_argument("--client-clip", type=options.positive_float, default=0.05, help="client-level DP: update norm bound")
    v.add_argument("--nodp-lr", type=options.positive_float, default=1e-3, help="learning rate of the ε = inf run (the demo's)")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    v.add_argument("--runs-dir", default="runs")
    v.set_defaults(func=cmd_privacy_sweep)

    lk = sub.add_parser("leakage", help="the gradient-leakage lab: attacks on a silo's real messages, with and "
                                        "without DP, scored by re-identification in its index")
    lk.add_argument("--scenario", default="leakage-demo", help="a scenario .toml or the name of one (default leakage-demo)")
    lk.add_argument("--attack", help="comma-separated attacks (default: the scenario's leakage-attacks, else all): "
                                     "analytic, trap, matching, invert, statistics, labels")
    lk.add_argument("--batch-sizes", help="victim batch sizes, comma-separated (default the scenario's, else 2,8,32)")
    lk.add_argument("--local-steps", help="local steps of the victim's round, comma-separated (default the scenario's, "
                                          "else 1,4)")
    lk.add_argument("--epsilons", help="inf (no DP), target ε of sample-level DP and 'client' (client-level DP), "
                                       "comma-separated (default the scenario's, else inf,8,4,1,client)")
    lk.add_argument("--trials", type=int, help="victim batches per cell (default the scenario's, else 20)")
    lk.add_argument("--model", help="attack this global model (a model.pt of a federated run) instead of the one the "
                                    "study trains first")
    lk.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    lk.add_argument("--runs-dir", default="runs")
    lk.set_defaults(func=cmd_leakage)

    d = sub.add_parser("demo", help="the default scenario: 5 simulated hospitals (Dirichlet 0.3, Fashion-MNIST, 64 bits)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    d.add_argument("--runs-dir", default="runs")
    d.set_defaults(func=cmd_simulate, scenario="demo", resume=None)

    st = sub.add_parser("status", help="a federated run's progress: round, phase, each site's last reply, failures")
    st.add_argument("dir", nargs="?", help="the run's out-dir (on the SuperLink's machine) or a simulate run folder")
    st.add_argument("--federation", metavar="CONNECTION", help="instead: a SuperLink of the Flower config (flwr log)")
    st.add_argument("--run-id", type=int, help="with --federation: this run (default: the newest running one)")
    st.add_argument("--json", action="store_true", help="print the view as JSON")
    st.add_argument("--watch", type=options.positive_float, metavar="S", help="redraw every S seconds until the run ends")
    st.set_defaults(func=cmd_status)

    from . import search

    search.add_parsers(sub)
    return p


def cmd_status(args) -> int:
    from .status import status_command

    return status_command(args)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (and SIGINT) as a KeyboardInterrupt in the main thread, so both take Ctrl-C's clean path."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


EXIT_STALL_SECONDS = 20.0  # after an interrupt's line: the longest the exit may take before it is forced


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _catch_signals() -> dict:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread (a signal ignored on purpose, by nohup or a
    shell's background job, stays ignored); returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    with contextlib.suppress(ValueError, OSError, AttributeError):  # `kill -USR1 <pid>`: where every thread is
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, h in before.items():
        if h in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(sig, _raise_interrupted)
    return {sig: h for sig, h in before.items() if h is not None}


def _exit_if_held(code: int) -> None:
    """After an interrupt of the ``fedhash`` command: threads a library left waiting for an answer that will
    not come (a reply of a stopped silo) would keep the interpreter from exiting. They get a few seconds
    (a ServerApp writing its last status), then the process exits anyway, its streams flushed."""
    deadline = time.monotonic() + 5.0
    held = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in held:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in held):
        logging.getLogger("fedhash").debug("exiting with threads still waiting: %s",
                                           [t.name for t in held if t.is_alive()])
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["fedhash"] + list(sys.argv[1:] if argv is None else argv))  # for audit logs
    console.setup(args.verbose)
    handlers = _catch_signals()
    try:
        return args.func(args)
    except FedhashError as e:
        print(f"fedhash: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        for sig in handlers:  # a second Ctrl-C does not cut the exit short
            signal.signal(sig, signal.SIG_IGN)
        code = 128 + int(signum)
        hint = ""
        if getattr(args, "func", None) is cmd_simulate:  # simulate and demo: the last complete round is kept
            again = ["fedhash", "simulate", str(args.scenario)] + [f"--set={s}" for s in args.set or []]
            hint = f"; continue it with {shlex.join(again)} --resume {args.resume or '<its run folder>'}"
        print(f"fedhash: interrupted ({signal.Signals(signum).name}); nothing half-written was kept{hint}",
              file=sys.stderr, flush=True)
        if argv is None:  # the fedhash command itself, not a caller in this process
            # should the exit itself stall (a library's exit handler waiting for ever), every thread's stack
            # goes to stderr and the process ends anyway (faulthandler's own thread: it needs no GIL)
            faulthandler.dump_traceback_later(EXIT_STALL_SECONDS, exit=True)
            _exit_if_held(code)
        return code
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())
