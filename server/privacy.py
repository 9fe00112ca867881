"""Client-level differential privacy: Flower's DP strategy wrappers, and the accounting for them.

The privacy unit is one silo: its whole update in every round (``dp = "client"``). Each round the
update of every sampled silo is clipped to L2 norm ``dp-clip`` (on the server, or on the client by
:func:`client.mods.train_clipping_mod`), the clipped updates are averaged, and Gaussian noise
of std ``noise * clip / n`` is added to the mean (n = sampled silos). The neighbouring relation is
"zero-out" (one silo's contribution replaced by nothing, the number of silos fixed and public), the
usual one for DP-FedAvg: the mean's sensitivity is ``clip / n``, so a round is a Gaussian mechanism
with noise multiplier ``noise``, and the rounds compose (PRV, Opacus's accountant; no sampling
amplification; see :func:`client_level_epsilon`).

**With few silos client-level DP is weak.** Each silo's whole update is one unit, so the noise
needed for a meaningful ε is large *compared with the signal*: with 5 silos the noise std on the
mean is ``noise * clip / 5`` while one silo moves the mean by up to ``clip / 5``, and ε grows with
about sqrt(rounds). What :func:`client_level_epsilon` gives for 10 rounds, 5 silos, δ = 1e-5
(every silo in every round, no amplification):

    noise 0.5: ε ≈ 46.2     noise 1: ε ≈ 17.9     noise 2: ε ≈ 7.52     noise 4: ε ≈ 3.35

(Google's dp_accounting PLD accountant gives the same within 1 %; RDP, the cross-check, says 48.8, 19.1,
8.08, 3.62; ten rounds are one Gaussian mechanism of noise/sqrt(10); ε = 8 needs noise ≈ 1.9, ε = 1
noise ≈ 11.9). At noise 4 the noise std on every coordinate of the mean
is 4 x clip / 5, four times the largest norm one silo's whole update can move the mean by, every
round (the noise vector's norm is sqrt(#parameters) times larger still): training at
single-digit ε with 5 silos costs much accuracy. Sample-level DP (one image,
``dp = "sample"``) is the guarantee that fits a handful of large silos.

Aggregation under ``dp = "client"``: FedAvg weights silos by their number of examples, which would
give a big silo a sensitivity larger than ``clip / n`` while Flower calibrates the noise to
``clip / n``. :func:`wrap_strategy` therefore needs a strategy that averages the (clipped)
updates with equal weights, and allows only strategies whose aggregate is that mean (FedAvg,
FedProx; ``server.strategies.make_strategy`` builds them so): the others (server momentum or adaptive optimisers, median, trimmed mean, Krum) add the
noise after a non-linear step or keep un-noised state, and Flower's calibration does not hold.
"""
from __future__ import annotations

from collections.abc import Sequence

from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from hashing.config import Config
from hashing.errors import ConfigError
from hashing.federated.protocol import UNIT_WEIGHT
from hashing.privacy.accountant import epsilon

ACCOUNTANT = "PRV (Opacus PRVAccountant; RDP cross-check), Gaussian mechanism per round, no sampling amplification"
DP_STRATEGIES = ("fedavg", "fedprox")
WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}


def clipped_count_stddev(noise: float, num_sampled_clients: int) -> float:
    """Std of the noise on the count of clipped updates (adaptive clipping).

    Flower's default ``num_sampled_clients / 20`` (Andrew et al.) needs ``noise < num_sampled / 10``
    (0.5 for 5 silos) and is refused above; fedhash uses ``max(num_sampled / 20, noise)``, with
    which the update's own noise multiplier is at most ``noise / sqrt(3/4)`` (15 % above ``noise``)."""
    return max(num_sampled_clients / 20.0, float(noise))


def wrap_strategy(strategy: fl.Strategy, cfg: Config, num_sampled_clients: int) -> fl.Strategy:
    """``strategy`` inside the Flower DP wrapper that ``cfg.dp_clipping`` names, when ``cfg.dp`` is
    "client"; else ``strategy`` itself.

    Noise multiplier ``cfg.dp_noise``, clipping norm ``cfg.dp_clip`` (the initial one for the
    adaptive wrappers, which then track the median update norm: target quantile 0.5, rate 0.2).
    Flower's own accountant is not used (:func:`client_level_epsilon` does the accounting). The
    inner strategy must average the replies with equal weights (see the module docstring)."""
    if cfg.dp != "client":
        return strategy
    if cfg.strategy not in DP_STRATEGIES:
        raise ConfigError(f"config: 'dp' is \"client\" with strategy = {cfg.strategy!r}; Flower's client-level DP "
                          f"noise is calibrated to a plain mean of the updates: use one of {', '.join(DP_STRATEGIES)}")
    if num_sampled_clients < 1:
        raise ConfigError(f"client-level DP needs at least one sampled silo per round, not {num_sampled_clients}")
    if getattr(strategy, "weighted_by_key", None) != UNIT_WEIGHT:
        raise ConfigError(f"client-level DP needs a strategy that averages with equal weights, not "
                          f"{type(strategy).__name__}; build it with server.strategies.make_strategy")
    if cfg.secagg:  # distributed DP: the silos clip and noise their own updates (hashing.privacy.distributed)
        return strategy
    cls = WRAPPERS[cfg.dp_clipping]
    if cfg.dp_clipping.endswith("fixed"):
        return cls(strategy, cfg.dp_noise, cfg.dp_clip, num_sampled_clients)
    return cls(strategy, cfg.dp_noise, num_sampled_clients, initial_clipping_norm=cfg.dp_clip,
               clipped_count_stddev=clipped_count_stddev(cfg.dp_noise, num_sampled_clients))


def update_noise(cfg: Config, num_sampled_clients: int) -> float:
    """The noise multiplier of the Gaussian noise Flower adds to the mean update (std = this * clip / n).

    Fixed clipping: ``cfg.dp_noise``. Adaptive clipping: read back from the wrapper, which raises it
    to ``(z^-2 - (2 s)^-2)^-1/2`` (z = ``dp_noise``, s = :func:`clipped_count_stddev`) so that the
    update and the noised count of clipped updates *together* cost what one Gaussian of multiplier z
    costs (Andrew et al. 2021, Theorem 1)."""
    if cfg.dp_clipping.endswith("fixed"):
        return float(cfg.dp_noise)
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        fl.FedAvg(), cfg.dp_noise, num_sampled_clients, initial_clipping_norm=cfg.dp_clip,
        clipped_count_stddev=clipped_count_stddev(cfg.dp_noise, num_sampled_clients))
    return float(wrapper.noise_multiplier)


def effective_noise(cfg: Config, num_sampled_clients: int) -> float:
    """The noise multiplier one round's release is accounted at (one Gaussian mechanism of it).

    Fixed clipping: ``cfg.dp_noise``. Adaptive clipping: also ``cfg.dp_noise``, *not* the larger
    multiplier on the update (:func:`update_noise`): the round releases the update (noise
    ``update_noise``) and the noised count of clipped updates (std s, sensitivity 1/2 under zero-out
    with the number of silos public), and ``update_noise^-2 + (2 s)^-2 = dp_noise^-2``, so the pair
    is exactly as private as one Gaussian of multiplier ``dp_noise``. Accounting at the update's
    own multiplier would forget the count and under-report ε. Raises ``ConfigError`` if the wrapper
    refuses the settings."""
    try:
        z_update = update_noise(cfg, num_sampled_clients)
    except ValueError as e:
        raise ConfigError(f"config: client-level DP with {cfg.dp_clipping} clipping: {e}") from e
    if cfg.dp_clipping.endswith("fixed"):
        return z_update
    s = clipped_count_stddev(cfg.dp_noise, num_sampled_clients)
    return float((z_update ** -2 + (2.0 * s) ** -2) ** -0.5)  # == cfg.dp_noise, from the wrapper's numbers


def client_level_epsilon(history: Sequence[Sequence[float]], delta: float, num_silos: int) -> float:
    """ε (at ``delta``) of the Gaussian releases in ``history``, the privacy unit one silo.

    ``history``: entries ``(noise_multiplier, sample_rate, steps)``, one per round (and one
    ``(sigma_m, 1.0, 1)`` for a one-off Gaussian release such as the feature moments). Composed by
    ``hashing.privacy.accountant.epsilon`` (the tighter of Opacus's PRV and RDP bounds).

    The sample rate of every entry is taken as 1.0 (no amplification by sampling), whatever the
    entry says: Flower samples a fixed number of silos chosen by the server, which is neither the
    Poisson sampling the RDP amplification bound assumes nor secret from the server that sees who
    replied, so claiming amplification (q = sampled / ``num_silos``) would overstate the privacy.
    ``num_silos`` is kept for that reason only (a silo sampled in fewer rounds than the run has is
    still accounted for every round it could have been in).
    """
    if num_silos < 1:
        raise ValueError(f"num_silos is {num_silos}; it must be at least 1")
    return epsilon([(z, 1.0, steps) for z, _q, steps in history], delta)
