"""The server's round loop. Each round r:

1. ``train``: the strategy samples silos and sends the global parameters, the server-set buffers and
   (supervised) the global class prototypes. When round r-1 is due for evaluation, each silo first
   scores the model it received (its query split against its own database) and returns that mAP
   with its update, so evaluation costs no message phase of its own; silos the strategy did not
   sample get an ``evaluate`` message. The strategy aggregates the replies.
2. The statistics phase (``server.pooling``): exact pooled BatchNorm statistics and prototypes, or
   under DP the post-processing of the one release of feature moments (made before round 1).
3. The privacy ledger (``server.ledger``), then an atomic checkpoint (``server.checkpoint``).

After the last round every silo builds its index (``server.indexing``) and the final model is
written as ``model.pt`` (``hashing.model``'s one format) beside the checkpoints.
"""
from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from hashing import atomic
from hashing.backbones import backbone_identity
from hashing.config import SECAGG_REFUSED, Config
from hashing.errors import TrainingError
from hashing.federated import protocol as P
from hashing.model import write_record

from . import checkpoint as ckpt
from . import privacy
from .global_model import GlobalModel
from .indexing import build_indexes
from .ledger import Ledger
from .link import Link, silo_of
from .pooling import pooling_for
from .secagg import SecureAggregation, plain_sum, summed_reply
from .strategies import make_strategy, restore_strategy_state, strategy_state

log = logging.getLogger("fedhash.server")

RoundHook = Callable[[dict], None]


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM: ``simulations.engine`` raises it from the grid in the
    ServerApp's thread). The federation writes ``"status": "interrupted"`` with its last complete round;
    its checkpoints are whole (each is written atomically), so ``--resume`` continues after that round."""


class Federation:
    """One federated run on the server."""

    def __init__(self, grid: Grid, cfg: Config, *, scenario: Mapping[str, Any] | None = None,
                 on_round: RoundHook | None = None, print_status: bool = False):
        self.cfg, self.scenario, self.on_round = cfg, dict(scenario or {}), on_round
        self.print_status = print_status  # a `flwr run`: each progress write also goes to the run's log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        weights_id, dim = backbone_identity(cfg.backbone, cfg.weights or None, cfg.cache_dir or None)
        self.model = GlobalModel(cfg, weights_id, dim)
        self.strategy = privacy.wrap_strategy(make_strategy(cfg), cfg, cfg.num_silos)
        self.ledger = Ledger(cfg)
        self.link = Link(grid, round_timeout=cfg.round_timeout, min_nodes=cfg.min_train_nodes, kept=self._kept)
        self.link.on_phase = self._phase
        self.secagg = SecureAggregation(cfg, self.link, self._kept) if cfg.secagg else None
        self.pooling = pooling_for(cfg, self.model, self.ledger, self.secagg)
        self.phase, self.round_in_flight, self.t_start = "start-up", 0, time.time()
        self.history: list[dict] = []
        self.libraries = ckpt.library_versions()  # once per run, for every checkpoint and model.pt
        notice = ckpt.disk_notice(cfg, sum(t.numel() * t.element_size() for t in
                                           [*self.model.params.values(), *self.model.buffers.values()]))
        if notice:  # before the run starts: what its checkpoints will take on disk (keep-checkpoints)
            log.warning("%s", notice)
        self.start_round = 1
        if cfg.resume:
            self._resume()

    # ---------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_run = time.perf_counter()
        try:
            node_ids = self.link.wait_for_nodes()
            if self.start_round == 1:
                self.pooling.start(self.link, self.model, node_ids)
            t_rounds = time.perf_counter()
            self.startup_seconds = t_rounds - t_run
            for r in range(self.start_round, cfg.num_server_rounds + 1):
                t0 = time.perf_counter()
                node_ids = self.link.node_ids()
                prev = self.history[-1] if self.history else None
                due = prev is not None and "mean_map" not in prev and prev["round"] % cfg.eval_every == 0
                evaluation, rec = self.train_round(r, evaluate_previous=due, node_ids=node_ids)
                t1 = time.perf_counter()
                rec |= self.pooling.after_round(self.link, self.model, r, node_ids)
                share = (rec["secagg_silos"], rec["clients_sent"]) if self.secagg is not None else (None, None)
                rec |= self.ledger.after_round(*share) | {"model_version": self.model.version()}
                t2 = time.perf_counter()
                rec |= {"seconds": t2 - t0, "seconds_train": t1 - t0, "seconds_stats": t2 - t1}
                if evaluation is not None and prev is not None:
                    prev |= evaluation
                self.history.append(rec)
                self._save(r)
                self._write_progress("running")
                if self.on_round:
                    self.on_round(rec | {"out_dir": str(self.out), "last_map": (prev or {}).get("mean_map")})
            t_idx = time.perf_counter()
            indexes, scores = build_indexes(self.link, self.model, cfg, self.link.node_ids(),
                                            self.ledger.public(len(self.history)))
            if self.history:
                self.history[-1] |= _scores(scores) | {"evaluated": len(scores), "evaluated_of": len(scores),
                                                       "seconds_index": time.perf_counter() - t_idx}
                self._save(self.history[-1]["round"])  # the last checkpoint, now with its evaluation
            write_record(self.out / "model.pt", self._model_record())
        except (Interrupted, KeyboardInterrupt) as e:
            self._write_progress("interrupted", reason=str(e) or type(e).__name__)
            raise
        except Exception as e:
            self._write_progress("failed", error=f"{type(e).__name__}: {e}")
            raise
        result = {"model_version": self.model.version(), "indexes": indexes, "seconds": time.perf_counter() - t_run,
                  "seconds_startup": self.startup_seconds, "seconds_rounds": t_idx - t_rounds}
        self._write_progress("done", **result)
        return result

    # ---------------------------------------------------------------- one round's training

    def train_round(self, server_round: int, evaluate_previous: bool = False,
                    node_ids: list[int] | None = None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Round ``server_round``'s training; with ``evaluate_previous``, also the evaluation of the
        global model the silos received (round ``server_round - 1``'s), from the same replies plus
        an ``evaluate`` message to the nodes in ``node_ids`` that did not train. The silos that train are
        ``fraction-train`` of ``node_ids`` (at least ``min-train-nodes``), those that score the model
        ``fraction-evaluate`` of them: seeded samples by silo name (:func:`sample_silos`)."""
        cfg, model = self.cfg, self.model
        connected = list(node_ids) if node_ids else self.link.node_ids()
        names = {n: self.link.last.get(str(n), {}).get("silo") for n in connected}
        chosen = sample_silos(names, max(int(len(connected) * cfg.fraction_train), cfg.min_train_nodes), cfg.seed,
                              server_round, "train")
        scored = set(sample_silos(names, math.ceil(len(connected) * cfg.fraction_evaluate), cfg.seed, server_round,
                                  "evaluate")) if evaluate_previous else set()
        config = ConfigRecord(P.round_config(cfg.to_json(), server_round, evaluate=evaluate_previous))
        # fewer silos than min-train-nodes: the real grid, whose sampling waits for more to connect, as Flower's does
        shown = _Shown(self.link.grid, chosen) if len(connected) >= cfg.min_train_nodes else self.link.grid
        msgs = list(self.strategy.configure_train(server_round, ArrayRecord(model.params), config, shown))
        if evaluate_previous and not scored >= {m.metadata.dst_node_id for m in msgs}:
            # the silos outside the evaluation sample train without scoring the model first
            quiet = RecordDict(dict(msgs[0].content.items()))
            quiet[P.CONFIG] = ConfigRecord(P.round_config(cfg.to_json(), server_round, evaluate=False))
            msgs = [m if m.metadata.dst_node_id in scored else
                    Message(content=quiet, message_type=m.metadata.message_type, dst_node_id=m.metadata.dst_node_id)
                    for m in msgs]
        glob = ArrayRecord(model.globals())
        label = f"r{server_round}-train"
        contents = {id(m.content): m.content for m in msgs}.values()  # Flower's strategies share one among them
        for content in contents:
            content[P.GLOBALS] = glob
            if self.secagg is not None:  # the silos reply with their masked weighted updates
                keyed = self.secagg.attach(content, [m.metadata.dst_node_id for m in msgs], label, server_round)
                msgs = [m for m in msgs if m.metadata.dst_node_id in keyed]
        ok = self.link.send(msgs, "train", server_round, require="training")
        silos = [silo_of(m)[P.SILO_NAME] for m in ok]
        reports = [P.read_train_metrics(m.content[P.METRICS]) for m in ok]
        evaluation = None
        if evaluate_previous:  # model.params is still the model the silos evaluated
            scores = {s: r.evaluation for s, r in zip(silos, reports) if r.evaluation is not None}
            sampled = {m.metadata.dst_node_id for m in msgs}
            rest = [n for n in connected if n not in sampled and n in scored]
            evaluation = _scores(scores | (self._evaluate(server_round - 1, rest) if rest else {}))
            evaluation |= {"evaluated": len(evaluation["map"]), "evaluated_of": len(connected)}
        self.ledger.record_replies(ok)
        secure = {}
        if self.secagg is not None:  # the strategy aggregates the one sum the server learns
            total = self.secagg.unmask(label, msgs, ok, server_round, "train")
            secure = {"secagg_silos": len(total.contributors), "secagg_dropped": total.dropped,
                      "secagg_bytes_up": total.bytes_up, "secagg_bytes_down": total.bytes_down,
                      "secagg_setups": self.secagg.setups, "secagg_setup_bytes": self.secagg.setup_bytes}
        elif cfg.strategy not in SECAGG_REFUSED and cfg.dp != "client":  # the same sum, of replies in the clear
            total = plain_sum(cfg, len(msgs), ok, P.ARRAYS, server_round, "train", model.params)
        else:  # a robust rule, or Flower's client-level DP wrapper: each reply of its own
            total = None
        if total is not None:
            n_sum = sum(r.num_examples for m, r in zip(ok, reports) if int(m.metadata.src_node_id) in total.contributors)
            agg, _ = self.strategy.aggregate_train(server_round, [summed_reply(model.params, total, n_sum)])
        else:
            agg, _ = self.strategy.aggregate_train(server_round, ok)
        if agg is None:
            raise TrainingError(f"round {server_round}: the {cfg.strategy} strategy returned no model; "
                                "see the log for the replies it rejected")
        model.set_params(agg.to_torch_state_dict())
        n = np.array([r.num_examples for r in reports], dtype=float)
        return evaluation, {
            "round": server_round, "clients_connected": len(connected), "clients_sent": len(msgs),
            "clients_ok": len(ok), "clients_failed": len(msgs) - len(ok),
            "train_loss": float(np.average([r.loss for r in reports], weights=n)),
            "train_bit_balance": float(np.average([r.bit_balance for r in reports], weights=n)),
            "client_seconds_max": float(max(r.seconds for r in reports)),
            "bytes_down": int(sum(r.bytes_down for r in reports)), "bytes_up": int(sum(r.bytes_up for r in reports)),
            "trained": silos,
        } | secure

    def _evaluate(self, server_round: int, node_ids: list[int]) -> dict[str, tuple[float, float]]:
        """The ``evaluate`` message: each silo's (mAP, bit balance) under the current global model."""
        msgs = self.link.messages(node_ids, P.MSG_EVALUATE, self.model.content(self.cfg, server_round))
        ok = self.link.send(msgs, "evaluate", server_round)
        return {silo_of(m)[P.SILO_NAME]: P.read_evaluation(m.content[P.METRICS]) for m in ok}

    # ---------------------------------------------------------------- checkpoints and progress

    def _model_record(self) -> dict[str, Any]:
        rounds = self.history[-1]["round"] if self.history else 0
        return self.model.record(privacy=self.ledger.public(rounds),
                                 extra={"config": self.cfg.to_dict(), "silos": dict(self.model.silos),
                                        "rounds": rounds, "libraries": self.libraries})

    def _save(self, server_round: int) -> Path:
        return ckpt.save_checkpoint(
            self.out, server_round=server_round, model=self._model_record(),
            cfg=self.cfg, prototypes=None if self.model.prototypes is None else self.model.prototypes.numpy(),
            strategy_state=strategy_state(self.strategy), silos=self.model.silos, history=self.history,
            ledger=self.ledger.entries, scenario=self.scenario)

    def _kept(self) -> str:
        last = ckpt.latest_checkpoint(self.out)
        return (f"the last checkpoint ({last}) is kept; fix the silos and rerun with resume=true" if last
                else "no checkpoint was written yet")

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            log.warning("resume=true but %s holds no checkpoint; starting at round 1", ckpt.checkpoint_dir(self.out))
            return
        rec = ckpt.load_checkpoint(path)
        ckpt.check_resume(rec, self.cfg, self.model.identity, path)
        self.model.restore(rec["params"], rec["buffers"], rec["prototypes"], rec["silos"])
        restore_strategy_state(self.strategy, rec["strategy_state"])
        self.history = list(rec["history"])
        self.ledger = Ledger(self.cfg, rec.get("ledger", {}))
        self.pooling = pooling_for(self.cfg, self.model, self.ledger, self.secagg)
        self.start_round = int(rec["round"]) + 1
        log.info("resuming from %s: round %d of %d", path, self.start_round, self.cfg.num_server_rounds)

    def _phase(self, what: str, server_round: int) -> None:
        """A phase's messages are going out: the operator's view (fedhash status) says so."""
        if self.phase in ("done", "failed"):  # a search after the run (simulation) changes nothing here
            return
        self.phase, self.round_in_flight = what, server_round
        self._write_progress("running")

    def _write_progress(self, status: str, **extra: Any) -> None:
        now = time.time()
        if status != "running":
            self.phase = status
        done = self.history[-1]["round"] if self.history else 0  # the last complete round (its checkpoint)
        if status == "interrupted":  # the round in flight is lost; --resume continues after `done`
            lost = done + 1 if done < self.cfg.num_server_rounds else None  # None: stopped while indexing
            extra = {"round_in_flight": lost, "last_checkpoint_round": done} | extra
        view = {"status": status, "round": done if status == "interrupted" else self.round_in_flight,
                "num_server_rounds": self.cfg.num_server_rounds,
                "phase": self.phase, "started_at": self.t_start, "updated_at": now,
                "elapsed_seconds": round(now - self.t_start, 1), "sites": self.link.last,
                "n_failures": len(self.link.failures), "last_failures": self.link.failures[-5:]}
        atomic.write_json(self.out / "federation.json", view | {
            "config": self.cfg.to_dict(), "scenario": self.scenario, "rounds": self.history,
            "silos": self.model.silos, "failures": self.link.failures, "model_version": self.model.version(),
            "privacy": self.ledger.guarantee(self.history[-1]["round"] if self.history else 0), **extra})
        if self.print_status:  # into the run's log, which `flwr log` (fedhash status --federation) reads
            print(P.log_line(P.STATUS_MARK, view | {"out_dir": str(self.out)}), flush=True)

    # tests and tools read these
    @property
    def params(self):
        return self.model.params

    @property
    def failures(self) -> list[dict]:
        return self.link.failures


class _Shown:
    """The grid as the strategy sees it for one round's training: only the silos fedhash sampled."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def sample_silos(names: Mapping[int, str | None], k: int, seed: int, server_round: int, what: str) -> list[int]:
    """``k`` of the nodes ``names`` (node id -> silo name, None where no reply named it yet), drawn from the run's
    seed, the round and ``what`` by silo name, not by node id (ids change from run to run), so that the same
    scenario samples the same silos; all of them when ``k`` reaches their number. In silo-name order."""
    order = sorted(names, key=lambda n: (names[n] is None, names[n] or "", n))
    if k >= len(order):
        return order
    rng = np.random.default_rng([int(seed), int(server_round), zlib.crc32(what.encode())])
    return [order[i] for i in sorted(rng.choice(len(order), size=max(1, int(k)), replace=False))]


def _scores(scores: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """An evaluation record: each silo's mAP, their mean and the mean bit balance."""
    out: dict[str, Any] = {"map": {k: v[0] for k, v in sorted(scores.items())}}
    if scores:
        out["mean_map"] = float(np.mean([v[0] for v in scores.values()]))
        out["bit_balance"] = float(np.mean([v[1] for v in scores.values()]))
    return out
