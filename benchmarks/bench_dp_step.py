"""One DP-SGD step against one non-DP step of the same model and batch, measured side by side.

The model is the DP head (hashing.privacy.head.DPHashCoder: 1280-d features, 256 principal axes, 64 bits), the
batch 256 images x 2 views, the objective DPCroVCALoss. Non-DP: AdamW on the mean loss. DP: the same
under Opacus's PrivacyEngine (per-sample gradients, clipping, Gaussian noise), in hooks mode and in
ghost-clipping mode. Steps alternate between the settings, so load on the machine hits them alike.

    python benchmarks/bench_dp_step.py [--steps 60] [--threads 2]
"""
import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from hashing.privacy import objective, release
from hashing.privacy.head import DPHashCoder

warnings.filterwarnings("ignore")


def make(mode: str, x: torch.Tensor, n: int, bs: int):
    head = DPHashCoder(x.shape[-1], 64, 256)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4096, x.shape[-1]))
    m = release.release_moments(feats, 0.0, rng)
    mean, cov, _ = release.pooled_moments([m])
    release.init_dp_head(head, mean, cov)
    head.train()
    crit = objective.DPCroVCALoss(objective.reference_precision(head, 0.05))
    opt = torch.optim.AdamW([head.rotation], lr=1e-3)
    if mode == "plain":
        def step():
            opt.zero_grad(set_to_none=True)
            crit(head(x)).backward()
            opt.step()
        return step
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=bs)
    engine = PrivacyEngine(accountant="rdp")
    kw = dict(module=head, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=0.3,
              poisson_sampling=True, grad_sample_mode=mode)
    if mode == "ghost":
        model, dpopt, dpcrit, _ = engine.make_private(criterion=crit, **kw)

        def step():
            dpopt.zero_grad(set_to_none=True)
            dpcrit(model(x), torch.zeros(len(x))).backward()
            dpopt.step()
    else:
        model, dpopt, _ = engine.make_private(**kw)

        def step():
            dpopt.zero_grad(set_to_none=True)
            crit(model(x)).backward()
            dpopt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2, 1280)
    modes = ("plain", "hooks", "ghost")
    steps = {m: make(m, x, 2000, args.batch) for m in modes}
    times = {m: [] for m in modes}
    for m in modes:  # warm-up
        for _ in range(3):
            steps[m]()
    for _ in range(args.steps):
        for m in modes:
            t0 = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"DP head 1280 -> 256 -> 64 bits, batch {args.batch} x 2 views, {args.threads} threads, "
          f"{args.steps} alternating steps each (median ms)")
    for m in modes:
        print(f"  {m:6s} {1000 * med[m]:7.2f} ms   ratio to non-DP {med[m] / med['plain']:.2f}x")


if __name__ == "__main__":
    main()
