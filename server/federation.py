"""The server's round loop: strategy aggregation, exact pooled BatchNorm statistics and global
prototypes, checkpoints with provenance, failure handling, per-silo evaluation and the final
per-silo indexes.

Each round r:
1. ``train``: the strategy samples silos and sends the global parameters, plus the
   BatchNorm statistics and (supervised) the global class prototypes in ``globals``.
   When round r-1 is due for evaluation, each silo first scores the model it received
   (round r-1's global model: its query split against its own database) and returns
   that mAP with its update, so evaluation costs no message phase of its own. The
   strategy aggregates the replies (the clients' trainable parameters).
2. ``query.stats``: every silo reports count / sum / sum of squares of the head's
   pre-BatchNorm activations of its clean training images and per-class sums under
   the new parameters; the server pools them into the exact BatchNorm statistics of
   the union and the prototypes.
3. checkpoint (atomic).
After the last round, ``query.index``: each silo saves its SiloIndex under the model version
and scores the final model; silos a round's training did not sample are evaluated with a
separate ``evaluate`` message.
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from hashing import atomic, dp, fedmodel, fedstats
from hashing.errors import TrainingError
from hashing.fedconfig import MSG_INDEX, MSG_STATS, FedConfig

from . import checkpoint as ckpt
from . import privacy
from .strategies import make_strategy, restore_strategy_state, strategy_state

log = logging.getLogger("fedhash.server")

RoundHook = Callable[[dict], None]


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    t0 = time.time()
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n:
            return ids
        if time.time() - t0 > timeout:
            raise TrainingError(f"only {len(ids)} of the {n} silos needed (min-train-nodes) connected within "
                                f"{timeout:.0f} s; start more SuperNodes or lower min-train-nodes")
        time.sleep(0.1)


def _score(metrics, balance_key: str = "bit-balance") -> tuple[float, float]:
    """(mAP, bit balance) of one silo's evaluation in a reply's metrics."""
    return float(metrics["map"]), float(metrics[balance_key])


def _silo(msg: Message) -> dict[str, str]:
    rec = msg.content.config_records.get("silo")
    return {k: str(v) for k, v in rec.items()} if rec is not None else {"name": f"node-{msg.metadata.src_node_id}"}


class Federation:
    """State of one federated run on the server."""

    def __init__(self, grid: Grid, cfg: FedConfig, *, scenario: Mapping[str, Any] | None = None,
                 on_round: RoundHook | None = None):
        self.grid, self.cfg, self.scenario = grid, cfg, dict(scenario or {})
        self.on_round = on_round
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.weights_id, dim = fedmodel.backbone_identity(cfg)
        model = fedmodel.build_model(cfg, dim)
        self.head = fedmodel.head_of(model)  # the server's copy, for pooled statistics and prototypes
        self.model = model
        self.params, self.buffers = fedmodel.split_state(model)
        self.prototypes: torch.Tensor | None = None
        self.strategy = make_strategy(cfg)
        if cfg.dp == "client":
            self.strategy = privacy.wrap_strategy(self.strategy, cfg, cfg.num_silos)
        # privacy ledger: silo name -> [(noise multiplier, sample rate, steps), ...] of every release
        self.ledger: dict[str, list[list[float]]] = {}
        self.history: list[dict] = []
        self.silos: dict[str, str] = {}
        self.start_round = 1
        self.failures: list[dict] = []
        if cfg.resume:
            self._resume()

    # ---------------------------------------------------------------- plumbing

    def _config(self, server_round: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"fedconfig": self.cfg.to_json(), "server-round": int(server_round), **extra})

    def _globals_state(self) -> "OrderedDict[str, torch.Tensor]":
        """BatchNorm buffers and, once pooled, the global prototypes."""
        g = OrderedDict(self.buffers)
        if self.prototypes is not None:
            g[fedmodel.PROTOTYPES] = self.prototypes
        return g

    def _messages(self, node_ids: Iterable[int], message_type: str, server_round: int, **extra: Any) -> list[Message]:
        """One message per node, all carrying the same content (built once, as Flower's strategies do)."""
        content = RecordDict({"arrays": ArrayRecord(self.params), "globals": ArrayRecord(self._globals_state()),
                              "config": self._config(server_round, **extra)})
        return [Message(content=content, message_type=message_type, dst_node_id=nid) for nid in node_ids]

    def _send(self, messages: list[Message], what: str, server_round: int) -> list[Message]:
        """Send, wait up to round-timeout, log every failure and timeout; return the good replies."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        # Replies arrive in whatever order the silos finish; aggregate in silo order instead, so that
        # float sums (FedAvg, pooled statistics) and with them the whole run are reproducible.
        ok = sorted((m for m in replies if not m.has_error()),
                    key=lambda m: (_silo(m)["name"], int(m.metadata.src_node_id)))
        answered = {m.metadata.src_node_id for m in replies}
        for m in replies:
            if m.has_error():
                self._failure(server_round, what, m.metadata.src_node_id, m.error.reason)
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self._failure(server_round, what, msg.metadata.dst_node_id,
                              f"no reply within round-timeout={self.cfg.round_timeout:.0f} s")
        return ok

    def _failure(self, server_round: int, what: str, node: int, reason: str) -> None:
        reason = " ".join(str(reason).split())
        log.warning("round %d %s: node %s failed: %s", server_round, what, node, reason[-500:])
        self.failures.append({"round": server_round, "phase": what, "node": int(node), "reason": reason[-2000:]})

    def _enough(self, ok: list[Message], sent: int, server_round: int, what: str) -> None:
        need = self.cfg.min_train_nodes
        if len(ok) < need:
            last = ckpt.latest_checkpoint(self.out)
            kept = f"the last checkpoint ({last}) is kept; fix the silos and rerun with resume=true" if last else \
                "no checkpoint was written yet"
            raise TrainingError(f"round {server_round} {what}: only {len(ok)} of {sent} silos replied, "
                                f"fewer than min-train-nodes={need}; the run stops here: {kept}")

    # ---------------------------------------------------------------- phases

    def pool_statistics(self, server_round: int, node_ids: list[int]) -> dict[str, Any]:
        """query.stats: exact pooled BatchNorm statistics and global prototypes under self.params."""
        msgs = self._messages(node_ids, MSG_STATS, server_round)
        ok = self._send(msgs, "stats", server_round)
        self._enough(ok, len(msgs), server_round, "statistics")
        stats = [{k: v.numpy() for k, v in m.content["stats"].to_torch_state_dict().items()} for m in ok]
        pooled = fedstats.pool(stats)
        mean, var = fedstats.pooled_moments(pooled)
        fedmodel.load_state(self.model, self.params, self.buffers)
        fedstats.set_bn_stats(self.head, mean, var)
        _, self.buffers = fedmodel.split_state(self.model)
        if self.cfg.supervised and pooled["class_count"].size:
            self.prototypes = torch.from_numpy(fedstats.global_prototypes(self.head, pooled))
        for m in ok:
            s = _silo(m)
            self.silos[s["name"]] = s.get("ids", "")
        up = sum(int(m.content["metrics"]["bytes-up"]) for m in ok)
        return {"stats_silos": len(ok), "stats_bytes_up": up, "pooled_count": float(pooled["count"][0])}

    def train_round(self, server_round: int, evaluate_previous: bool = False,
                    node_ids: list[int] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Round ``server_round``'s training; with ``evaluate_previous``, also the evaluation of the
        global model the silos received (round ``server_round - 1``'s), from the same replies plus
        an ``evaluate`` message to the nodes in ``node_ids`` the strategy did not sample."""
        cfg = self.cfg
        arrays = ArrayRecord(self.params)
        config = self._config(server_round, evaluate=bool(evaluate_previous))
        msgs = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        glob = ArrayRecord(self._globals_state())
        for m in msgs:  # Flower's strategies share one content among the messages; this sets it once per object
            m.content["globals"] = glob
        ok = self._send(msgs, "train", server_round)
        self._enough(ok, len(msgs), server_round, "training")
        silos = [_silo(m) for m in ok]
        mets = [m.content["metrics"] for m in ok]
        evaluation = None
        if evaluate_previous:  # self.params is still the model the silos evaluated
            scores = {s["name"]: _score(m, "eval-bit-balance") for s, m in zip(silos, mets)}
            sampled = {m.metadata.dst_node_id for m in msgs}
            rest = [n for n in (node_ids or []) if n not in sampled]
            evaluation = self._eval_record(scores | (self._evaluate(server_round - 1, rest) if rest else {}))
        self._record_releases(ok)
        agg, _ = self.strategy.aggregate_train(server_round, ok)
        if agg is None:
            raise TrainingError(f"round {server_round}: the {cfg.strategy} strategy returned no model; "
                                "see the log for the replies it rejected")
        new = agg.to_torch_state_dict()
        self.params = OrderedDict((k, new[k].to(v.dtype)) for k, v in self.params.items())
        n = np.array([float(m["num-examples"]) for m in mets])
        return evaluation, {
            "clients_sent": len(msgs), "clients_ok": len(ok), "clients_failed": len(msgs) - len(ok),
            "train_loss": float(np.average([float(m["train-loss"]) for m in mets], weights=n)),
            "train_bit_balance": float(np.average([float(m["bit-balance"]) for m in mets], weights=n)),
            "client_seconds_max": float(max(float(m["seconds"]) for m in mets)),
            "bytes_down": int(sum(int(m["bytes-down"]) for m in mets)),
            "bytes_up": int(sum(int(m["bytes-up"]) for m in mets)),
            "trained": [s["name"] for s in silos],
        }

    # ---------------------------------------------------------------- differential privacy

    def _record_releases(self, replies: list[Message]) -> None:
        """Sample-level DP: each silo's own record of the mechanisms it ran (Opacus's history of its steps,
        the moments release) goes into the server's ledger, from which its ε is computed."""
        if self.cfg.dp != "sample":
            return
        for m in replies:
            met = m.content["metrics"]
            if "dp-noise" not in met:
                raise TrainingError(f"silo {_silo(m)['name']} trained without reporting its DP steps; "
                                    "every silo must run the same fedhash")
            entries = zip(met["dp-noise"], met["dp-sample-rate"], met["dp-steps"])
            self.ledger.setdefault(_silo(m)["name"], []).extend([float(a), float(b), int(c)] for a, b, c in entries)

    def release_moments(self, node_ids: list[int]) -> dict[str, Any]:
        """Round 0 under DP: every silo's feature moments, released once (sample-level: noised by the silo;
        client-level: noised here, on their sum); the DP head's frozen projection and starting rotation
        (DP-ITQ) follow from them."""
        cfg = self.cfg
        msgs = self._messages(node_ids, MSG_STATS, 0)
        ok = self._send(msgs, "moments", 0)
        self._enough(ok, len(msgs), 0, "moments release")
        released = [{k: v.numpy() for k, v in m.content["stats"].to_torch_state_dict().items()} for m in ok]
        if cfg.dp == "sample":
            self._record_releases(ok)
        else:  # client level: the sum of the silos' means, noised once for the whole federation
            sigma_m = cfg.dp_moments_ratio * privacy.effective_noise(cfg, cfg.num_silos)
            rng = np.random.default_rng([cfg.seed, 7])
            std = sigma_m * dp.MOMENT_SENSITIVITY  # one silo's means move the sums by at most this / sigma_m
            d = len(released[0]["sum"])
            e = np.triu(rng.normal(0.0, std, (d, d)))
            released = [{"count": np.array([float(len(released))]),
                         "sum": sum(r["sum"] for r in released) + rng.normal(0.0, std, d),
                         "outer": sum(r["outer"] for r in released) + e + np.triu(e, 1).T}]
            self.ledger.setdefault("federation", []).append([sigma_m, 1.0, 1])
        mean, cov, _ = dp.pooled_moments(released)
        fedmodel.load_state(self.model, self.params, self.buffers)
        dp.init_dp_head(self.head, mean, cov, seed=cfg.seed)
        self.params, self.buffers = fedmodel.split_state(self.model)
        for m in ok:
            s = _silo(m)
            self.silos[s["name"]] = s.get("ids", "")
        return {"stats_silos": len(ok), "stats_bytes_up": sum(int(m.content["metrics"]["bytes-up"]) for m in ok)}

    def restandardize(self) -> dict[str, Any]:
        """Under DP, each round: the bits' scales from the released covariance (post-processing, no message)."""
        fedmodel.load_state(self.model, self.params, self.buffers)
        dp.restandardize(self.head)
        self.params, self.buffers = fedmodel.split_state(self.model)
        return {"stats_silos": 0, "stats_bytes_up": 0}

    def privacy(self, rounds_done: int) -> dict[str, Any]:
        """The guarantee so far: mechanism, unit, ε per silo (or per federation), δ, noise, clipping, accountant."""
        cfg = self.cfg
        if cfg.dp == "none":
            return {"unit": "none", "epsilon": float("inf")}
        if cfg.dp == "sample":
            eps = {k: dp.epsilon(v, cfg.dp_delta) for k, v in sorted(self.ledger.items())}
            last = {k: v[-1] for k, v in self.ledger.items() if len(v) > 1}
            return {"unit": "sample (one image)", "mechanism": dp.MECHANISM, "accountant": dp.ACCOUNTANT,
                    "delta": cfg.dp_delta, "epsilon": max(eps.values()) if eps else 0.0, "epsilon_per_silo": eps,
                    "target_epsilon": cfg.dp_epsilon or None, "max_grad_norm": cfg.dp_clip,
                    "noise_multiplier": {k: v[0] for k, v in last.items()},
                    "sample_rate": {k: v[1] for k, v in last.items()},
                    "steps": {k: int(sum(e[2] for e in v[1:])) for k, v in self.ledger.items()},
                    "moments_noise": {k: v[0][0] for k, v in self.ledger.items() if v},
                    "rounds": rounds_done, "ledger": self.ledger}
        hist = self.ledger.get("federation", [])
        return {"unit": "client (one silo's whole update)", "mechanism": f"Flower {cfg.dp_clipping} clipping + Gaussian noise",
                "accountant": privacy.ACCOUNTANT, "delta": cfg.dp_delta,
                "epsilon": privacy.client_level_epsilon(hist, cfg.dp_delta, cfg.num_silos) if hist else 0.0,
                "noise_multiplier": privacy.effective_noise(cfg, cfg.num_silos), "clipping_norm": cfg.dp_clip,
                "clipping": cfg.dp_clipping, "silos": cfg.num_silos, "rounds": rounds_done, "ledger": {"federation": hist}}

    def _evaluate(self, server_round: int, node_ids: list[int]) -> dict[str, tuple[float, float]]:
        """The ``evaluate`` message: each silo's (mAP, bit balance) under the current global model."""
        ok = self._send(self._messages(node_ids, MessageType.EVALUATE, server_round), "evaluate", server_round)
        return {_silo(m)["name"]: _score(m.content["metrics"]) for m in ok}

    @staticmethod
    def _eval_record(scores: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {"map": {k: v[0] for k, v in sorted(scores.items())}}
        if scores:
            out["mean_map"] = float(np.mean([v[0] for v in scores.values()]))
            out["bit_balance"] = float(np.mean([v[1] for v in scores.values()]))
        return out

    def build_indexes(self, node_ids: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every silo's index under the final model, and the final model's evaluation."""
        version = self.model_version()
        priv = {k: v for k, v in self.privacy(len(self.history)).items() if k != "ledger"}
        msgs = self._messages(node_ids, MSG_INDEX, self.cfg.num_server_rounds,
                              **{"model-version": version, "privacy": json.dumps(priv)})
        ok = self._send(msgs, "index", self.cfg.num_server_rounds)
        indexes, scores = {}, {}
        for m in ok:
            name, met = _silo(m)["name"], m.content["metrics"]
            indexes[name] = {"index": str(m.content["silo"]["index"]), "n": int(met["num-examples"]),
                             "map": float(met["map"])}
            scores[name] = _score(met)
        return indexes, self._eval_record(scores)

    def model_version(self) -> str:
        return fedmodel.version_of(self.params, self.buffers, self.cfg, self.weights_id)

    # ---------------------------------------------------------------- checkpoints

    def _save(self, server_round: int) -> Path:
        return ckpt.save_checkpoint(
            self.out, server_round=server_round, params={k: v.numpy() for k, v in self.params.items()},
            globals_={k: v.numpy() for k, v in self._globals_state().items()},
            strategy_state=strategy_state(self.strategy), model_version=self.model_version(), cfg=self.cfg,
            weights_id=self.weights_id, silos=self.silos, history=self.history, scenario=self.scenario,
            privacy=self.privacy(server_round))

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            log.warning("resume=true but %s holds no checkpoint; starting at round 1", ckpt.checkpoint_dir(self.out))
            return
        rec = ckpt.load_checkpoint(path)
        ckpt.check_resume(rec, self.cfg, self.weights_id, path)
        self.params = OrderedDict((k, torch.from_numpy(rec["params"][k]).to(v.dtype)) for k, v in self.params.items())
        g = rec["globals"]
        self.buffers = OrderedDict((k, torch.from_numpy(g[k]).to(v.dtype)) for k, v in self.buffers.items())
        self.prototypes = torch.from_numpy(g[fedmodel.PROTOTYPES]) if fedmodel.PROTOTYPES in g else None
        restore_strategy_state(self.strategy, rec["strategy_state"])
        self.history = list(rec["history"])
        self.silos = dict(rec["silos"])
        self.ledger = {k: [list(e) for e in v] for k, v in rec.get("privacy", {}).get("ledger", {}).items()}
        self.start_round = int(rec["round"]) + 1
        fedmodel.load_state(self.model, self.params, self.buffers)
        log.info("resuming from %s: round %d of %d", path, self.start_round, self.cfg.num_server_rounds)

    def _write_progress(self, status: str, **extra: Any) -> None:
        atomic.write_json(self.out / "federation.json", {
            "status": status, "config": self.cfg.to_dict(), "scenario": self.scenario, "rounds": self.history,
            "silos": self.silos, "failures": self.failures, "model_version": self.model_version(),
            "privacy": self.privacy(self.history[-1]["round"] if self.history else 0), **extra})

    # ---------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_run = time.perf_counter()
        node_ids = _wait_for_nodes(self.grid, cfg.min_train_nodes, cfg.round_timeout)
        try:
            if self.start_round == 1:
                self.release_moments(node_ids) if cfg.dp != "none" else self.pool_statistics(0, node_ids)
            t_rounds = time.perf_counter()
            self.startup_seconds = t_rounds - t_run
            for r in range(self.start_round, cfg.num_server_rounds + 1):
                t0 = time.perf_counter()
                node_ids = sorted(self.grid.get_node_ids())
                prev = self.history[-1] if self.history else None
                due = prev is not None and "mean_map" not in prev and prev["round"] % cfg.eval_every == 0
                rec: dict[str, Any] = {"round": r}
                evaluation, trained = self.train_round(r, evaluate_previous=due, node_ids=node_ids)
                rec |= trained
                t1 = time.perf_counter()
                rec |= self.restandardize() if cfg.dp != "none" else self.pool_statistics(r, node_ids)
                if cfg.dp == "client":
                    self.ledger.setdefault("federation", []).append([privacy.effective_noise(cfg, cfg.num_silos), 1.0, 1])
                if cfg.dp != "none":
                    priv = self.privacy(r)
                    rec |= {"epsilon": priv["epsilon"], "epsilon_per_silo": priv.get("epsilon_per_silo", {})}
                rec["model_version"] = self.model_version()
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
            indexes, final = self.build_indexes(sorted(self.grid.get_node_ids()))
            if self.history:
                self.history[-1] |= final | {"seconds_index": time.perf_counter() - t_idx}
                self._save(self.history[-1]["round"])  # the last checkpoint, now with its evaluation
        except Exception as e:
            self._write_progress("failed", error=f"{type(e).__name__}: {e}")
            raise
        result = {"model_version": self.model_version(), "indexes": indexes,
                  "seconds": time.perf_counter() - t_run, "seconds_startup": self.startup_seconds,
                  "seconds_rounds": t_idx - t_rounds}
        self._write_progress("done", **result)
        return result
