"""Why unsupervised FedAvg falls short: batch composition. Each argument is one run (key=value, comma-separated).

FedAvg whose local loss imagines a union batch: the silo's batch of m joined by M - m "other" samples
summarised by the global statistics at the round's start (M = m / silo share):
    bn=plain|mix|gmean|gvar  BatchNorm: the batch's own statistics | mixed with the pooled mean and
                             second moment | pooled mean, batch variance | batch mean, pooled variance
    cr=plain|mix             coding rate on the batch | on the imagined union (batch Gram + pooled E[z z^T])
    mixw=w                   imagined share of the silo (default: its true share n_i / N)
    bn=renorm                Batch Renormalization against the pooled statistics (rmax=, dmax= clip r, d)
    bn=offset                BatchNorm on the batch, then shifted and scaled by the silo's offset from the pooled
                             statistics at the round's start (= plain BatchNorm when the silo looks like the union)
    seed=s                   the model's and the local loops' seed (the silos stay the demo's)
    slr=s                    server learning rate (step s times along the average update)
    stats=clean|views        inputs of the pooled statistics; curve=1 prints mAP per round
Centralized training with silo-homogeneous batches (every batch from one silo, drawn by size):
    central=1,homog=0|1,epochs=5[,bn=renorm,every=6]   (renorm: pooled statistics of all silos every 6 steps)

    python benchmarks/unsup_batch_composition.py bn=plain,cr=plain bn=plain,cr=mix central=1,homog=1
"""
import sys, time, copy, dataclasses
import numpy as np, torch, torch.nn.functional as F
from client import site
from hashing.backbones import backbone_for
from hashing.federated import pooling
from hashing.silos import make_silos, source_dataset
from hashing.train import Schedule
from hashing.loss import alignment_loss, crovca_loss


def _views_pair(rng, n, v):
    """Two distinct views of each of n images (what hashing.hashers.FeatureHead.view_batch draws)."""
    a = rng.integers(0, v, size=n)
    return a, (a + rng.integers(1, v, size=n)) % v
from simulations.scenario import load_scenario
torch.set_num_threads(2)
scn = load_scenario("demo"); base = scn.cfg
silos = make_silos(source_dataset(base), base)
data = [site.silo_features(base, s) for s in silos]
N = sum(len(d.train_views) for d in data)

@torch.no_grad()
def global_stats(g, how):
    """pooled mean/E[h^2] of pre-BN h and E[zhat zhat^T] under eval-mode g"""
    hs = []; zs = []
    for d in data:
        x = torch.from_numpy(d.clean[d.silo.splits.train].astype(np.float32)) if how == "clean" else torch.from_numpy(d.train_views.reshape(-1, d.train_views.shape[-1]).astype(np.float32))
        g.eval(); h = g.net[:-1](x); z = g.net[-1](h)
        hs.append(h.double()); zs.append(F.normalize(z, dim=1).double())
    H = torch.cat(hs); Z = torch.cat(zs)
    return H.mean(0), (H**2).mean(0), (Z.T @ Z) / len(Z)

def local(g, d, cfg, r, G, o):
    tc = Schedule.federated_round(cfg, r)
    m_ = copy.deepcopy(g); m_.train()
    X = d.train_views; n, v, dim = X.shape
    w = n / N; bs = min(cfg.batch_size, n); steps = max(1, n // bs)
    torch.manual_seed(tc.seed); rng = np.random.default_rng(tc.seed)
    opt = torch.optim.AdamW(m_.parameters(), lr=tc.lr, weight_decay=cfg.weight_decay)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps * tc.epochs, eta_min=tc.lr_min)
    muG, e2G, CG = [t.float() for t in G]
    bn = m_.net[-1]
    M = bs / float(o["mixw"]) if "mixw" in o else bs / w
    K = cfg.bits
    if o.get("bn") == "offset":
        # the silo's own statistics at the round's start, against the pooled ones
        with torch.no_grad():
            hs = g.net[:-1](torch.from_numpy(d.clean[d.silo.splits.train].astype(np.float32))).double()
        sS = torch.sqrt(hs.var(0, unbiased=False).float() + bn.eps); sG0 = torch.sqrt((e2G - muG**2).clamp_min(0) + bn.eps)
        r_off, d_off = sS / sG0, (hs.mean(0).float() - muG) / sG0
    for ep in range(tc.epochs):
        perm = rng.permutation(n)
        for i in range(steps):
            idx = np.sort(perm[i*bs:(i+1)*bs]); a, b = _views_pair(rng, len(idx), v)
            batch = X[idx]
            xs = [torch.from_numpy(batch[np.arange(len(idx)), a].astype(np.float32)), torch.from_numpy(batch[np.arange(len(idx)), b].astype(np.float32))]
            zs = []
            for x in xs:
                h = m_.net[:-1](x)
                if o.get("bn", "mix") == "mix":
                    mb = len(h)
                    mu = (mb * h.mean(0) + (M - mb) * muG) / M
                    e2 = (mb * (h**2).mean(0) + (M - mb) * e2G) / M
                    var = (e2 - mu**2).clamp_min(0)
                    z = (h - mu) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
                elif o.get("bn") == "gmean":
                    var = h.var(0, unbiased=False)
                    z = (h - muG) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
                elif o.get("bn") == "renorm":
                    # Batch Renormalization (Ioffe 2017): the forward uses the pooled statistics, the
                    # gradient flows through the batch's as in BatchNorm (r and d carry none).
                    mb_, vb_ = h.mean(0), h.var(0, unbiased=False)
                    sb, sG = torch.sqrt(vb_ + bn.eps), torch.sqrt((e2G - muG**2).clamp_min(0) + bn.eps)
                    r_, d_ = (sb / sG).detach(), ((mb_ - muG) / sG).detach()
                    if "rmax" in o:
                        rm = float(o["rmax"]); r_ = r_.clamp(1 / rm, rm); d_ = d_.clamp(-float(o.get("dmax", 5)), float(o.get("dmax", 5)))
                    z = ((h - mb_) / sb * r_ + d_) * bn.weight + bn.bias
                elif o.get("bn") == "offset":
                    z = (bn(h) - bn.bias) / bn.weight * r_off + d_off
                    z = z * bn.weight + bn.bias
                elif o.get("bn") == "gvar":
                    z = (h - h.mean(0)) / torch.sqrt((e2G - muG**2).clamp_min(0) + bn.eps) * bn.weight + bn.bias
                else:
                    z = bn(h)
                zs.append(z)
            align = alignment_loss(zs)
            regs = []
            for z in zs:
                mb = len(z)
                Zn = F.normalize(z, dim=1).double()
                if o.get("cr", "mix") == "mix":
                    gram = Zn.T @ Zn + (M - mb) * CG.double()
                    A = torch.eye(K, dtype=torch.float64) + (K / (M * cfg.eps)) * gram
                    R = torch.linalg.cholesky(A).diagonal().log().sum()
                    regs.append(-R * (K + M) / (K * M) / w)
                else:
                    A = torch.eye(K, dtype=torch.float64) + (K / (mb * cfg.eps)) * (Zn.T @ Zn)
                    R = torch.linalg.cholesky(A).diagonal().log().sum()
                    regs.append(-R * (K + mb) / (K * mb))
            loss = align + cfg.lam * float(o.get("lamx", 1.0)) * torch.stack(regs).mean().float()
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    return m_

def central(o):
    cfg = dataclasses.replace(base, supervised=False)
    _, wid, dim = backbone_for(cfg.backbone, cfg.weights or None)
    g = site.global_model(cfg, dim); g.train()
    epochs = int(o.get("epochs", 5)); bs = 256
    steps = epochs * N // bs
    opt = torch.optim.AdamW(g.parameters(), lr=1e-3, weight_decay=1e-2)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-6)
    rng = np.random.default_rng(0)
    sizes = np.array([len(d.train_views) for d in data]); p = sizes / sizes.sum()
    allX = np.concatenate([d.train_views for d in data])
    for s in range(steps):
        if o.get("homog") == "1":
            si = rng.choice(len(data), p=p); X = data[si].train_views
        else:
            X = allX
        idx = np.sort(rng.choice(len(X), bs, replace=False)); a, b = _views_pair(rng, bs, 4)
        batch = X[idx]
        xs = [torch.from_numpy(batch[np.arange(bs), a].astype(np.float32)), torch.from_numpy(batch[np.arange(bs), b].astype(np.float32))]
        if o.get("bn") == "renorm":
            if s % int(o.get("every", 6)) == 0:
                muG, e2G, _ = [t.float() for t in global_stats(g, "clean")]; g.train()
            bn = g.net[-1]; zs = []
            for x in xs:
                h = g.net[:-1](x); mb_, vb_ = h.mean(0), h.var(0, unbiased=False)
                sb, sG = torch.sqrt(vb_ + bn.eps), torch.sqrt((e2G - muG**2).clamp_min(0) + bn.eps)
                zs.append(((h - mb_) / sb * (sb / sG).detach() + ((mb_ - muG) / sG).detach()) * bn.weight + bn.bias)
        else:
            zs = [g(x) for x in xs]
        loss, _ = crovca_loss(zs, lam=0.1, eps=0.05)
        opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    st = [pooling.head_stats(g, d.clean[d.silo.splits.train]) for d in data]
    mm, vv = pooling.pooled_moments(pooling.pool(st)); pooling.set_bn_stats(g, mm, vv)
    ev = [site.evaluate(cfg, d, g) for d in data]
    return float(np.mean([e.map for e in ev])), float(np.mean([e.bit_balance for e in ev]))

def run(o):
    if "central" in o:
        return central(o)[0]
    cfg = dataclasses.replace(base, supervised=False, num_server_rounds=int(o.get("rounds", 10)), local_epochs=int(o.get("epochs", 1)), lr=float(o.get("lr", 1e-3)), seed=int(o.get("seed", base.seed)))
    _, wid, dim = backbone_for(cfg.backbone, cfg.weights or None)
    g = site.global_model(cfg, dim)
    how = o.get("stats", "clean")
    def pool():
        st = [pooling.head_stats(g, d.clean[d.silo.splits.train] if how == "clean" else d.train_views) for d in data]
        mm, vv = pooling.pooled_moments(pooling.pool(st)); pooling.set_bn_stats(g, mm, vv)
    pool()
    curve = []
    for r in range(1, cfg.num_server_rounds + 1):
        G = global_stats(g, how)
        params, buffers = g.state()
        acc = None
        for d in data:
            m_ = local(g, d, cfg, r, G, o)
            p, _ = m_.state(); wt = len(d.train_views) / N
            acc = {k: v * wt for k, v in p.items()} if acc is None else {k: acc[k] + v * wt for k, v in p.items()}
        slr = float(o.get("slr", 1.0))
        if slr != 1.0:
            acc = {k: params[k] + slr * (acc[k] - params[k]) for k in acc}
        g.load_state(acc, buffers); pool()
        if o.get("curve"): curve.append(round(float(np.mean([site.evaluate(cfg, d, g).map for d in data])), 4))
    if curve: print("  curve", curve)
    ev = [site.evaluate(cfg, d, g) for d in data]
    print("  bit balance", round(float(np.mean([e.bit_balance for e in ev])), 4))
    return float(np.mean([e.map for e in ev]))

for spec in sys.argv[1:]:
    o = dict(kv.split("=") for kv in spec.split(",")) if "=" in spec else {}
    t0 = time.time(); print(f"{spec}: mean mAP {run(o):.4f}  ({time.time()-t0:.1f}s)", flush=True)
