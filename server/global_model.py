"""The server's copy of the global hash function: its parameters (which the strategy aggregates), its
server-set buffers (pooled statistics or the DP projection: never averaged), the global prototypes,
and the silos that contributed to it."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from hashing import model
from hashing.config import Config
from hashing.federated import protocol as P
from hashing.hashers import Hasher, create_hasher


class GlobalModel:
    def __init__(self, cfg: Config, weights_id: str, feature_dim: int):
        # the same seeded start every node builds (client.site.global_model)
        self.hasher: Hasher = create_hasher(cfg.hasher_kind, **cfg.hasher_options(feature_dim))
        self.identity = model.identity(self.hasher, backbone=cfg.backbone, weights_id=weights_id, size=cfg.size)
        self.params, self.buffers = self.hasher.state()
        self.prototypes: torch.Tensor | None = None
        self.silos: dict[str, str] = {}  # silo name -> fingerprint of its sample ids

    def update(self, fn: Callable[[Hasher], None]) -> None:
        """Apply ``fn`` to the hasher holding the current state, then keep what it changed."""
        self.hasher.load_state(self.params, self.buffers)
        fn(self.hasher)
        self.params, self.buffers = self.hasher.state()

    def set_params(self, new: Mapping[str, torch.Tensor]) -> None:
        """The strategy's aggregate, in the parameters' own names, order and dtypes."""
        self.params = OrderedDict((k, new[k].to(v.dtype)) for k, v in self.params.items())

    def globals(self) -> "OrderedDict[str, torch.Tensor]":
        return P.globals_state(self.buffers, self.prototypes)

    def content(self, cfg: Config, server_round: int, **flags: Any) -> RecordDict:
        """A message's content: the global parameters, the server-set buffers and prototypes, the config."""
        return RecordDict({P.ARRAYS: ArrayRecord(self.params), P.GLOBALS: ArrayRecord(self.globals()),
                           P.CONFIG: ConfigRecord(P.round_config(cfg.to_json(), server_round, **flags))})

    def version(self) -> str:
        return model.version_of(self.params, self.buffers, self.identity)

    def record(self, *, privacy: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The model record (hashing.model's one format) of the current global function."""
        return model.record(self.params, self.buffers, self.identity, privacy=privacy, extra=extra)

    def restore(self, params: Mapping, buffers: Mapping, prototypes, silos: Mapping[str, str]) -> None:
        """The state of a checkpoint (numpy arrays), in this model's names and dtypes."""
        self.params = OrderedDict((k, torch.as_tensor(params[k]).to(v.dtype)) for k, v in self.params.items())
        self.buffers = OrderedDict((k, torch.as_tensor(buffers[k]).to(v.dtype)) for k, v in self.buffers.items())
        self.prototypes = None if prototypes is None else torch.as_tensor(prototypes)
        self.silos = dict(silos)
        self.hasher.load_state(self.params, self.buffers)
