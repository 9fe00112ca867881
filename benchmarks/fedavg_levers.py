"""FedAvg on the demo's silos, in-process (no Flower), with the same functions the ClientApp and
ServerApp call (local_train, exact pooled BatchNorm statistics, global prototypes): a fast way to try
levers before running them through Flower.

    python benchmarks/fedavg_levers.py unsup,10,1,0.001,0.1 unsup,10,5,0.001,0.1   # mode,rounds,epochs,lr,lam
"""
import sys, time, copy, dataclasses, itertools
import numpy as np, torch
from client import task
from client.partitions import make_silos
from hashing import fedstats, fedmodel
from hashing.fedconfig import FedConfig
from simulations.scenario import load_scenario
torch.set_num_threads(2)
scn = load_scenario("demo")
base = scn.cfg
ds = task.load_source(base)
silos = make_silos(ds, task.partition_spec(base, base.num_silos))
data = [task.silo_features(base, s) for s in silos]

def run(sup, rounds, epochs, lr, bs=256, lam=0.1):
    cfg = dataclasses.replace(base, supervised=sup, num_server_rounds=rounds, local_epochs=epochs, lr=lr, batch_size=bs, lam=lam)
    _, wid, dim = fedmodel.backbone_for(cfg)
    g = fedmodel.build_model(cfg, dim)
    protos = None
    def pool_stats():
        nonlocal protos
        st = [fedstats.head_stats(g, d.train_views, d.train_labels if sup else None, d.num_classes if sup else 0) for d in data]
        p = fedstats.pool(st); m, v = fedstats.pooled_moments(p); fedstats.set_bn_stats(g, m, v)
        if sup: protos = fedstats.global_prototypes(g, p)

    pool_stats()
    for r in range(1, rounds + 1):
        params, _ = fedmodel.split_state(g)
        _, buffers = fedmodel.split_state(g)
        acc = None; n_tot = 0
        for d in data:
            m = copy.deepcopy(g)
            task.local_train(cfg, d, m, r, prototypes=protos)
            p, _ = fedmodel.split_state(m)
            n = len(d.silo.splits.train); n_tot += n
            acc = {k: v * n for k, v in p.items()} if acc is None else {k: acc[k] + v * n for k, v in p.items()}
        newp = {k: v / n_tot for k, v in acc.items()}
        fedmodel.load_state(g, newp, buffers)
        pool_stats()
    maps = [task.local_evaluate(cfg, d, g)["map"] for d in data]
    return float(np.mean(maps))

for spec in sys.argv[1:]:
    sup, rounds, epochs, lr, lam = spec.split(",")
    t0 = time.time()
    m = run(sup == "sup", int(rounds), int(epochs), float(lr), lam=float(lam))
    print(f"{spec}: mean mAP {m:.4f}  ({time.time()-t0:.1f}s)", flush=True)
