"""Sample-level differential privacy (hashing/privacy/): why the DP head exists (the influence test),
the accounting against independent accountants, noise calibration, the moments release, the DP
head's initialisation, DP-SGD with Opacus, and the refusals that keep a guarantee honest."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from torch import nn

from hashing.coder import HashCoder
from hashing.config import Config as FedConfig
from hashing.errors import ConfigError, ModelVersionError
from hashing.hashers import Inputs
from hashing.loss import crovca_loss
from hashing.privacy import accountant, objective, release
from hashing.privacy import head as dphead
from hashing.privacy.dpsgd import DPSGD
from hashing.train import Schedule, train


def train_dp_head(head, views, p, *, lr, lr_min, weight_decay, lam, eps, local_epochs, batch_size, seed,
                  grad_sample_mode="ghost"):
    """The one training loop under DP-SGD, as a silo runs it; its record as a dict."""
    cfg = FedConfig(supervised=False, batch_size=batch_size, weight_decay=weight_decay, lam=lam, eps=eps)
    hist = train(head, Inputs.of_features(views), cfg, Schedule(local_epochs, lr, lr_min, seed),
                 private=DPSGD(p, grad_sample_mode))
    return {"loss": hist.loss, "bit_balance": hist.bit_balance, "steps": hist.steps, "history": hist.releases}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

D, BITS, DIMS = 64, 16, 32
DELTA = 1e-5


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, cov, _ = release.pooled_moments([release.release_moments(x, 0.0, np.random.default_rng(0))])
    return mean, cov


def _low_rank(n: int, d: int = D, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Low-rank signal plus isotropic noise, off-centre (so that centring matters)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, rank)) * np.linspace(4.0, 1.5, rank)
    w = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
    return 3.0 * rng.standard_normal(d) / np.sqrt(d) + u @ w + 0.3 * rng.standard_normal((n, d))


def _dp_head(seed: int = 0) -> dphead.DPHashCoder:
    torch.manual_seed(seed)
    head = dphead.DPHashCoder(D, BITS, DIMS)
    mean, cov = _moments(_low_rank(600, seed=seed))
    release.init_dp_head(head, mean, cov, seed=seed)
    return head


# --------------------------------------------------------------------------- 1. the influence test


class _TwoViews(nn.Module):
    """HashCoder applied to each view of a (B, 2, d) batch separately (its BatchNorm sees B rows)."""

    def __init__(self, coder: HashCoder):
        super().__init__()
        self.coder = coder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.coder(x[:, 0]), self.coder(x[:, 1])], 1)


def _per_sample_grads(which: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus's per-sample gradients (GradSampleModule, hooks mode) of the batch loss."""
    from opacus import GradSampleModule

    if which == "dp":
        model = _dp_head()
        crit = objective.DPCroVCALoss(objective.reference_precision(model, 0.05), lam=0.1, eps=0.05, reduction="sum")

        def loss_of(z):
            return crit(z)
    else:
        torch.manual_seed(0)
        coder = HashCoder(D, BITS)
        coder.norm.weight.requires_grad_(False)  # only the Linear layers get Opacus grad samplers
        coder.norm.bias.requires_grad_(False)
        coder.train()
        model = _TwoViews(coder)

        def loss_of(z):
            return crovca_loss([z[:, 0], z[:, 1]])[0]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=False)
    loss_of(gsm(x)).backward()
    out = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    return out


@pytest.mark.parametrize("objective, others_change", [("dp", False), ("published", True)],
                         ids=["dp-objective-others-unchanged", "published-crovca-others-change"])
def test_influence_of_one_sample_on_the_others_per_sample_gradients(objective, others_change):
    """Change sample 0 of a batch: under the DP objective every other sample's per-sample gradient is
    untouched (clipping bounds one image's influence); under published CroVCA (BatchNorm + batch
    logdet) they all move, so per-sample clipping would not bound it."""
    torch.manual_seed(1)
    b = 8
    x = torch.randn(b, 2, D)
    x2 = x.clone()
    x2[0] = 3.0 * torch.randn(2, D)
    g, g2 = _per_sample_grads(objective, x), _per_sample_grads(objective, x2)
    assert g and all(t.shape[0] == b for t in g.values())
    # the changed sample's own gradient moves in both cases (the test is not vacuous)
    assert max(float((g[n][0] - g2[n][0]).abs().max()) for n in g) > 1e-4
    diff = max(float((g[n][1:] - g2[n][1:]).abs().max()) for n in g)
    if others_change:
        assert diff > 1e-4
    else:
        for n in g:
            assert float(g[n][1:].abs().max()) > 1e-6  # the others do have gradients
            torch.testing.assert_close(g[n][1:], g2[n][1:], atol=1e-6, rtol=0)


def test_dp_head_passes_the_per_sample_check_and_published_head_is_refused():
    dphead.check_per_sample(dphead.DPHashCoder(D, BITS, DIMS))
    assert dphead.offending_modules(dphead.DPHashCoder(D, BITS, DIMS)) == []
    coder = HashCoder(D, BITS)
    bad = dphead.offending_modules(coder)
    assert bad and "net.3" in bad[0] and "BatchRenorm1d" in bad[0]
    with pytest.raises(ConfigError) as e:
        dphead.check_per_sample(coder)
    msg = str(e.value)
    assert "net.3" in msg and ("BatchRenorm1d" in msg or "BatchNorm" in msg)
    plain = nn.Sequential(nn.Linear(D, BITS), nn.BatchNorm1d(BITS))
    assert dphead.offending_modules(plain) == ["1 (BatchNorm1d)"]


# --------------------------------------------------------------------------- 2. accounting


def _dpacc_event(history):
    import dp_accounting

    events = []
    for sigma, q, steps in history:
        ev = dp_accounting.GaussianDpEvent(sigma)
        if q < 1.0:
            ev = dp_accounting.PoissonSampledDpEvent(q, ev)
        events.append(dp_accounting.SelfComposedDpEvent(ev, steps) if steps > 1 else ev)
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


@pytest.mark.parametrize("history", [
    [(0.8, 0.05, 70)],
    [(1.2, 0.12, 500)],
    [(3.0, 1.0, 1)],
    [(1.2, 1.0, 70)],
    [(1.2, 1.0, 1), (1.2, 0.12, 70)],   # moments release + DP-SGD, as a silo's ledger holds them
    [(3.0, 1.0, 1), (0.8, 0.05, 500)],
])
def test_epsilon_agrees_with_dp_accounting(history):
    from dp_accounting import pld, rdp

    logging.getLogger().setLevel(logging.ERROR)  # dp_accounting's RDP logs harmless convergence warnings
    ours = accountant.epsilon(history, DELTA)
    acc = rdp.RdpAccountant()
    acc.compose(_dpacc_event(history))
    ref_rdp = acc.get_epsilon(DELTA)
    acc = pld.PLDAccountant()
    acc.compose(_dpacc_event(history))
    ref_pld = acc.get_epsilon(DELTA)
    # the reported ε is tight: within 1 % of Google's PLD accountant (an upper bound, up to PLD's own
    # discretisation: no more than 0.1 % below it)
    assert ref_pld * 0.999 <= ours <= ref_pld * 1.01
    # the RDP cross-check agrees with Google's RDP accountant and is never the tighter
    assert accountant.rdp_epsilon(history, DELTA) == pytest.approx(ref_rdp, rel=0.03)
    assert accountant.rdp_epsilon(history, DELTA) >= ours


def test_epsilon_edge_cases():
    assert accountant.epsilon([], DELTA) == 0.0
    assert accountant.epsilon([(1.0, 0.1, 0)], DELTA) == 0.0
    assert accountant.epsilon([(0.0, 0.1, 5)], DELTA) == float("inf")
    one = accountant.epsilon([(1.0, 0.1, 100)], DELTA)
    assert accountant.epsilon([(1.0, 0.1, 100), (1.0, 0.1, 100)], DELTA) == pytest.approx(accountant.epsilon([(1.0, 0.1, 200)], DELTA))
    assert accountant.epsilon([(1.0, 0.1, 200)], DELTA) > one  # composition costs


# --------------------------------------------------------------------------- 3. plan


PLAN_KW = dict(delta=DELTA, noise_multiplier=0.0, max_grad_norm=0.3, batch_size=256, local_epochs=2, rounds=5,
               moments_ratio=1.0, max_noise=20.0)


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_plan_calibrates_noise_to_the_target(target):
    p = accountant.plan(2000, target_epsilon=target, **PLAN_KW)
    assert target * 0.98 <= p.epsilon <= target * 1.0001
    assert p.epsilon == pytest.approx(accountant.epsilon(p.history(), DELTA), rel=1e-9)
    # the smallest such noise: a little less overshoots the target
    less = dataclasses.replace(p, noise_multiplier=p.noise_multiplier / 1.001, moments_noise=p.moments_noise / 1.001)
    assert accountant.epsilon(less.history(), DELTA) > target
    q, spe = accountant.steps_per_epoch(2000, 256)
    assert (p.sample_rate, p.steps_per_round, p.rounds, p.n) == (q, spe * 2, 5, 2000)
    assert p.moments_noise == pytest.approx(p.noise_multiplier)
    assert p.history() == [(p.moments_noise, 1.0, 1), (p.noise_multiplier, q, spe * 2 * 5)]
    assert p.history(0) == [(p.moments_noise, 1.0, 1)]


def test_plan_larger_target_needs_less_noise():
    sig = [accountant.plan(2000, target_epsilon=t, **PLAN_KW).noise_multiplier for t in (1.0, 4.0, 16.0)]
    assert sig[0] > sig[1] > sig[2] > 0


def test_plan_refuses_an_unreachable_target_naming_the_smallest_reachable_epsilon():
    kw = PLAN_KW | {"max_noise": 2.0}
    q, spe = accountant.steps_per_epoch(2000, 256)
    floor = accountant.epsilon([(2.0, 1.0, 1), (2.0, q, spe * 2 * 5)], DELTA)
    with pytest.raises(ConfigError) as e:
        accountant.plan(2000, target_epsilon=0.01, **kw)
    assert f"{floor:.3g}" in str(e.value)
    assert "dp-max-noise" in str(e.value)
    # just above the floor is reachable
    assert accountant.plan(2000, target_epsilon=floor * 1.01, **kw).noise_multiplier <= 2.0


@pytest.mark.parametrize("delta", [1e-3, 5e-3, 1.0])
def test_plan_refuses_delta_at_or_above_one_over_n(delta):
    with pytest.raises(ConfigError, match="1/N"):
        accountant.plan(1000, target_epsilon=4.0, **(PLAN_KW | {"delta": delta}))
    with pytest.raises(ConfigError, match="1/N"):
        accountant.check_delta(delta, 1000)


def test_plan_noise_mode_uses_the_given_noise():
    p = accountant.plan(2000, target_epsilon=0, **(PLAN_KW | {"noise_multiplier": 1.5, "moments_ratio": 2.0}))
    assert p.noise_multiplier == 1.5 and p.moments_noise == 3.0
    assert p.epsilon == pytest.approx(accountant.epsilon(p.history(), DELTA), rel=1e-9)
    with pytest.raises(ConfigError):
        accountant.plan(2000, target_epsilon=0, **PLAN_KW)  # neither a target nor a noise


# --------------------------------------------------------------------------- 4. steps per epoch


@pytest.mark.parametrize("n, b", [(2098, 256), (1301, 256), (100, 100), (10, 256)])
def test_steps_per_epoch_matches_opacus(n, b):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.zeros(n, 2)), batch_size=b)
    _, _, dploader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    q, steps = accountant.steps_per_epoch(n, b)
    assert q == dploader.sample_rate == 1.0 / len(loader)
    assert steps == len(dploader) == len(loader)


# --------------------------------------------------------------------------- 6. the moments release


def test_release_moments_without_noise_is_exact():
    x = np.random.default_rng(0).standard_normal((300, D)) + 0.5
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    r = release.release_moments(x, 0.0, np.random.default_rng(1))
    assert r["count"].tolist() == [300.0]
    np.testing.assert_allclose(r["sum"], xn.sum(0), atol=1e-10)
    np.testing.assert_allclose(r["outer"], xn.T @ xn, atol=1e-10)
    with pytest.raises(ConfigError):
        release.release_moments(x, -1.0, np.random.default_rng(1))


def test_release_moments_noise_has_the_gaussian_mechanism_scale():
    s = 0.7
    x = np.random.default_rng(0).standard_normal((50, D))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(2)
    iu = np.triu_indices(D, 1)
    off, diag, sums = [], [], []
    for _ in range(20):
        r = release.release_moments(x, s, rng)
        assert np.array_equal(r["outer"], r["outer"].T)
        e = r["outer"] - xn.T @ xn
        off.append(e[iu])
        diag.append(np.diag(e))
        sums.append(r["sum"] - xn.sum(0))
    want = s * np.sqrt(2.0)
    for part in (off, diag, sums):
        v = np.concatenate(part)
        assert np.std(v) == pytest.approx(want, rel=0.05)
        assert abs(np.mean(v)) < 0.1 * want


def test_pooled_moments_of_two_silos_are_the_union_moments():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, D)) + 1.0
    b = 2.0 * rng.standard_normal((500, D)) - 0.5
    mean, cov, n = release.pooled_moments([release.release_moments(a, 0.0, rng), release.release_moments(b, 0.0, rng)])
    u = np.concatenate([a, b])
    un = u / np.linalg.norm(u, axis=1, keepdims=True)
    assert n == 800
    np.testing.assert_allclose(mean, un.mean(0), atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(un.T, bias=True), atol=1e-10)


# --------------------------------------------------------------------------- 7. the DP head's start


def test_init_dp_head_from_exact_moments():
    x = _low_rank(3000, seed=4)
    mean, cov = _moments(x)
    head = dphead.DPHashCoder(D, BITS, DIMS)
    release.init_dp_head(head, mean, cov, seed=0)
    a = head.rotation.detach().double()
    torch.testing.assert_close(a[:, :BITS] @ a[:, :BITS].T, torch.eye(BITS, dtype=a.dtype), atol=1e-4, rtol=0)
    assert float(a[:, BITS:].abs().max()) == 0.0
    head.eval()
    with torch.no_grad():
        z = head(torch.as_tensor(x, dtype=torch.float32)).double()
    codes = (z > 0).double()
    balance = float(1.0 - (2.0 * codes.mean(0) - 1.0).abs().mean())
    assert balance > 0.8
    var = z.var(0, unbiased=False)
    assert float((var - 1.0).abs().max()) < 0.2
    # restandardize after a change of rotation keeps the standardised logits at unit variance
    with torch.no_grad():
        head.rotation.mul_(torch.linspace(0.5, 3.0, BITS)[:, None])
        dphead.restandardize(head)
        var = head(torch.as_tensor(x, dtype=torch.float32)).double().var(0, unbiased=False)
    assert float((var - 1.0).abs().max()) < 0.2
    assert float(head.norm.running_mean.abs().max()) == 0.0


def test_principal_basis_keeps_the_top_axes_and_fills_the_rest_with_random_directions_of_their_complement():
    x = _low_rank(3000, seed=4)
    mean, cov = _moments(x)
    w, v = np.linalg.eigh(cov)
    w, v = w[::-1], v[:, ::-1]
    for axes in (0, 3, 8):
        basis, bcov = release.principal_basis(cov, DIMS, axes, seed=2)
        assert basis.shape == (D, DIMS)
        np.testing.assert_allclose(basis.T @ basis, np.eye(DIMS), atol=1e-10)  # orthonormal
        # the kept axes are the top principal axes (up to sign), the rest are orthogonal to them
        np.testing.assert_allclose(np.abs(np.sum(basis[:, :axes] * v[:, :axes], 0)), 1.0, atol=1e-8)
        assert float(np.abs(v[:, :axes].T @ basis[:, axes:]).max(initial=0.0)) < 1e-10
        np.testing.assert_allclose(bcov, basis.T @ cov @ basis, atol=1e-10)  # the released covariance in it
        # the rest is not PCA's next axes: it reaches below the first DIMS components
        assert float(np.linalg.norm(v[:, DIMS:].T @ basis[:, axes:])) > 0.5
        np.testing.assert_array_equal(basis, release.principal_basis(cov, DIMS, axes, seed=2)[0])  # seeded
        assert not np.allclose(basis[:, axes:], release.principal_basis(cov, DIMS, axes, seed=3)[0][:, axes:])
    # axes >= dims is plain PCA with its diagonal covariance
    basis, bcov = release.principal_basis(cov, DIMS, DIMS, seed=2)
    np.testing.assert_allclose(np.abs(np.sum(basis * v[:, :DIMS], 0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(bcov, np.diag(w[:DIMS].clip(0)), atol=1e-12)
    # a release noisy enough to have mixed PCA's tail keeps plain PCA of what it released; a slightly noised
    # one still has PCA's tail and gets it replaced
    assert release.spectral_edge(w) == 0.0 and release.tail_replaced(cov, DIMS, 4)
    for std, replaced in ((1e-5, True), (0.05, False)):
        e = std * np.random.default_rng(0).standard_normal(cov.shape)
        noisy = cov + (e + e.T) / np.sqrt(2)
        edge = release.spectral_edge(np.linalg.eigvalsh(noisy))
        if not replaced:  # noise above the covariance's smallest eigenvalues: the semicircle's edge, 2σ√d
            assert abs(edge - 2 * std * np.sqrt(D)) < 0.15 * 2 * std * np.sqrt(D)
        assert release.tail_replaced(noisy, DIMS, 4) is replaced
        basis, bcov = release.principal_basis(noisy, DIMS, 4, seed=0)
        assert float(np.linalg.eigvalsh(bcov).min()) > -1e-12  # the released covariance's PSD part
        vn = np.linalg.eigh(noisy)[1][:, ::-1]
        assert np.allclose(np.abs(np.sum(basis * vn[:, :DIMS], 0)), 1.0, atol=1e-8) is not replaced


def test_init_dp_head_with_kept_axes_starts_balanced_and_standardised():
    x = _low_rank(3000, seed=4)
    mean, cov = _moments(x)
    head = dphead.DPHashCoder(D, BITS, DIMS)
    release.init_dp_head(head, mean, cov, seed=0, axes=4)
    basis = head.net[0].basis.double().numpy()
    np.testing.assert_allclose(basis.T @ basis, np.eye(DIMS), atol=1e-5)
    head.eval()
    with torch.no_grad():
        z = head(torch.as_tensor(x, dtype=torch.float32)).double()
    codes = (z > 0).double()
    assert float(1.0 - (2.0 * codes.mean(0) - 1.0).abs().mean()) > 0.8
    assert float((z.var(0, unbiased=False) - 1.0).abs().max()) < 0.2  # the full basis covariance standardises it


# --------------------------------------------------------------------------- 8. DP-SGD with Opacus


def _views(n: int, v: int = 2, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = _low_rank(n, seed=seed)
    return (base[:, None, :] + 0.3 * rng.standard_normal((n, v, D))).astype(np.float32)


def _train(views: np.ndarray, mode: str, batch: int, epochs: int = 2, noise: float = 1e-6):
    n = len(views)
    p = accountant.plan(n, target_epsilon=0, **(PLAN_KW | {"noise_multiplier": noise, "batch_size": batch,
                                                   "local_epochs": epochs, "rounds": 1}))
    head = dphead.DPHashCoder(D, BITS, DIMS)
    mean, cov = _moments(views[:, 0])
    release.init_dp_head(head, mean, cov, seed=0)
    start = head.rotation.detach().clone()
    res = train_dp_head(head, views, p, lr=1e-2, lr_min=1e-3, weight_decay=0.0, lam=0.1, eps=0.05,
                           local_epochs=epochs, batch_size=batch, seed=3, grad_sample_mode=mode)
    return head, start, res, p


@pytest.fixture(scope="module")
def trained():
    views = _views(200)
    return {mode: _train(views, mode, batch=32) for mode in ("hooks", "ghost")}


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_train_dp_head_runs_and_records_opacus_history(trained, mode):
    head, start, res, p = trained[mode]
    steps_per_epoch = int(np.ceil(200 / 32))
    assert res["steps"] == 2 * steps_per_epoch == p.steps_per_round
    assert res["history"] == [(p.noise_multiplier, 1.0 / steps_per_epoch, res["steps"])]
    assert p.history(1)[1] == res["history"][0]  # what was planned is what Opacus accounted
    assert np.isfinite(res["loss"]) and 0.0 <= res["bit_balance"] <= 1.0
    assert float((head.rotation.detach() - start).abs().max()) > 1e-4  # it trained
    assert not head.training
    lin = head.net[1]
    for m in head.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    assert not lin._forward_hooks and not lin._backward_hooks
    assert not any(hasattr(q, "grad_sample") for q in head.parameters())
    assert [n for n, _ in head.named_parameters()] == ["net.1.weight"]


def test_train_dp_head_hooks_and_ghost_agree(trained):
    torch.testing.assert_close(trained["hooks"][0].rotation.detach(), trained["ghost"][0].rotation.detach(),
                               atol=1e-5, rtol=0)
    assert trained["hooks"][2]["loss"] == pytest.approx(trained["ghost"][2]["loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_train_dp_head_accounts_empty_poisson_batches(mode):
    """An empty Poisson batch is still a step of the mechanism: Opacus must record it (the server's
    ledger composes this history), and it must add noise like any other step."""
    head, start, res, p = _train(_views(20), mode, batch=1, epochs=1)  # q = 1/20: about 1 batch in 3 is empty
    assert res["steps"] == 20 == p.steps_per_round
    assert res["history"] == [(p.noise_multiplier, 1.0 / 20, 20)]


def test_train_dp_head_refuses_a_single_view():
    p = accountant.plan(200, target_epsilon=0, **(PLAN_KW | {"noise_multiplier": 1.0}))
    kw = dict(lr=1e-2, lr_min=1e-3, weight_decay=0.0, lam=0.1, eps=0.05, local_epochs=1, batch_size=32, seed=0)
    with pytest.raises(ConfigError):
        train_dp_head(dphead.DPHashCoder(D, BITS, DIMS), _views(200, v=1), p, **kw)


# --------------------------------------------------------------------------- 9. resume refusal


def test_checkpoint_resume_refuses_other_privacy_settings(tmp_path):
    from hashing.model import record
    from server.checkpoint import check_resume, load_checkpoint, save_checkpoint

    cfg = FedConfig().replace(dp="sample", dp_epsilon=8.0, supervised=False)
    ident = {"kind": "dp", "weights_id": "w"}
    model = record({"net.1.weight": np.zeros((2, 3), np.float32)}, {"net.0.center": np.zeros(3, np.float32)}, ident,
                   privacy={"unit": "sample"})
    path = save_checkpoint(tmp_path, server_round=1, model=model, cfg=cfg, prototypes=None, strategy_state={},
                           silos={"silo-0": "abc"}, history=[], ledger={})
    rec = load_checkpoint(path)
    check_resume(rec, cfg, ident, path)  # the same settings pass
    check_resume(rec, FedConfig().replace(dp="sample", dp_epsilon=8.0, supervised=False), ident, path)
    for change in ({"dp_epsilon": 4.0}, {"dp_delta": 1e-6}, {"dp_clip": 1.0}, {"dp_moments_ratio": 2.0}):
        with pytest.raises(ModelVersionError, match="privacy"):
            check_resume(rec, cfg.replace(**change), ident, path)
    with pytest.raises(ModelVersionError):
        check_resume(rec, FedConfig().replace(supervised=False), ident, path)  # no DP at all now


# --------------------------------------------------------------------------- 10. config refusals


@pytest.mark.parametrize("changes, words", [
    ({"dp": "sample", "dp_epsilon": 8.0, "supervised": True}, ("'dp'", "supervised")),
    ({"dp": "sample", "dp_epsilon": 8.0, "supervised": False, "mode": "lora"}, ("'dp'", "lora")),
    ({"dp": "bogus"}, ("'dp'", "bogus")),
    ({"dp": "sample", "supervised": False}, ("dp-epsilon",)),
])
def test_fedconfig_refuses_invalid_dp_settings(changes, words):
    with pytest.raises(ConfigError) as e:
        FedConfig().replace(**changes)
    for w in words:
        assert w in str(e.value)
    FedConfig().replace(dp="sample", dp_epsilon=8.0, supervised=False)  # the valid one passes


def test_privacy_sweep_table_and_figure_carry_the_dp_heads_noiseless_end(tmp_path):
    from simulations import sweep

    rows = [{"method": "CroVCA (published)", "unit": "none", "target": float("inf"), "epsilon": float("inf"),
             "noise": None, "map": 0.6687, "bit_balance": 0.75, "seconds": 1.0},
            {"method": sweep.NOISELESS_METHOD, "unit": "sample", "target": float("inf"), "epsilon": 4.98e5,
             "noise": {"silo-0": sweep.NOISELESS}, "map": 0.6765, "bit_balance": 0.71, "seconds": 1.0}]
    rows += [{"method": "DP-CroVCA", "unit": "sample", "target": e, "epsilon": e, "noise": {"silo-0": z},
              "map": m, "bit_balance": 0.7, "seconds": 1.0} for e, z, m in ((8.0, 1.19, 0.6694), (1.0, 6.27, 0.604))]
    table = sweep.format_sweep(rows)
    assert f"| DP-CroVCA, noise {sweep.NOISELESS:g} | sample | ∞ | 4.98e+05 | 0.01 | 0.6765 |" in table
    path = tmp_path / "privacy_utility.png"
    sweep.plot_sweep(rows, path, 64)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
