"""The privacy ledger: every release each silo's data went into, and the guarantee that follows.

Sample-level DP (``dp = "sample"``): each silo reports the mechanisms it ran on its data (the moments
release, Opacus's record of its DP-SGD steps); its ε composes them in Opacus's PRV accountant, with
RDP's ε beside it as a cross-check (``hashing.privacy.accountant``).
Client-level DP (``dp = "client"``): the unit is one silo's whole update; the ledger holds one entry
for the server's moments release and one per round (``server.privacy``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message

from hashing.config import Config
from hashing.errors import TrainingError
from hashing.federated import protocol as P
from hashing.privacy import accountant, distributed

from . import privacy
from .link import silo_of

FEDERATION = "federation"  # the ledger's one entry under client-level DP


class Ledger:
    def __init__(self, cfg: Config, entries: Mapping[str, list] | None = None):
        self.cfg = cfg
        # silo name (or "federation") -> [[noise multiplier, sample rate, steps], ...] of every release
        self.entries: dict[str, list[list[float]]] = {k: [list(e) for e in v] for k, v in (entries or {}).items()}

    def record_replies(self, replies: Iterable[Message]) -> None:
        """Sample-level DP: each silo's own record of the mechanisms it ran goes into the ledger."""
        if self.cfg.dp != "sample":
            return
        for m in replies:
            got = P.read_releases(m.content[P.METRICS])
            if got is None:
                raise TrainingError(f"silo {silo_of(m)[P.SILO_NAME]} trained without reporting its DP steps; "
                                    "every silo must run the same fedhash")
            self.entries.setdefault(silo_of(m)[P.SILO_NAME], []).extend(got)

    def record_server_release(self, contributors: int | None = None, silos: int | None = None) -> float:
        """Client-level DP: the one release of the silos' moments goes into the ledger; returns its noise
        multiplier. Distributed (secure aggregation): the noise shares of ``contributors`` of ``silos``."""
        sigma = self.cfg.dp_moments_ratio * privacy.effective_noise(self.cfg, self.cfg.num_silos)
        if contributors is not None:
            sigma = distributed.effective_multiplier(sigma, contributors, silos)
        self.entries.setdefault(FEDERATION, []).append([sigma, 1.0, 1])
        return sigma

    def after_round(self, contributors: int | None = None, silos: int | None = None) -> dict[str, Any]:
        """A round is over: client-level DP accounts its release (distributed: the noise shares of
        ``contributors`` of the ``silos`` the round's sum asked); the round record gets ε so far."""
        cfg = self.cfg
        if cfg.dp == "none":
            return {}
        if cfg.dp == "client":
            z = privacy.effective_noise(cfg, cfg.num_silos)
            if contributors is not None:
                z = distributed.effective_multiplier(z, contributors, silos)
            self.entries.setdefault(FEDERATION, []).append([z, 1.0, 1])
        g = self.guarantee(0)
        return {"epsilon": g["epsilon"], "epsilon_per_silo": g.get("epsilon_per_silo", {})}

    def guarantee(self, rounds_done: int) -> dict[str, Any]:
        """The guarantee so far: mechanism, unit, ε per silo (or per federation), δ, noise, clipping, accountant."""
        cfg = self.cfg
        if cfg.dp == "none":
            return {"unit": "none", "epsilon": math.inf}
        if cfg.dp == "sample":
            eps = {k: accountant.epsilon(v, cfg.dp_delta) for k, v in sorted(self.entries.items())}
            rdp = {k: accountant.rdp_epsilon(v, cfg.dp_delta) for k, v in sorted(self.entries.items())}
            last = {k: v[-1] for k, v in self.entries.items() if len(v) > 1}
            return {"unit": "sample (one image)", "mechanism": accountant.MECHANISM, "accountant": accountant.ACCOUNTANT,
                    "delta": cfg.dp_delta, "epsilon": max(eps.values()) if eps else 0.0, "epsilon_per_silo": eps,
                    "epsilon_rdp": max(rdp.values()) if rdp else 0.0,
                    "target_epsilon": cfg.dp_epsilon or None, "max_grad_norm": cfg.dp_clip,
                    "noise_multiplier": {k: v[0] for k, v in last.items()},
                    "sample_rate": {k: v[1] for k, v in last.items()},
                    "steps": {k: int(sum(e[2] for e in v[1:])) for k, v in self.entries.items()},
                    "moments_noise": {k: v[0][0] for k, v in self.entries.items() if v},
                    "rounds": rounds_done, "ledger": self.entries}
        hist = self.entries.get(FEDERATION, [])
        return {"unit": "client (one silo's whole update)",
                "mechanism": ("distributed: each silo clips its update to a fixed norm and adds its share of the "
                              "Gaussian noise; secure aggregation" if cfg.secagg
                              else f"Flower {cfg.dp_clipping} clipping + Gaussian noise"),
                "accountant": privacy.ACCOUNTANT, "delta": cfg.dp_delta,
                "epsilon": privacy.client_level_epsilon(hist, cfg.dp_delta, cfg.num_silos) if hist else 0.0,
                "epsilon_rdp": accountant.rdp_epsilon([(z, 1.0, n) for z, _q, n in hist], cfg.dp_delta) if hist else 0.0,
                "noise_multiplier": privacy.effective_noise(cfg, cfg.num_silos), "clipping_norm": cfg.dp_clip,
                "clipping": cfg.dp_clipping, "silos": cfg.num_silos, "rounds": rounds_done,
                "ledger": {FEDERATION: hist}}

    def public(self, rounds_done: int) -> dict[str, Any]:
        """The guarantee without the ledger itself: what indexes and model files carry."""
        return {k: v for k, v in self.guarantee(rounds_done).items() if k != "ledger"}
