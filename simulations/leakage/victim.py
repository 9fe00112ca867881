"""The victim's side of the lab: the exact messages a silo sends, made by the code a ClientApp runs.

:func:`lab` builds the federation as its server holds it: every silo's data (the node's own
``client.site.silo_features``) and the global model it sends: a trained one (a federation's
``model.pt``, with the prototypes its statistics phase gives, supervised), or round 1's: the seeded model
(``client.site.global_model``) after the round-0 statistics phase made of the silos' own replies
(``client.site.local_stats`` pooled by ``hashing.federated.pooling``, as ``server.pooling`` does; under DP
the silos' moments releases, as ``server.pooling.MomentsPooling`` does).

:func:`observe` runs one silo's round on a chosen set of its training images with the silo's own
``client.site.local_train`` (the same local epochs, batches, views, AdamW and, under ``dp = "sample"``,
the same Opacus DP-SGD with the silo's own accountant) and, under client-level DP, the ClientApp's own
client-side clipping (``client.mods.train_clipping_mod``'s Flower function). What the server receives is the returned
parameters, the reply's metrics and the statistics reply (``client.site.local_stats``) of the same
images; the lab attacks only that (:class:`Observation`). What the attacks never see (the views the
update was computed on, the images, their ids) is kept apart in :class:`Truth`, for scoring.

No training is re-implemented here; one hook only *records* the two views each step drew
(``Hasher.view_batch``), so that recovery is scored against the features the update was computed on.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from flwr.supercore.differential_privacy import compute_clip_model_update

from client import site
from hashing.config import Config
from hashing.errors import ConfigError
from hashing.federated import pooling
from hashing.hashers import Hasher, Inputs
from hashing.privacy import release
from hashing.silos import make_silo, source_dataset
from hashing.train import Schedule


@dataclass
class Lab:
    """The federation as the (curious) server holds it before a round: the config, the global model it
    sends (parameters and server-set buffers) and, for the lab only, every silo's data."""

    cfg: Config
    silos: list[site.SiloData]
    model: Hasher
    prototypes: np.ndarray | None = None

    @property
    def feature_dim(self) -> int:
        return self.silos[0].feature_dim


def check_model(cfg: Config, model: Hasher, feature_dim: int | None = None, what: str = "the model to attack") -> None:
    """A global model to attack must be of the kind, code length (and feature size) ``cfg`` trains."""
    want = (cfg.hasher_kind, cfg.bits, feature_dim)
    dim = getattr(model, "in_dim", None) or getattr(getattr(model, "head", None), "in_dim", None)  # LoRA: its head's
    got = (model.kind, model.bits, dim if feature_dim is not None else None)
    if got != want:
        on = f" on {got[2]} features" if feature_dim is not None else ""
        raise ConfigError(f"{what} is a {got[0]} head of {got[1]} bits{on}; the scenario trains a {want[0]} head of "
                          f"{want[1]} bits" + (f" on {want[2]}" if feature_dim is not None else "") +
                          ": give that scenario's model.pt")


def lab(cfg: Config, model: Hasher | None = None) -> Lab:
    """Every silo of ``cfg``'s federation and the global model the server sends: ``model`` (a trained global
    model, its server-set buffers included), else round 1's (the seeded model after the round-0 statistics)."""
    ds = source_dataset(cfg)
    silos = [site.silo_features(cfg, make_silo(ds, cfg, i)) for i in range(cfg.num_silos)]
    if model is not None:
        check_model(cfg, model, silos[0].feature_dim)
        out = Lab(cfg, silos, model)
        if cfg.supervised and model.pooling == "activations":  # the prototypes the server holds for this model
            out.prototypes = _prototypes(out, _pooled(out))
        return out
    out = Lab(cfg, silos, site.global_model(cfg, silos[0].feature_dim))
    start_statistics(out)
    return out


def _pooled(lb: Lab) -> dict[str, np.ndarray]:
    """The silos' statistics replies under the lab's model, summed (``hashing.federated.pooling``)."""
    return pooling.pool([site.local_stats(lb.cfg, s, lb.model) for s in lb.silos])


def _prototypes(lb: Lab, pooled: dict[str, np.ndarray]) -> np.ndarray | None:
    return pooling.global_prototypes(lb.model, pooled) if pooled["class_count"].size else None


def start_statistics(lb: Lab) -> None:
    """The round-0 statistics phase from the silos' own replies (``server.pooling``'s arithmetic)."""
    cfg, model = lb.cfg, lb.model
    if model.pooling == "moments":
        released = [site.release_moments(cfg, s)[0] for s in lb.silos]  # each silo's own release
        if cfg.dp != "sample":  # client level: the silos' exact means, noised once by the server
            from server.ledger import Ledger  # the server's own release and its record
            released = [release.server_release(released, Ledger(cfg).record_server_release(), cfg.seed)]
        mean, cov, _ = release.pooled_moments(released)
        release.init_dp_head(model, mean, cov, seed=cfg.seed, axes=cfg.dp_axes)
        return
    pooled = _pooled(lb)
    mean, var = pooling.pooled_moments(pooled)
    pooling.set_bn_stats(model, mean, var)
    if cfg.supervised:
        lb.prototypes = _prototypes(lb, pooled)


@dataclass
class Observation:
    """What the server has after the victim's round: what it sent, what came back, and what it knows."""

    cfg: Config                      # the run's config (the server wrote it)
    server_round: int
    sent: "OrderedDict[str, torch.Tensor]"      # the global parameters it sent
    buffers: "OrderedDict[str, torch.Tensor]"   # the server-set buffers it sent
    received: "OrderedDict[str, torch.Tensor]"  # the parameters the silo replied with
    metrics: dict                    # the reply's metrics (num_examples, loss, bit balance, DP record)
    stats: dict[str, np.ndarray] | None = None  # the silo's statistics reply for the same images
    prototypes: np.ndarray | None = None        # the global prototypes it sent (supervised)

    @property
    def schedule(self) -> Schedule:
        """The round's learning-rate schedule: the server computes it from its own config."""
        return Schedule.federated_round(self.cfg, self.server_round)

    def delta(self, name: str) -> torch.Tensor:
        return (self.received[name].double() - self.sent[name].double())


@dataclass
class Truth:
    """What the server never sees: for scoring only."""

    positions: np.ndarray            # the victim images' positions in the silo's training split
    images: np.ndarray               # their indices into the silo's data set
    views: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per step: (xa, xb) (b, d)
    labels: np.ndarray | None = None


def restrict(data: site.SiloData, positions: np.ndarray) -> site.SiloData:
    """The silo as it is when this round's training set is the images at ``positions`` of its training split."""
    positions = np.asarray(positions, dtype=np.int64)
    sp = data.silo.splits
    if len(positions) == 0 or positions.min() < 0 or positions.max() >= len(sp.train):
        raise ConfigError(f"victim positions must lie in 0..{len(sp.train) - 1} (silo {data.name} trains on "
                          f"{len(sp.train)} images); choose fewer or other victims")
    train = sp.train[positions]
    silo = dataclasses.replace(data.silo, splits=dataclasses.replace(sp, train=train))
    inputs = data.inputs
    views = None if inputs.views is None else np.asarray(inputs.views[positions])
    return dataclasses.replace(data, silo=silo, inputs=Inputs(inputs.ds, train, inputs.size, clean=inputs.clean,
                                                               views=views))


def _recording(hasher: Hasher, truth: Truth):
    inner = hasher.view_batch

    def view_batch(inputs, idx, rng, g):
        xa, xb = inner(inputs, idx, rng, g)
        truth.views.append((xa.detach().numpy().copy(), xb.detach().numpy().copy()))
        return xa, xb
    return view_batch


def _client_clipped(sent, received, clipping_norm: float):
    """What ``client.mods.train_clipping_mod`` sends under client-side clipping: the reply's arrays with the
    update clipped by Flower's ``compute_clip_model_update`` to the server's (initial) clipping norm."""
    update = [v.numpy().copy() for v in received.values()]
    compute_clip_model_update(param1=update, param2=[v.numpy() for v in sent.values()], clipping_norm=clipping_norm)
    return OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in zip(received, update, strict=True))


def observe(lb: Lab, silo: int, positions, *, cfg: Config | None = None, server_round: int = 1,
            model: Hasher | None = None, with_stats: bool = True) -> tuple[Observation, Truth]:
    """Silo ``silo`` trains its round on the images at ``positions`` of its training split, as its ClientApp
    would (``cfg``: the run's config, default the lab's; ``model``: what the server sends, default the global
    model). Returns what the server receives, and the truth apart."""
    cfg = cfg or lb.cfg
    data = restrict(lb.silos[silo], positions)
    sent_model = model if model is not None else lb.model
    params, buffers = sent_model.state()
    hasher = copy.deepcopy(sent_model)  # the silo's fresh copy of the message's state
    truth = Truth(np.asarray(positions), data.silo.splits.train.copy(),
                  labels=data.train_labels.copy() if data.labels is not None else None)
    hasher.view_batch = _recording(hasher, truth)
    protos = lb.prototypes if cfg.supervised else None
    hist, planned = site.local_train(cfg, data, hasher, server_round, prototypes=protos)
    del hasher.view_batch
    received, _ = hasher.state()
    if cfg.dp == "client" and cfg.dp_clipping.startswith("client"):
        received = _client_clipped(params, received, cfg.dp_clip)
    metrics = {"num_examples": data.n_train, "loss": hist.loss, "steps": hist.steps}
    if planned is not None:
        metrics["epsilon_planned"] = planned
    stats = site.local_stats(cfg, data, sent_model) if with_stats and sent_model.pooling == "activations" else None
    obs = Observation(cfg, server_round, OrderedDict((k, v.detach().clone()) for k, v in params.items()),
                      OrderedDict((k, v.detach().clone()) for k, v in buffers.items()),
                      OrderedDict((k, v.detach().clone()) for k, v in received.items()), metrics, stats,
                      protos)
    return obs, truth
