"""Sample-level differential privacy for CroVCA: a DP-valid head and objective, the one release of
feature moments it starts from, Opacus DP-SGD, and the accounting (Opacus's RDP accountant).

Why a different head and objective. Opacus clips per-sample gradients, which bounds one image's
influence only if the loss is a sum of per-image terms. Published CroVCA is not: its BatchNorm
normalises each sample with the batch's statistics, and its coding-rate term is a logdet over the
whole batch, so changing one image changes every other image's "per-sample" gradient
(``tests/test_dp.py`` shows it). Under sample-level DP fedhash trains :class:`DPHashCoder`:

    x  ->  x / ||x||  ->  (x - c) @ P  ->  A u  ->  (h - 0) / s  =  z,        code = 1[z > 0]

* ``c``, ``P`` (d x p) and ``s`` are frozen buffers. ``c`` and ``P`` (the top-p principal axes)
  come from the feature mean and covariance that every silo releases once, through the Gaussian
  mechanism, before training (:func:`release_moments`); ``s`` (the scale of each bit) follows from
  the same released covariance and the current ``A`` (post-processing, no further release).
* ``A`` (K x p) is the only trainable tensor. It starts as ITQ's rotation fitted on samples drawn
  from the released moments (:func:`dp_itq`), so the head starts where the DP-ITQ baseline ends.
* The objective is a sum over images (:class:`DPCroVCALoss`): CroVCA's cross-view BCE between the
  two views of the image, minus ``lam`` times the marginal coding-rate gain of each view's
  normalised code against a frozen reference covariance (the codes' correlation under the released
  covariance): ``1/2 log(1 + alpha * zh^T (I + Corr/eps)^-1 zh)``, ``alpha = K/eps``.

Every mechanism that reads private data is composed in the silo's accountant: the moments release
(one Gaussian mechanism, ``sample_rate`` 1) and every DP-SGD step (Poisson-subsampled Gaussian).
No Flower here; the client and server call these functions.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codes import check_bits, logits_to_codes
from .errors import ConfigError, DataError, TrainingError
from .loss import bit_balance

ACCOUNTANT = "opacus-rdp"
MECHANISM = "DP-SGD (Opacus, Poisson sampling, per-sample clipping) + Gaussian release of feature moments"
MOMENT_SENSITIVITY = math.sqrt(2.0)  # ||[x, vec(x x^T)]|| for ||x|| = 1: add/remove one image
DP_BUFFERS = ("center", "basis", "basis_cov")  # the DP head's frozen buffers the server sets


# --------------------------------------------------------------------------- the head


class Project(nn.Module):
    """Frozen: L2-normalise each feature row, subtract ``center``, project on ``basis`` (d x p).
    ``basis_cov`` (p x p) is the released covariance in that basis, kept for the objective."""

    federated_buffers = True  # exchanged as globals although the module has no trainable parameter

    def __init__(self, d: int, p: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("basis", torch.eye(d, p))
        self.register_buffer("basis_cov", torch.eye(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=-1) - self.center) @ self.basis


class Standardize(nn.Module):
    """Frozen per-bit standardisation ``(h - running_mean) / sqrt(running_var + eps)``: the same
    buffers (names, meaning) as BatchNorm in eval mode, but never computed from a batch."""

    federated_buffers = True
    renorm = False  # the flag hashing.coder.batch_renorm sets; a frozen standardisation has nothing to renormalise

    def __init__(self, k: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(k))
        self.register_buffer("running_var", torch.ones(k))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.running_mean) / torch.sqrt(self.running_var + self.eps)


class DPHashCoder(nn.Module):
    """The hash head under sample-level DP (see the module docstring). Same interface as
    :class:`hashing.coder.HashCoder`: ``net`` ends in the normalisation, ``norm`` is that layer."""

    variant = "dp-linear"

    def __init__(self, in_dim: int, bits: int, dims: int = 256):
        super().__init__()
        self.bits = check_bits(bits)
        self.in_dim = int(in_dim)
        if not self.bits <= int(dims) <= self.in_dim:
            raise ConfigError(f"dp-dims = {dims} must lie between the code length ({self.bits}) and the feature "
                              f"dimension ({self.in_dim}); set dp-dims in that range")
        self.hidden = int(dims)
        lin = nn.Linear(self.hidden, self.bits, bias=False)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[:, : self.bits] = torch.eye(self.bits)
        self.net = nn.Sequential(Project(self.in_dim, self.hidden), lin, Standardize(self.bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def norm(self) -> Standardize:
        return self.net[-1]

    @property
    def rotation(self) -> nn.Parameter:
        return self.net[1].weight

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, bits={self.bits}, variant={self.variant!r}, dims={self.hidden}"


def offending_modules(model: nn.Module) -> list[str]:
    """'name (Type)' of every module Opacus cannot clip per sample (BatchNorm, LSTM, ...)."""
    from opacus.validators import ModuleValidator

    validators = ModuleValidator.VALIDATORS
    out = []
    for name, m in model.named_modules():
        # Opacus looks validators up by exact type; walk the MRO so subclasses (BatchRenorm1d) are caught too
        check = next((validators[t] for t in type(m).__mro__ if t in validators), None)
        if check is not None and check(m):
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def check_per_sample(model: nn.Module) -> None:
    """Refuse a model with a module that couples the samples of a batch (per-sample clipping breaks)."""
    bad = offending_modules(model)
    if bad:
        raise ConfigError(f"module {bad[0]} mixes the samples of a batch, so per-sample clipping does not bound one "
                          "image's influence; train under DP with the DP head (dp = \"sample\" builds it)")


# --------------------------------------------------------------------------- the moments release


def row_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"features must be (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms <= 0).any():
        raise DataError("features hold NaN/inf or all-zero rows; re-extract them (fedhash caches them per backbone)")
    return x / norms


def release_moments(x: np.ndarray, noise_multiplier: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sum and sum of outer products of the row-normalised features ``x`` (n, d), each with Gaussian
    noise of std ``noise_multiplier * sqrt(2)`` (the L2 sensitivity of the pair to adding or removing
    one image). ``count`` is released as is: the silo's size is public, as in DP-SGD's sample rate."""
    if noise_multiplier < 0:
        raise ConfigError(f"moments noise multiplier {noise_multiplier} must be >= 0")
    xn = row_normalise(x)
    n, d = xn.shape
    std = float(noise_multiplier) * MOMENT_SENSITIVITY
    s1 = xn.sum(0)
    s2 = xn.T @ xn
    if std > 0:
        s1 = s1 + rng.normal(0.0, std, d)
        e = np.triu(rng.normal(0.0, std, (d, d)))
        s2 = s2 + e + np.triu(e, 1).T  # one draw per distinct entry: the matrix stays symmetric
    return {"count": np.array([n], np.float64), "sum": s1, "outer": s2}


def pooled_moments(released: Iterable[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance, count) of the union from the silos' released moments."""
    released = list(released)
    if not released:
        raise DataError("no silo released its feature moments; at least one silo must answer")
    n = float(sum(float(r["count"][0]) for r in released))
    if n < 2:
        raise DataError(f"the silos hold {n:.0f} images in all; DP training needs at least 2")
    mean = sum(np.asarray(r["sum"], np.float64) for r in released) / n
    outer = sum(np.asarray(r["outer"], np.float64) for r in released) / n
    cov = outer - np.outer(mean, mean)
    return mean, (cov + cov.T) / 2, int(n)


def dp_itq(mean: np.ndarray, cov: np.ndarray, bits: int, dims: int, seed: int = 0,
           samples: int = 20000, iterations: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA plus ITQ from released moments: (basis d x dims, its covariance dims x dims, rotation bits x bits).

    The rotation is ITQ's (FAISS ``ITQMatrix``) fitted on ``samples`` Gaussian draws with the released
    variances of the top ``bits`` components: post-processing of the release, no private data."""
    import faiss

    from .baselines import faiss_threads

    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0.0, None), v[:, order]
    basis = np.ascontiguousarray(v[:, :dims])
    basis_cov = np.diag(w[:dims])
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((samples, bits)) * np.sqrt(np.maximum(w[:bits], 1e-12))).astype(np.float32)
    with faiss_threads():
        itq = faiss.ITQMatrix(bits)
        itq.max_iter = iterations
        itq.seed = int(seed)
        itq.train(y)
    rot = faiss.vector_to_array(itq.A).reshape(bits, bits).astype(np.float64)
    return basis, basis_cov, rot


def init_dp_head(head: DPHashCoder, mean: np.ndarray, cov: np.ndarray, seed: int = 0) -> None:
    """Set the DP head's frozen buffers and start its rotation at DP-ITQ's, from released moments."""
    basis, basis_cov, rot = dp_itq(mean, cov, head.bits, head.hidden, seed)
    proj = head.net[0]
    with torch.no_grad():
        proj.center.copy_(torch.as_tensor(mean, dtype=proj.center.dtype))
        proj.basis.copy_(torch.as_tensor(basis, dtype=proj.basis.dtype))
        proj.basis_cov.copy_(torch.as_tensor(basis_cov, dtype=proj.basis_cov.dtype))
        head.rotation.zero_()
        head.rotation[:, : head.bits] = torch.as_tensor(rot, dtype=head.rotation.dtype)
    restandardize(head)


def code_covariance(head: DPHashCoder) -> torch.Tensor:
    """(K, K) covariance of the pre-standardisation activations under the released covariance."""
    a = head.rotation.detach().double()
    return a @ head.net[0].basis_cov.double() @ a.T


def restandardize(head: DPHashCoder) -> None:
    """Set each bit's scale from the released covariance and the current rotation (post-processing).
    The mean is 0: the projection is centred on the released mean."""
    var = torch.diagonal(code_covariance(head)).clamp_min(1e-12)
    with torch.no_grad():
        head.norm.running_mean.zero_()
        head.norm.running_var.copy_(var.to(head.norm.running_var.dtype))


def reference_precision(head: DPHashCoder, eps: float) -> torch.Tensor:
    """(I + Corr / eps)^-1, Corr the codes' correlation matrix under the released covariance."""
    cov = code_covariance(head)
    s = torch.sqrt(torch.diagonal(cov).clamp_min(1e-12))
    corr = cov / (s[:, None] * s[None, :])
    return torch.linalg.inv(torch.eye(len(s), dtype=cov.dtype) + corr / eps).float()


# --------------------------------------------------------------------------- the objective


class DPCroVCALoss(nn.Module):
    """Per-image CroVCA for DP-SGD. ``input``: (B, V, K) logits of V >= 2 views of B images.

    loss_i = mean over ordered view pairs (a, b), a != b, and bits of BCE(z_a, 1[z_b > 0])
             - lam * mean over views of 1/2 log(1 + alpha * zh^T M zh),   zh = z / ||z||,

    ``M`` = :func:`reference_precision` (frozen for the round), ``alpha = K / eps``. Each term reads
    only image i's logits, so clipping its gradient bounds its influence. ``reduction`` is the
    attribute Opacus's ghost clipping sets to ``"none"`` to get the (B,) per-image losses."""

    def __init__(self, precision: torch.Tensor, lam: float = 0.1, eps: float = 0.05, reduction: str = "mean"):
        super().__init__()
        self.register_buffer("precision", precision)
        self.lam, self.eps, self.reduction = float(lam), float(eps), reduction

    def per_image(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 3 or z.shape[1] < 2:
            raise TrainingError(f"the DP objective needs (images, views >= 2, bits) logits, got {tuple(z.shape)}")
        b, v, k = z.shape
        t = (z > 0).to(z.dtype).detach()
        align = z.new_zeros(b)
        for i in range(v):
            for j in range(v):
                if i != j:
                    align = align + F.binary_cross_entropy_with_logits(z[:, i], t[:, j], reduction="none").mean(1)
        align = align / (v * (v - 1))
        zh = F.normalize(z, dim=-1)
        gain = 0.5 * torch.log1p((k / self.eps) * ((zh @ self.precision) * zh).sum(-1))  # (B, V)
        return align, gain.mean(1)

    def forward(self, z: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        align, gain = self.per_image(z)
        loss = align - self.lam * gain
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


# --------------------------------------------------------------------------- accounting


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


def epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """ε of a composition of (noise multiplier, sample rate, steps) entries: Opacus's RDP accountant."""
    hist = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not hist:
        return 0.0
    if any(s <= 0 for s, _, _ in hist):
        return math.inf
    return _rdp_epsilon(hist, float(delta))


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


def _calibrate(eps_at, target: float, max_noise: float) -> float:
    """The smallest sigma in [0.05, max_noise] (to 0.1 %) with eps_at(sigma) <= target: bisection in
    log sigma, since ε decreases as sigma grows. (Below 0.05 DP-SGD's ε is in the hundreds: a target
    that large gets 0.05, a guarantee stronger than asked.)"""
    lo, hi = 0.05, max_noise
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

    def eps_at(sigma: float) -> float:
        return epsilon([(moments_ratio * sigma, 1.0, 1), (sigma, q, steps * rounds)], delta)

    if target_epsilon > 0:
        floor = eps_at(max_noise)
        if floor > target_epsilon:
            raise ConfigError(f"target ε = {target_epsilon:g} cannot be reached for {silo} in {rounds} rounds: even the "
                              f"largest noise multiplier (dp-max-noise = {max_noise:g}) gives ε = {floor:.3g}; "
                              "raise dp-epsilon to at least that, or use fewer rounds, local epochs or a smaller batch")
        sigma = _calibrate(eps_at, target_epsilon, max_noise)
    else:
        if noise_multiplier <= 0:
            raise ConfigError("sample-level DP needs dp-epsilon > 0 or dp-noise > 0; set one of them")
        sigma = noise_multiplier
    return DPPlan(epsilon=eps_at(sigma), delta=delta, noise_multiplier=sigma, moments_noise=moments_ratio * sigma,
                  max_grad_norm=max_grad_norm, sample_rate=q, steps_per_round=steps, rounds=rounds, n=n)


# --------------------------------------------------------------------------- DP-SGD


def train_dp_head(head: DPHashCoder, views: np.ndarray, p: DPPlan, **kw) -> dict:
    """Local epochs of DP-SGD on the head's rotation with Opacus (Poisson sampling, per-image clipping
    at ``p.max_grad_norm``, Gaussian noise ``p.noise_multiplier``). ``views``: (n, V, d) cached views.
    Keywords: lr, lr_min, weight_decay, lam, eps, local_epochs, batch_size, seed, grad_sample_mode
    ("ghost", Opacus's ghost clipping, or "hooks"), progress.

    Returns the loss, bit balance, and the accountant's history of this call (Opacus's own record of
    the steps it took: what the silo's ε composes)."""
    with warnings.catch_warnings():  # Opacus warns about secure_mode and its backward hooks on every call
        warnings.simplefilter("ignore")
        return _train_dp_head(head, views, p, **kw)


def _train_dp_head(head: DPHashCoder, views: np.ndarray, p: DPPlan, *, lr: float, lr_min: float,
                   weight_decay: float, lam: float, eps: float, local_epochs: int, batch_size: int, seed: int,
                   grad_sample_mode: str = "ghost", progress: bool = False) -> dict:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    n, v, d = views.shape
    if v < 2:
        raise ConfigError("the DP objective needs at least 2 cached views per image; raise views")
    check_per_sample(head)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head.train()
    crit = DPCroVCALoss(reference_precision(head, eps), lam=lam, eps=eps)
    params = [head.rotation]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    idx = TensorDataset(torch.arange(n))
    loader = DataLoader(idx, batch_size=min(batch_size, n))
    engine = PrivacyEngine(accountant="rdp")  # secure_mode off: seeded noise, reproducible simulations
    kw = dict(module=head, optimizer=opt, data_loader=loader, noise_multiplier=p.noise_multiplier,
              max_grad_norm=p.max_grad_norm, poisson_sampling=True, grad_sample_mode=grad_sample_mode)
    if grad_sample_mode == "ghost":
        model, opt, dpcrit, loader = engine.make_private(criterion=crit, **kw)
    else:
        model, opt, loader = engine.make_private(**kw)
        dpcrit = None
    total = local_epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.original_optimizer, T_max=max(total, 1), eta_min=lr_min)
    losses, balance, steps = [], [], 0
    bar = tqdm(total=total, desc="DP-SGD", leave=False, disable=not progress)
    for _ in range(local_epochs):
        for (bi,) in loader:
            bi = bi.numpy()
            if len(bi) == 0:  # an empty Poisson batch is still a step of the mechanism: noise only, accounted
                opt.zero_grad(set_to_none=True)
                for q_ in params:
                    q_.grad = torch.zeros_like(q_)
                    if grad_sample_mode != "ghost":
                        q_.grad_sample = q_.new_zeros((0, *q_.shape))
                opt.step()
                sched.step()
                steps += 1
                bar.update(1)
                continue
            a = rng.integers(0, v, size=len(bi))
            b = (a + rng.integers(1, v, size=len(bi))) % v
            sel = views[np.sort(bi)]
            x = torch.from_numpy(np.stack([sel[np.arange(len(bi)), a], sel[np.arange(len(bi)), b]], 1).astype(np.float32))
            opt.zero_grad(set_to_none=True)
            z = model(x)
            if dpcrit is not None:
                loss = dpcrit(z, torch.zeros(len(bi)))
                value = float(loss.loss_per_sample.detach().mean()) if hasattr(loss, "loss_per_sample") else loss.item()
            else:
                loss = crit(z)
                value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"the DP loss became {value} at step {steps}; lower lr or dp-clip")
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            losses.append(value)
            balance.append(bit_balance(z.unbind(1)))
            bar.update(1)
    bar.close()
    head.eval()
    hist = [(float(s), float(q), int(k)) for s, q, k in engine.accountant.history]
    if hasattr(model, "_close"):
        model._close()
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "bit_balance": float(np.mean(balance)) if balance else float("nan"), "steps": steps, "history": hist}


# --------------------------------------------------------------------------- DP baselines


def gaussian_noise_for(target_epsilon: float, delta: float, max_noise: float = 1e4) -> float:
    """Noise multiplier of one Gaussian mechanism (sample rate 1) with ε(δ) = target (Opacus RDP)."""
    if math.isinf(target_epsilon):
        return 0.0
    if epsilon([(max_noise, 1.0, 1)], delta) > target_epsilon:
        raise ConfigError(f"ε = {target_epsilon:g} needs a noise multiplier above {max_noise:g}; raise ε")
    return _calibrate(lambda s: epsilon([(s, 1.0, 1)], delta), target_epsilon, max_noise)


@dataclass
class LinearCodes:
    """sign(R P^T (x / ||x|| - c)): the DP baselines' hash function on raw features."""

    center: np.ndarray
    projection: np.ndarray  # (d, bits)

    @property
    def bits(self) -> int:
        return self.projection.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        return logits_to_codes((row_normalise(x) - self.center) @ self.projection)


def dp_itq_baseline(silo_features: Sequence[np.ndarray], bits: int, target_epsilon: float, delta: float,
                    seed: int = 0) -> tuple[LinearCodes, float]:
    """DP-ITQ: every silo releases its feature moments once through the Gaussian mechanism with the whole
    budget ε (each silo's own guarantee), the sums are pooled, and PCA plus ITQ is fitted on samples
    drawn from them (post-processing). Returns the hash and the noise multiplier used."""
    sigma = gaussian_noise_for(target_epsilon, delta)
    rng = np.random.default_rng([seed, 11])
    released = [release_moments(x, sigma, rng) for x in silo_features]
    mean, cov, _ = pooled_moments(released)
    basis, _, rot = dp_itq(mean, cov, bits, bits, seed)
    return LinearCodes(mean, basis @ rot.T), sigma


def dp_lsh_baseline(silo_features: Sequence[np.ndarray], bits: int, target_epsilon: float, delta: float,
                    seed: int = 0) -> tuple[LinearCodes, float]:
    """LSH: a random orthonormal projection (data-independent), centred on the feature mean released
    through the Gaussian mechanism (sensitivity 1 for unit rows) with the whole budget ε."""
    sigma = gaussian_noise_for(target_epsilon, delta)
    rng = np.random.default_rng([seed, 13])
    d = np.asarray(silo_features[0]).shape[1]
    total = sum(row_normalise(x).sum(0) + rng.normal(0.0, sigma, d) for x in silo_features)
    n = sum(len(x) for x in silo_features)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, bits)))
    return LinearCodes(total / n, q), sigma
