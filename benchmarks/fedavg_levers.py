"""FedAvg on the demo's silos, in-process (no Flower), with the functions the ClientApp and ServerApp
call (local_train, exact pooled BatchNorm statistics, global prototypes): a fast way to try levers.
Each argument is one run, comma-separated key=value:

    mode=sup|unsup  rounds=10  epochs=1  lr=1e-3  lam=0.1  bs=256
    server=avg|avgm|adam  slr=1 (server learning rate)  mom=0.9 (avgm)  tau=1e-9 (adam)
    stats=views|view0|clean   (which inputs the pooled BatchNorm statistics come from)
    renorm=1|0   (local training with Batch Renormalization against the pooled statistics | plain BatchNorm)
    mix=a        (renorm's reference: a mix of the batch's own statistics (weight a) and the pooled ones;
                  0 = renorm, 1 = plain BatchNorm)
    ghost=m      (renorm plus the noise of a random batch of m: the pooled mean and scale jittered per
                  bit and step as a batch of m from the union would jitter them)
    ownbn=1      (also score the final model with each silo's own BatchNorm statistics, FedBN-style)
    stale=1      (local training's renorm reference: the pooled statistics of the previous round's model)
    keepopt=1    (each silo keeps its AdamW state across rounds)
    sub=k        (each round, each silo trains on k random batches only: FedSGD-like)
    curve=1      (print the mean mAP after every round)
    central=E    (instead: centralized training, E epochs, pooled silos)
    local=E      (instead: local-only training, E epochs, scored per silo)

    python benchmarks/fedavg_levers.py mode=unsup,stats=clean,slr=3 mode=unsup,central=10 mode=unsup,local=10
"""
import sys, time, copy, dataclasses
import numpy as np, torch
from client import site
from hashing.backbones import backbone_for
from hashing.federated import pooling
from hashing.hashers import Inputs
from hashing.silos import make_silos, source_dataset
from hashing.train import Schedule, fit, train
from simulations.scenario import load_scenario
torch.set_num_threads(2)
scn = load_scenario("demo"); base = scn.cfg
silos = make_silos(source_dataset(base), base)
data = [site.silo_features(base, s) for s in silos]

import hashing.train as HT
CUR = [None]; SAVED = {}
_Adam = torch.optim.AdamW
class KeepAdam(_Adam):
    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        if CUR[0] is not None and CUR[0] in SAVED:
            sd = self.state_dict(); sd["state"] = copy.deepcopy(SAVED[CUR[0]]); self.load_state_dict(sd)
    def step(self, *a, **k):
        r = super().step(*a, **k)
        if CUR[0] is not None: SAVED[CUR[0]] = self.state_dict()["state"]
        return r
HT.torch.optim.AdamW = KeepAdam

def stats_in(d, how):
    if how == "views": return d.train_views
    if how == "view0": return d.train_views[:, 0]
    return d.clean[d.silo.splits.train]

def central(o):
    sup = o["mode"] == "sup"
    cfg = dataclasses.replace(base, supervised=sup, num_server_rounds=int(o["central"]), local_epochs=1, lr=float(o.get("lr", 1e-3)), batch_size=int(o.get("bs", 256)), lam=float(o.get("lam", 0.1)))
    X = np.concatenate([d.train_views for d in data]); Y = np.concatenate([d.train_labels for d in data])
    coder, _ = fit(X, Y if sup else None, cfg, schedule=Schedule.reference(cfg))
    if o.get("stats", "ema") != "ema":
        st = [pooling.head_stats(coder, stats_in(d, o["stats"])) for d in data]
        m, v = pooling.pooled_moments(pooling.pool(st)); pooling.set_bn_stats(coder, m, v)
    return float(np.mean([site.evaluate(cfg, d, coder).map for d in data]))

def localonly(o):
    cfg = dataclasses.replace(base, supervised=o["mode"] == "sup", num_server_rounds=int(o["local"]), local_epochs=1, lr=float(o.get("lr", 1e-3)), batch_size=int(o.get("bs", 256)))
    res = []
    for d in data:
        coder, _ = fit(d.train_views, d.train_labels if cfg.supervised else None, cfg, schedule=Schedule.reference(cfg))
        res.append(site.evaluate(cfg, d, coder).map)
    return float(np.mean(res))

import hashing.coder as HC
_RENORM_FORWARD = HC.BatchRenorm1d.forward


def renorm_variant(o):
    """Install the BatchRenorm1d forward that ``mix=`` / ``ghost=`` ask for (renorm's own otherwise)."""
    a, m = float(o.get("mix", 0)), float(o.get("ghost", 0))
    if not a and not m:
        HC.BatchRenorm1d.forward = _RENORM_FORWARD
        return

    def forward(self, h):
        if not (self.training and self.renorm):
            return torch.nn.BatchNorm1d.forward(self, h)
        mu_b = h.mean(0)
        s_b = torch.sqrt(h.var(0, unbiased=False) + self.eps)
        s_r = torch.sqrt(self.running_var + self.eps)
        mu_t = a * mu_b.detach() + (1 - a) * self.running_mean
        s_t = torch.exp(a * torch.log(s_b.detach()) + (1 - a) * torch.log(s_r))
        x = (h - mu_b) / s_b * (s_b / s_t).detach() + ((mu_b - mu_t) / s_t).detach()
        if m:
            k = h.shape[1]
            x = (x - torch.randn(k) / m ** 0.5) / (1 + torch.randn(k) / (2 * m) ** 0.5).clamp_min(0.5)
        return x * self.weight + self.bias

    HC.BatchRenorm1d.forward = forward


def run(o):
    renorm_variant(o)
    if "local" in o: return localonly(o)
    if "central" in o: return central(o)
    sup = o["mode"] == "sup"
    cfg = dataclasses.replace(base, supervised=sup, num_server_rounds=int(o.get("rounds", 10)), local_epochs=int(o.get("epochs", 1)),
                              lr=float(o.get("lr", 1e-3)), batch_size=int(o.get("bs", 256)), lam=float(o.get("lam", 0.1)),
                              batch_renorm=o.get("renorm", "1") == "1")
    how = o.get("stats", "views"); server = o.get("server", "avg"); slr = float(o.get("slr", 1.0)); mom = float(o.get("mom", 0.9))
    _, wid, dim = backbone_for(cfg.backbone, cfg.weights or None)
    g = site.global_model(cfg, dim)
    protos = None
    def pool_stats():
        nonlocal protos
        st = [pooling.head_stats(g, stats_in(d, how), d.train_labels if sup else None, d.num_classes if sup else 0) for d in data]
        p = pooling.pool(st); m, v = pooling.pooled_moments(p); pooling.set_bn_stats(g, m, v)
        if sup: protos = pooling.global_prototypes(g, p)
    pool_stats()
    mstate = vstate = None
    curve = []
    prev_buffers = None
    for r in range(1, cfg.num_server_rounds + 1):
        params, buffers = g.state()
        if o.get("stale") == "1" and prev_buffers is not None:
            # train against the pooled statistics of the model before (one round stale)
            g.load_state(params, prev_buffers)
        prev_buffers = buffers
        acc = None; n_tot = 0
        for si, d in enumerate(data):
            CUR[0] = si if o.get("keepopt") else None
            m = copy.deepcopy(g)
            if o.get("sub"):
                k = int(o["sub"]) * cfg.batch_size
                rs = np.random.default_rng(r * 7 + si); pick = np.sort(rs.choice(len(d.train_views), min(k, len(d.train_views)), replace=False))
                train(m, Inputs.of_features(d.train_views[pick]), cfg, Schedule.federated_round(cfg, r))
            else:
                site.local_train(cfg, d, m, r, prototypes=protos)
            p, _ = m.state()
            n = len(d.silo.splits.train); n_tot += n
            acc = {k: v * n for k, v in p.items()} if acc is None else {k: acc[k] + v * n for k, v in p.items()}
        avg = {k: v / n_tot for k, v in acc.items()}
        delta = {k: avg[k] - params[k] for k in params}
        if server == "avg":
            newp = {k: params[k] + slr * delta[k] for k in params}
        elif server == "avgm":
            mstate = delta if mstate is None else {k: mom * mstate[k] + delta[k] for k in delta}
            newp = {k: params[k] + slr * mstate[k] for k in params}
        elif server == "adam":
            b1, b2, tau = 0.9, 0.99, float(o.get("tau", 1e-9))
            mstate = {k: (1 - b1) * delta[k] for k in delta} if mstate is None else {k: b1 * mstate[k] + (1 - b1) * delta[k] for k in delta}
            vstate = {k: (1 - b2) * delta[k] ** 2 for k in delta} if vstate is None else {k: b2 * vstate[k] + (1 - b2) * delta[k] ** 2 for k in delta}
            newp = {k: params[k] + slr * mstate[k] / (vstate[k].sqrt() + tau) for k in params}
        g.load_state(newp, buffers)
        pool_stats()
        if o.get("curve"): curve.append(round(float(np.mean([site.evaluate(cfg, d, g).map for d in data])), 4))
    if curve: print("  curve", curve)
    if o.get("ownbn"):
        res = []
        for d in data:
            gg = copy.deepcopy(g); s1 = pooling.head_stats(gg, stats_in(d, "clean"))
            mm, vv = pooling.pooled_moments(pooling.pool([s1])); pooling.set_bn_stats(gg, mm, vv)
            res.append(site.evaluate(cfg, d, gg).map)
        print("  own-BN eval", round(float(np.mean(res)), 4))
    print("  bit balance", round(float(np.mean([site.evaluate(cfg, d, g).bit_balance for d in data])), 4))
    return float(np.mean([site.evaluate(cfg, d, g).map for d in data]))

for spec in [a for a in sys.argv[1:] if a != "diag"]:
    o = dict(kv.split("=") for kv in spec.split(","))
    t0 = time.time()
    print(f"{spec}: mean mAP {run(o):.4f}  ({time.time()-t0:.1f}s)", flush=True)

def diag():
    cfg = dataclasses.replace(base, supervised=False)
    _, wid, dim = backbone_for(cfg.backbone, cfg.weights or None)
    g = site.global_model(cfg, dim)
    st = [pooling.head_stats(g, stats_in(d, "clean")) for d in data]
    m, v = pooling.pooled_moments(pooling.pool(st)); pooling.set_bn_stats(g, m, v)
    print("init model pooled BN:", np.mean([site.evaluate(cfg, d, g).map for d in data]))
    # per-silo own BN
    res = []
    for d, s in zip(data, st):
        gg = copy.deepcopy(g); mm, vv = pooling.pooled_moments(pooling.pool([s])); pooling.set_bn_stats(gg, mm, vv)
        res.append(site.evaluate(cfg, d, gg).map)
    print("init model own BN:", np.mean(res))
if "diag" in sys.argv: diag()
