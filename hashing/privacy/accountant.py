"""Accounting: what a silo's sample-level guarantee rests on, and ε from a tight accountant.

Every mechanism that reads a silo's private data is composed in its accountant: the one release of
feature moments (a Gaussian mechanism, sample rate 1) and every DP-SGD step (Poisson-subsampled
Gaussian). :func:`epsilon` is the tighter of two upper bounds on ε(δ): Opacus's PRV accountant (the
privacy-loss random variables composed numerically, Gopi et al. 2021; its upper estimate, error 0.01)
and Opacus's RDP accountant (:func:`rdp_epsilon`, kept as the cross-check every report prints beside
it). At the dp-demo's settings PRV gives 7.22 where RDP gives 8.00. :func:`plan` turns a target ε into
the noise multipliers for the whole run before anything trains, with that same ε. ``tests/test_dp.py``
checks both against Google's dp-accounting (PLD within 1 %, RDP).
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Config
from ..errors import ConfigError, DataError

ACCOUNTANT = "opacus-prv (RDP cross-check)"
PRV_EPS_ERROR = 0.01  # the PRV accountant's error bound on ε; its upper estimate is what fedhash reports
PRV_ABOVE = 100.0     # beyond this RDP ε the PRV accountant is not asked (slow there, and tightness moot)
MECHANISM = "DP-SGD (Opacus, Poisson sampling, per-sample clipping) + Gaussian release of feature moments"


@dataclass(frozen=True)
class DPPlan:
    """What a silo's sample-level guarantee rests on, fixed before training."""

    epsilon: float            # planned for the whole run (all rounds, the moments release included)
    delta: float
    noise_multiplier: float   # DP-SGD
    moments_noise: float      # the moments release
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    n: int

    def history(self, rounds: int | None = None) -> list[tuple[float, float, int]]:
        r = self.rounds if rounds is None else int(rounds)
        return [(self.moments_noise, 1.0, 1)] + ([(self.noise_multiplier, self.sample_rate, self.steps_per_round * r)]
                                                 if r else [])


def _history(history: Sequence[Sequence[float]]) -> tuple[tuple[float, float, int], ...] | None:
    """The entries that ran, those of one (noise, sample rate) merged into one entry of all their steps
    (composition does not depend on the order; a ledger adds one entry per round, and the PRV
    accountant's cost grows with the entries). None: one ran without noise, ε is infinite."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if int(n) > 0:
            steps[(float(s), float(q))] = steps.get((float(s), float(q)), 0) + int(n)
    if any(s <= 0 for s, _ in steps):
        return None
    return tuple((s, q, n) for (s, q), n in sorted(steps.items()))


def epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """ε(δ) of a composition of (noise multiplier, sample rate, steps) entries: the tighter of Opacus's PRV
    and RDP accountants' upper bounds."""
    hist = _history(history)
    if hist is None:
        return math.inf
    if not hist:
        return 0.0
    rdp = _rdp_epsilon(hist, float(delta))
    return min(rdp, _prv_epsilon(hist, float(delta))) if rdp < PRV_ABOVE else rdp


def rdp_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """ε(δ) from Opacus's RDP accountant alone: the cross-check printed beside :func:`epsilon`."""
    hist = _history(history)
    if hist is None:
        return math.inf
    return _rdp_epsilon(hist, float(delta)) if hist else 0.0


@functools.lru_cache(maxsize=4096)
def _prv_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus's PRV accountant's upper estimate of ε (inf where it cannot say: RDP then holds)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(hist)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, RuntimeError, FloatingPointError, OverflowError):
        return math.inf


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Memoised: the server reports the same ledger in the round record, the checkpoint and
    federation.json, and each evaluation takes about 0.1 s per silo."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(hist)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": only at very large ε
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta))


def steps_per_epoch(n: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) of Opacus's Poisson data loader built from a DataLoader of n
    images in batches of ``batch_size``: ``len(loader)`` = ceil(n / batch) steps, sample rate 1/that."""
    steps = max(1, math.ceil(n / min(batch_size, n)))
    return 1.0 / steps, steps


def check_delta(delta: float, n: int, silo: str = "the silo") -> None:
    if not 0 < delta < 1.0 / n:
        raise ConfigError(f"dp-delta = {delta:g} is not below 1/N = 1/{n} for {silo} (N images): a delta that large "
                          f"allows releasing whole images; set dp-delta below {1.0 / n:.2g}, e.g. 1e-5")


def _calibrate(eps_at, target: float, max_noise: float, lo: float = 0.05) -> float:
    """The smallest sigma in [lo, max_noise] (to 0.1 %) with eps_at(sigma) <= target: bisection in
    log sigma, since ε decreases as sigma grows. (Below 0.05 DP-SGD's ε is in the hundreds: a target
    that large gets 0.05, a guarantee stronger than asked.)"""
    hi = max_noise
    if eps_at(lo) <= target:
        return lo
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps_at(mid) > target else (lo, mid)
    return hi


@functools.lru_cache(maxsize=256)
def plan(n: int, *, target_epsilon: float, delta: float, noise_multiplier: float, max_grad_norm: float,
         batch_size: int, local_epochs: int, rounds: int, moments_ratio: float, max_noise: float,
         silo: str = "the silo") -> DPPlan:
    """The silo's noise multipliers for the whole run.

    With ``target_epsilon`` > 0 the DP-SGD multiplier sigma is the smallest that keeps ε(δ) of the
    whole run (moments release at ``moments_ratio * sigma``, then rounds x steps of DP-SGD) at the
    target; a target that needs sigma above ``max_noise`` is refused, naming the smallest reachable ε.
    With ``target_epsilon`` 0, ``noise_multiplier`` is used as given."""
    if n < 2:
        raise DataError(f"{silo} has {n} training images; DP training needs at least 2")
    check_delta(delta, n, silo)
    if max_grad_norm <= 0:
        raise ConfigError(f"dp-clip = {max_grad_norm:g} must be > 0 (the per-image gradient norm bound)")
    if moments_ratio <= 0:
        raise ConfigError(f"dp-moments-ratio = {moments_ratio:g} must be > 0")
    q, spe = steps_per_epoch(n, batch_size)
    steps = spe * local_epochs

    def hist(sigma: float) -> list[tuple[float, float, int]]:
        return [(moments_ratio * sigma, 1.0, 1), (sigma, q, steps * rounds)]

    def eps_at(sigma: float) -> float:
        return epsilon(hist(sigma), delta)

    if target_epsilon > 0:
        floor = eps_at(max_noise)
        if floor > target_epsilon:
            raise ConfigError(f"target ε = {target_epsilon:g} cannot be reached for {silo} in {rounds} rounds: even the "
                              f"largest noise multiplier (dp-max-noise = {max_noise:g}) gives ε = {floor:.3g}; "
                              "raise dp-epsilon to at least that, or use fewer rounds, local epochs or a smaller batch")
        # RDP's sigma first (fast): the tight ε is at most RDP's, so the tight sigma lies at or below it
        sigma_rdp = _calibrate(lambda s: rdp_epsilon(hist(s), delta), target_epsilon, max_noise)
        lo = sigma_rdp
        while lo > 0.05 and eps_at(lo) <= target_epsilon:
            lo = max(0.05, lo / 1.5)
        sigma = _calibrate(eps_at, target_epsilon, sigma_rdp, lo=lo)
    else:
        if noise_multiplier <= 0:
            raise ConfigError("sample-level DP needs dp-epsilon > 0 or dp-noise > 0; set one of them")
        sigma = noise_multiplier
    return DPPlan(epsilon=eps_at(sigma), delta=delta, noise_multiplier=sigma, moments_noise=moments_ratio * sigma,
                  max_grad_norm=max_grad_norm, sample_rate=q, steps_per_round=steps, rounds=rounds, n=n)


def silo_plan(cfg: Config, n: int, silo: str = "the silo") -> DPPlan:
    """A silo's sample-level DP plan for the whole run (noise multipliers from the target ε) for its
    ``n`` training images."""
    return plan(int(n), target_epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, noise_multiplier=cfg.dp_noise,
                max_grad_norm=cfg.dp_clip, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                rounds=cfg.num_server_rounds, moments_ratio=cfg.dp_moments_ratio, max_noise=cfg.dp_max_noise,
                silo=silo)


def gaussian_noise_for(target_epsilon: float, delta: float, max_noise: float = 1e4) -> float:
    """Noise multiplier of one Gaussian mechanism (sample rate 1) with ε(δ) = target (:func:`epsilon`)."""
    if math.isinf(target_epsilon):
        return 0.0
    if epsilon([(max_noise, 1.0, 1)], delta) > target_epsilon:
        raise ConfigError(f"ε = {target_epsilon:g} needs a noise multiplier above {max_noise:g}; raise ε")
    return _calibrate(lambda s: epsilon([(s, 1.0, 1)], delta), target_epsilon, max_noise)
