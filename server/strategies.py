"""The aggregation rule, from the run config, out of Flower's own strategies."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import strategy as fl

from hashing.config import STRATEGIES, Config
from hashing.errors import ConfigError
from hashing.federated import protocol as P

OPT_STATE = ("m_t", "v_t")  # server-side optimiser moments of FedAdam / FedYogi / FedAdagrad
MOMENTUM = "momentum_vector"  # FedAvgM's server momentum (a list of arrays)


class _EqualWeights:
    """A FedAvg-style strategy that averages the replies' arrays with equal weights: every reply is
    given the metric ``dp-unit-weight`` = 1 before the strategy's own aggregation, which weighs by it
    (``weighted_by_key``). Client-level DP needs it: Flower calibrates its noise to a plain mean of the
    clipped updates, and weighting by size would give a big silo a larger sensitivity. The server sets
    the weight, not the silos: a silo could claim any weight."""

    def __init__(self, **kw: Any):
        super().__init__(weighted_by_key=P.UNIT_WEIGHT, **kw)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for m in replies:
            if not m.has_error():
                for rec in m.content.metric_records.values():
                    rec[P.UNIT_WEIGHT] = 1
        return super().aggregate_train(server_round, replies)


class EqualWeightFedAvg(_EqualWeights, fl.FedAvg):
    """FedAvg averaging the updates with equal weights (client-level DP)."""


class EqualWeightFedProx(_EqualWeights, fl.FedProx):
    """FedProx averaging the updates with equal weights (client-level DP)."""


def make_strategy(cfg: Config) -> fl.Strategy:
    """FedAvg (default), FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg or Krum.

    ``server-lr`` 0 keeps each strategy's own default rate (FedAvgM 1.0, the FedOpt family 0.1).
    Under client-level DP, FedAvg and FedProx average with equal weights (:class:`_EqualWeights`).

    Flower's evaluate path is not used (fedhash runs its own per-silo evaluation),
    so ``fraction_evaluate`` is 0 for all of them. Nor is Flower's sampling (``random.sample`` of the
    node ids, unseeded, and the ids differ from run to run): the strategy trains every node it is shown,
    and the federation shows it ``fraction-train`` of the silos, drawn from the run's seed by silo name
    (``server.federation.sample_silos``), so that a scenario with sampling reproduces.
    """
    common: dict[str, Any] = dict(fraction_train=1.0, fraction_evaluate=0.0,
                                  min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=0,
                                  min_available_nodes=cfg.min_train_nodes)
    name = cfg.strategy
    equal = cfg.dp == "client"
    if name == "fedavg":
        return EqualWeightFedAvg(**common) if equal else fl.FedAvg(**common)
    if name == "fedavgm":
        return fl.FedAvgM(**common, server_learning_rate=cfg.server_lr or 1.0, server_momentum=cfg.server_momentum)
    if name == "fedprox":
        return (EqualWeightFedProx if equal else fl.FedProx)(**common, proximal_mu=cfg.proximal_mu)
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        cls = {"fedadam": fl.FedAdam, "fedyogi": fl.FedYogi, "fedadagrad": fl.FedAdagrad}[name]
        return cls(**common, eta=cfg.server_lr or 0.1, eta_l=cfg.lr, tau=cfg.server_tau)
    if name == "fedmedian":
        return fl.FedMedian(**common)
    if name == "fedtrimmedavg":
        return fl.FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    if name == "krum":
        return fl.Krum(**common, num_malicious_nodes=cfg.krum_malicious)
    raise ConfigError(f"strategy '{name}' is unknown; use one of {', '.join(STRATEGIES)}")


def strategy_state(strategy: fl.Strategy) -> dict[str, dict[str, np.ndarray]]:
    """What a strategy carries between rounds (the server optimiser's moments), for checkpoints.

    Flower's strategies have no state API; these are their public attributes (``m_t``, ``v_t`` of the
    FedOpt family, FedAvgM's ``momentum_vector``). ``tests/test_federated.py`` fails if they move."""
    out = {}
    for attr in OPT_STATE:
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            out[attr] = {k: np.asarray(v) for k, v in value.items()}
    momentum = getattr(strategy, MOMENTUM, None)
    if isinstance(momentum, list):
        out[MOMENTUM] = {f"{i:04d}": np.asarray(v) for i, v in enumerate(momentum)}
    return out


def restore_strategy_state(strategy: fl.Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    for attr, value in state.items():
        if attr in OPT_STATE:
            setattr(strategy, attr, {k: np.asarray(v) for k, v in value.items()})
        elif attr == MOMENTUM and hasattr(strategy, MOMENTUM):
            setattr(strategy, attr, [np.asarray(value[k]) for k in sorted(value)])
