"""CroVCA loss and hash head: values against independent formulas, plus a tiny end-to-end fit."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hashing import codes
from hashing.coder import HashCoder
from hashing.errors import CodeLengthError, TrainingError
from hashing.loss import (alignment_loss, class_logit_sums, coding_rate, coding_rate_loss, crovca_loss,
                          supervised_alignment_loss, supervised_targets)


# ------------------------------------------------------------------ alignment

def test_teacher_side_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 16, generator=g, requires_grad=True)
    z2 = torch.randn(6, 16, generator=g, requires_grad=True)
    # one direction only (student 1, teacher 2), as the module builds it: target is 1[z2 > 0], detached
    loss = F.binary_cross_entropy_with_logits(z1, (z2 > 0).float().detach())
    loss.backward()
    assert z2.grad is None or torch.count_nonzero(z2.grad) == 0
    # and the full loss: each view's gradient is only its own student term
    z1.grad = z2.grad = None
    alignment_loss([z1, z2]).backward()
    m, k, npairs = 6, 16, 2
    expect1 = (torch.sigmoid(z1) - (z2 > 0).float()) / (m * k * npairs)
    expect2 = (torch.sigmoid(z2) - (z1 > 0).float()) / (m * k * npairs)
    torch.testing.assert_close(z1.grad, expect1.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z2.grad, expect2.detach(), rtol=1e-5, atol=1e-7)


def test_alignment_value_three_views_ordered_pairs():
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    manual = []
    for i in range(3):
        for j in range(3):
            if i != j:
                t = (vs[j] > 0).double()
                p = torch.sigmoid(vs[i])
                manual.append(-(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean())
    assert len(manual) == 6
    torch.testing.assert_close(alignment_loss(vs), torch.stack(manual).mean())


def test_alignment_needs_two_views():
    with pytest.raises(TrainingError):
        alignment_loss([torch.randn(4, 8)])


# ------------------------------------------------------------------ coding rate

@pytest.mark.parametrize("m,k", [(8, 32), (64, 16), (256, 64)])
def test_coding_rate_matches_direct_logdet(m, k):
    g = torch.Generator().manual_seed(m * k)
    z = torch.randn(m, k, generator=g, dtype=torch.float64) * 3
    eps = 0.05
    zn = z / z.norm(dim=1, keepdim=True)
    direct = 0.5 * torch.logdet(torch.eye(k, dtype=torch.float64) + k / (m * eps) * zn.T @ zn)
    assert abs(float(coding_rate(z, eps)) - float(direct)) < 1e-5
    # float32 input: same value to float32 precision
    assert abs(float(coding_rate(z.float(), eps)) - float(direct)) < 1e-5 * max(1.0, abs(float(direct)))
    # the loss form: -R (K+m)/(K m), averaged over views
    z2 = z.flip(0) * 0.5 + 1
    zn2 = z2 / z2.norm(dim=1, keepdim=True)
    direct2 = 0.5 * torch.logdet(torch.eye(k, dtype=torch.float64) + k / (m * eps) * zn2.T @ zn2)
    scale = (k + m) / (k * m)
    expect = -0.5 * (direct + direct2) * scale
    assert abs(float(coding_rate_loss([z, z2], eps)) - float(expect)) < 1e-5


def test_coding_rate_divides_by_eps_not_eps_squared():
    z = torch.eye(4, dtype=torch.float64)  # m = K = 4, Z^T Z = I
    # 1/2 logdet((1 + K/(m eps)) I) = K/2 log(1 + 1/eps)
    assert abs(float(coding_rate(z, 0.05)) - 2 * np.log(1 + 1 / 0.05)) < 1e-9


def test_collapse_scores_worse_than_diverse_codes():
    m, k = 64, 32
    g = torch.Generator().manual_seed(3)
    diverse = torch.where(torch.rand(m, k, generator=g) > 0.5, 2.0, -2.0)  # balanced, distinct rows
    same_row = diverse[:1].expand(m, k).clone()                            # every sample identical
    const_bits = torch.full((m, k), 2.0)                                   # every bit always on
    noise = lambda: 0.1 * torch.randn(m, k, generator=g)
    for collapsed in (same_row, const_bits):
        assert float(coding_rate_loss([collapsed])) > float(coding_rate_loss([diverse])) + 0.1
        # the total: two agreeing views have the same alignment either way; reg decides
        l_div, p_div = crovca_loss([diverse + noise(), diverse + noise()])
        l_col, p_col = crovca_loss([collapsed + noise(), collapsed + noise()])
        assert float(l_col) > float(l_div)
        assert p_col["bit_balance"] < p_div["bit_balance"]
    assert crovca_loss([const_bits, const_bits])[1]["bit_balance"] == 0.0


# ------------------------------------------------------------------ supervised

def test_single_label_targets_are_class_prototype_signs():
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    v1, v2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    t = supervised_targets([v1, v2], labels)
    zbar = (v1 + v2) / 2
    for c in range(3):
        rows = t[labels == c]
        assert torch.equal(rows, rows[:1].expand_as(rows))
        assert torch.equal(rows[0], (zbar[labels == c].mean(0) > 0).float())
    counts, sums = class_logit_sums([v1, v2], labels)
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0, 3.0]))
    torch.testing.assert_close(sums[1], zbar[1] + zbar[4])
    # external prototypes built from those sums give the same targets
    assert torch.equal(supervised_targets([v1, v2], labels, prototypes=sums / counts[:, None]), t)


def test_multi_label_targets_by_hand():
    # 3 samples, 3 classes, K = 2, one view
    z = torch.tensor([[1.0, -4.0],
                      [-3.0, 1.0],
                      [2.0, 2.0]])
    y = torch.tensor([[1, 0, 0],    # class 0
                      [0, 1, 0],    # class 1
                      [1, 1, 0]])   # classes 0 and 1; class 2 has no sample
    # prototypes: P0 = mean(z0, z2) = [1.5, -1], P1 = mean(z1, z2) = [-0.5, 1.5]
    # sample 0: P0 -> [1, 0]; sample 1: P1 -> [0, 1]; sample 2: (P0 + P1)/2 = [0.5, 0.25] -> [1, 1]
    t = supervised_targets([z], y)
    assert torch.equal(t, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # a sample whose only label has no prototype falls back to its own logits' sign
    protos = torch.tensor([[1.5, -1.0], [float("nan"), float("nan")], [0.0, 0.0]])
    t2 = supervised_targets([z], torch.tensor([[0, 1, 0], [1, 1, 0], [0, 1, 0]]), prototypes=protos)
    assert torch.equal(t2, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))


def test_supervised_loss_value_and_total():
    g = torch.Generator().manual_seed(5)
    vs = [torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(2)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    t = supervised_targets(vs, labels)
    sup = supervised_alignment_loss(vs, t)
    expect = 0.5 * sum(F.binary_cross_entropy_with_logits(v, t) for v in vs)
    torch.testing.assert_close(sup, expect)
    loss, parts = crovca_loss(vs, labels=labels, lam=0.1)
    torch.testing.assert_close(loss, sup + 0.1 * coding_rate_loss(vs))
    assert set(parts) == {"align", "reg", "bit_balance"}
    assert all(isinstance(v, float) for v in parts.values())


def test_nan_loss_raises_training_error():
    z = torch.randn(4, 8)
    z[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="NaN at step 7.*learning rate"):
        crovca_loss([z, torch.randn(4, 8)], step=7)
    with pytest.raises(TrainingError, match="NaN"):
        crovca_loss([z, torch.randn(4, 8)], labels=torch.tensor([0, 1, 0, 1]))


# ------------------------------------------------------------------ hash head

def test_hash_coder_structure():
    h = HashCoder(20, 16)
    x = torch.randn(5, 20)
    assert h(x).shape == (5, 16)
    assert isinstance(h.net[-1], torch.nn.BatchNorm1d) and h.net[-1].num_features == 16
    assert (h.bits, h.in_dim, h.variant) == (16, 20, "small")
    linears = [m for m in h.net if isinstance(m, torch.nn.Linear)]
    assert [tuple(l.weight.shape) for l in linears] == [(20, 20), (16, 20)]
    assert all(torch.count_nonzero(l.bias) == 0 for l in linears)
    assert all(0.015 < float(l.weight.detach().std()) < 0.025 for l in linears)  # trunc-normal, std 0.02
    assert isinstance(h.net[1], torch.nn.ReLU)
    assert "net.0.weight" in h.state_dict() and "net.3.running_mean" in h.state_dict()

    big = HashCoder(32, 64, variant="large")
    assert big.net[0].out_features == 2048 and big.net[2].weight.shape == (2048, 2048)
    assert isinstance(big.net[1], torch.nn.GELU) and isinstance(big.net[-1], torch.nn.BatchNorm1d)
    assert big(torch.randn(3, 32)).shape == (3, 64)
    assert HashCoder(1280, 32, variant="large").net[0].out_features == 2560
    assert HashCoder(32, 32, variant="large", hidden=48).net[0].out_features == 48
    for bad in (0, 12, 33, -8):
        with pytest.raises(CodeLengthError):
            HashCoder(20, bad)


# ------------------------------------------------------------------ end to end

def _precision_at_10(model, x, y):
    model.eval()
    with torch.no_grad():
        z = model(x).numpy()
    packed = codes.logits_to_codes(z)
    dist = codes.hamming(packed, packed).astype(np.int64)
    np.fill_diagonal(dist, 10**6)                      # leave the query itself out
    order = np.argsort(dist, axis=1, kind="stable")[:, :10]
    return float((y[order] == y[:, None]).mean()), z


@pytest.fixture
def one_thread():
    # tiny matrices: one thread is faster, and far faster on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unsupervised_training_retrieves_clusters(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_clusters, per, d, bits = 8, 64, 64, 32
    # overlapping enough that random projections (the untrained head) retrieve poorly
    centers = rng.normal(size=(n_clusters, d))
    y = np.repeat(np.arange(n_clusters), per)
    x = torch.tensor(centers[y] + rng.normal(size=(len(y), d)), dtype=torch.float32)

    model = HashCoder(d, bits)
    untrained, _ = _precision_at_10(model, x, y)
    assert untrained < 0.8, untrained
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        idx = torch.randperm(len(x), generator=g)[:256]
        xb = x[idx]
        views = [model(xb + 0.5 * torch.randn(xb.shape, generator=g)) for _ in range(2)]
        loss, parts = crovca_loss(views, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()

    p_at_10, z = _precision_at_10(model, x, y)
    assert p_at_10 > 0.9, (untrained, p_at_10)
    balance = (z > 0).mean(0)
    assert ((balance > 0.2) & (balance < 0.8)).mean() >= 0.75, balance
