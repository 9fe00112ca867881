"""Every figure fedhash draws, one public API: arrays in, a PNG out (Agg, no display, written atomically).

    plot_loss            training loss per step and per epoch          (fedhash train)
    plot_bit_balance     fraction of 1s per bit                        (fedhash train)
    plot_table_bars      mAP by method and code length                 (fedhash eval)
    plot_pr_curves       precision against recall per method           (fedhash eval)
    plot_partition       class counts per silo                         (fedhash simulate)
    plot_map_rounds      mAP by round, per silo and mean, references   (fedhash simulate)
    plot_map_silos       final mAP per silo and method                 (fedhash simulate)
    plot_round_metric    any per-round scalar                          (fedhash simulate)
    plot_comm            bytes down and up per round                   (fedhash simulate)
    plot_privacy_utility mAP against ε per method                      (fedhash privacy-sweep)

The report and the commands turn their records into the series these take; nothing here knows a run folder.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .atomic import atomic_path

Series = tuple[Sequence[float], Sequence[float]]  # (x, y)


def _figure(w: float = 6.0, h: float = 3.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------- training


def plot_loss(step_loss: Sequence[float], steps_per_epoch: int, path, title: str = "CroVCA training loss") -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    y = np.asarray(step_loss, dtype=float)
    ax.plot(np.arange(1, len(y) + 1), y, linewidth=0.8, label="loss per step")
    if steps_per_epoch > 0 and len(y) >= steps_per_epoch:
        ep = y[: len(y) // steps_per_epoch * steps_per_epoch].reshape(-1, steps_per_epoch).mean(1)
        ax.plot((np.arange(len(ep)) + 1) * steps_per_epoch, ep, "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_bit_balance(bit_means: np.ndarray, path, title: str = "bit balance (fraction of 1s per bit, database)") -> None:
    fig = _figure(max(6.0, len(bit_means) * 0.09), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(len(bit_means)), bit_means, width=0.8)
    ax.axhline(0.5, color="k", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("bit")
    ax.set_ylabel("fraction of 1s")
    ax.set_title(title)
    _save(fig, path)


# --------------------------------------------------------------------------- evaluation


def plot_table_bars(rows: list[dict], metric: str, path, title: str) -> None:
    """Grouped bars: methods x bit lengths for one metric; rows without bits are dashed lines."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"]))
    bits = sorted({r["bits"] for r in rows if r["bits"]})
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(bits), 1)
    for j, b in enumerate(bits):
        vals = [next((r[metric] for r in rows if r["method"] == m and r["bits"] == b), np.nan) for m in methods]
        ax.bar(np.arange(len(methods)) + j * width, vals, width, label=f"{b} bits")
    for r in rows:
        if not r["bits"]:
            ax.axhline(r[metric], color="k", linestyle="--", linewidth=1, label=f"{r['method']}")
    ax.set_xticks(np.arange(len(methods)) + width * (len(bits) - 1) / 2, methods, rotation=15)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)


def plot_pr_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path, title: str = "") -> None:
    """Precision (y) against recall (x) per named curve (``{"precision": [...], "recall": [...]}``)."""
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, pr in curves.items():
        p = np.asarray(pr["precision"], dtype=np.float64)
        r = np.asarray(pr["recall"], dtype=np.float64)
        ok = np.isfinite(p) & np.isfinite(r)
        ax.plot(r[ok], p[ok], marker=".", markersize=3, linewidth=1.2, label=str(name))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(loc="best", fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------- federations


def plot_partition(hist: np.ndarray, silo_names: Sequence[str], class_names: Sequence[str], path,
                   title: str | None = None) -> None:
    """Stacked bars of class counts per silo; ``hist`` (silos, classes) as from ``hashing.silos.label_histogram``."""
    import matplotlib

    hist = np.asarray(hist)
    n = len(silo_names)
    fig = _figure(max(5.0, 0.7 * n + 3.0), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    bottom = np.zeros(n)
    width = hist.shape[1] if hist.ndim == 2 else 0
    cmap = matplotlib.colormaps["tab20" if width > 10 else "tab10"]
    for j in range(width):
        label = class_names[j] if j < len(class_names) else str(j)
        ax.bar(x, hist[:, j], bottom=bottom, color=cmap(j % cmap.N), label=label, width=0.8)
        bottom += hist[:, j]
    ax.set_xticks(x)
    ax.set_xticklabels(list(silo_names), rotation=30 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_ylabel("images")
    ax.set_title(title or "class counts per silo")
    if 0 < width <= 20:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    _save(fig, path)


_REFERENCE_STYLES = {"local-only": ("0.55", (0, (2, 2))), "centralized": ("k", (0, (6, 3))),
                     "itq": ("0.55", (0, (6, 2, 1, 2)))}


def plot_map_rounds(mean: Series, per_silo: Mapping[str, Series], references: Mapping[str, float], path,
                    title: str = "mAP@1000 by round") -> bool:
    """Mean mAP per round (thick), each silo's (thin), dashed lines at the references' final means.
    Nothing is written (False) when there is no point to draw."""
    x, y = mean
    if not len(x) and not any(len(s[0]) for s in per_silo.values()):
        return False
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    many = len(per_silo) > 10  # a legend entry per silo stops being readable: one grey line each, one entry
    for i, (name, (sx, sy)) in enumerate(per_silo.items()):
        if len(sx):
            style = (dict(color="0.6", linewidth=0.5, alpha=0.5, label=None if i else f"each silo ({len(per_silo)})")
                     if many else dict(linewidth=0.8, alpha=0.6, label=name))
            ax.plot(sx, sy, **style)
    if len(x):
        ax.plot(x, y, "o-", color="k", linewidth=2.0, markersize=4, label="federated, mean")
    for m, v in references.items():
        color, dash = _REFERENCE_STYLES.get(m, ("0.3", (0, (1, 1))))
        ax.axhline(v, color=color, linestyle=dash, linewidth=1.2, label=f"{m} mean ({v:.3f})")
    _integer_x(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("mAP@1000")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)
    return True


def plot_map_silos(groups: Sequence[str], values: Mapping[str, Sequence[float | None]], path,
                   title: str = "final mAP@1000 per silo") -> bool:
    """Grouped bars: ``groups`` (silos, then "mean") on x, one bar per method of ``values``."""
    if not values or not groups:
        return False
    fig = _figure(max(6.0, 1.1 * len(groups) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(values)
    for j, (m, vals) in enumerate(values.items()):
        ax.bar(np.arange(len(groups)) + j * width, [np.nan if v is None else v for v in vals], width, label=m)
    ax.set_xticks(np.arange(len(groups)) + width * (len(values) - 1) / 2, list(groups), rotation=15)
    ax.set_ylabel("mAP@1000")
    ax.set_ylim(0, 1.0)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_map_distribution(values: Mapping[str, Sequence[float]], path,
                          title: str = "final mAP@1000 over the silos") -> bool:
    """Each method's per-silo figures as a box (median, quartiles, 1.5 IQR whiskers) with every silo a dot
    over it: readable for hundreds of silos, where one bar per silo is not."""
    values = {m: np.asarray(v, float) for m, v in values.items() if len(v)}
    if not values:
        return False
    fig = _figure(7.0, max(2.5, 0.45 * len(values) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)[::-1]  # the first method on top
    ax.boxplot([values[m] for m in names], orientation="horizontal", widths=0.6, showfliers=False)
    rng = np.random.default_rng(0)  # the dots' vertical jitter only
    for i, m in enumerate(names, start=1):
        v = values[m]
        ax.scatter(v, i + rng.uniform(-0.18, 0.18, v.size), s=6, alpha=0.5, color="C0", zorder=3)
        ax.plot([v.mean()], [i], marker="D", color="k", markersize=4, zorder=4)
    ax.set_yticks(range(1, len(names) + 1), [f"{m} ({values[m].size})" for m in names], fontsize=8)
    ax.set_xlabel("mAP@1000 (a dot per silo; diamond: the mean)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    return True


def plot_round_metric(series: Series, path, ylabel: str, title: str) -> bool:
    """One per-round scalar against round; nothing written (False) when the series is empty."""
    x, y = series
    if not len(x):
        return False
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, "o-", markersize=4)
    _integer_x(ax)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _save(fig, path)
    return True


def plot_comm(down: Series, up: Series, path, title: str = "communication per round") -> bool:
    """Bytes sent down (server to clients) and up per round, in MiB; False when neither series has a point."""
    if not len(down[0]) and not len(up[0]):
        return False
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if len(down[0]):
        ax.plot(down[0], np.asarray(down[1]) / 2**20, "o-", markersize=4, label="down (server to clients)")
    if len(up[0]):
        ax.plot(up[0], np.asarray(up[1]) / 2**20, "s--", markersize=4, label="up (clients to server)")
    _integer_x(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- privacy


_SWEEP_STYLES = {"DP-CroVCA": "o-", "DP-ITQ": "s--", "LSH": "^:"}


def plot_privacy_utility(curves: Mapping[str, Series], path, *, no_dp: float | None = None,
                         dp_head_noiseless: float | None = None, client_level: Series | None = None,
                         ticks: Sequence[float] = (), bits: int = 64,
                         delta: float = 1e-5, title: str = "Privacy–utility on the demo's silos") -> None:
    """mAP against ε (log scale) per method; the no-DP mAP and 0.85 of it as horizontal lines; the
    client-level DP points (ε per silo-update) beside them; ``dp_head_noiseless``, the DP head trained
    almost without noise, as a dotted line (where the DP-CroVCA curve tends)."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for method, (x, y) in curves.items():
        if len(x):
            ax.plot(x, y, _SWEEP_STYLES.get(method, "o-"), label=method)
    if no_dp is not None:
        ax.axhline(no_dp, color="k", lw=1, label="CroVCA, no DP")
        ax.axhline(0.85 * no_dp, color="k", lw=0.8, ls="--", label="0.85 × no DP")
    if dp_head_noiseless is not None:
        ax.axhline(dp_head_noiseless, color="tab:blue", lw=1, ls=":", label="DP-CroVCA's head, no noise")
    if client_level is not None and len(client_level[0]):
        ax.plot(*client_level, "d-.", color="tab:red", label="client-level DP (ε per silo-update)")
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(list(ticks), [f"{e:g}" for e in ticks])
    ax.set_xlabel(f"ε (δ = {delta:g})")
    ax.set_ylabel(f"mean mAP@1000, {bits} bits")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------- the gradient-leakage lab


def plot_leakage_batches(curves: Mapping[str, Series], path, *, chance: Series | None = None,
                         title: str = "Re-identification in the silo's index, no DP") -> None:
    """Top-10 re-identification rate against the victim's batch size (log x), one line per attack and
    number of local steps; the chance of as many random queries dotted."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-", label=name)
    if chance is not None and len(chance[0]):
        ax.plot(*chance, "k:", label="chance (as many blind guesses)")
    ax.set_xscale("log", base=2)
    xs = sorted({v for x, _ in curves.values() for v in x})
    if xs:
        ax.set_xticks(xs, [str(v) for v in xs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("victim's batch (images per local step)")
    ax.set_ylabel("victim in the top 10")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_leakage_epsilon(curves: Mapping[str, Series], path, *, bound: Series | None = None,
                         chance: Series | None = None, no_dp: Mapping[str, float] | None = None,
                         batch: int = 2) -> None:
    """Top-10 re-identification rate against the silo's ε (log x) under sample-level DP, with the bound
    every attacker obeys at that (ε, δ), the chance of as many blind guesses, and each attack's rate
    without DP as a horizontal line."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-", label=f"{name} under DP (measured)")
    if bound is not None and len(bound[0]):
        ax.plot(*bound, "k--", label="DP bound (ReRo, uniform prior)")
    if chance is not None and len(chance[0]):
        ax.plot(*chance, "k:", label="chance (as many blind guesses)")
    styles = ["-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1)), (0, (5, 5))]
    for i, (name, v) in enumerate((no_dp or {}).items()):
        ax.axhline(v, lw=0.9, ls=styles[i % len(styles)], color="grey", label=f"{name}, no DP")
    ax.set_xscale("log")
    xs = sorted({v for x, _ in curves.values() for v in x})
    if xs:
        ax.set_xticks(xs, [f"{v:.2g}" for v in xs])
        ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("ε of the victim's silo (its own accountant)")
    ax.set_ylabel("victim in the top 10")
    ax.set_title(f"Re-identification under sample-level DP, batch {batch}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def plot_image_pairs(top: np.ndarray, bottom: np.ndarray, path, *, title: str = "") -> None:
    """Two rows of images in [0, 1] ((n, H, W) grey or (n, H, W, 3)), column i pairing top[i] with bottom[i]."""
    n = max(len(top), 1)
    fig = _figure(1.3 * n + 0.4, 3.0)
    for row, imgs in enumerate((top, bottom)):
        for i, im in enumerate(imgs):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(np.clip(im, 0, 1), cmap="gray" if np.ndim(im) == 2 else None, vmin=0, vmax=1)
            ax.set_axis_off()
    if title:  # wrapped to the figure's width (two columns are narrow)
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, max(24, int(17 * (1.3 * n + 0.4))))), fontsize=8)
    _save(fig, path)
