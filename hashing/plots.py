"""Small matplotlib figures for run folders, written atomically as PNG (Agg, no display)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .atomic import atomic_path


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


def plot_table_bars(rows: list[dict], metric: str, path, title: str) -> None:
    """Grouped bars: methods x bit lengths for one metric."""
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
