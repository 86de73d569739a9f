"""Ablation figures (matplotlib, Agg backend, PNG).

Curves over seeds are drawn as the mean with a min-max band: with 3 to 5 seeds the band
shows every run, where a +-std band would pretend to a normal spread it cannot estimate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ode_lm.errors import UserError


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("ode-lm ablate needs matplotlib for its plots; install it with "
                        "pip install 'ode-lm[ablate]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[list[dict]]], x: str, xlabel: str, path: Path,
                title: str) -> Path:
    """``curves``: label -> one list of val records (``step``, ``wall_s``, ``loss``) per seed.

    Seeds are aligned by evaluation step; x is the seeds' mean of ``x`` at that step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in curves.items():
        steps = sorted(set.intersection(*(set(r["step"] for r in run) for run in runs))) if runs else []
        if not steps:
            continue
        at = [{r["step"]: r for r in run} for run in runs]
        xs = np.array([np.mean([a[s][x] for a in at]) for s in steps])
        ys = np.array([[a[s]["loss"] for a in at] for s in steps])
        line, = ax.plot(xs, ys.mean(axis=1), label=f"{label} (n={len(runs)})", marker=".")
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(axis=1), ys.max(axis=1), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_series(series: dict[str, Sequence[tuple[float, float, float, str]]], path: Path, *,
                xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path:
    """``series``: label -> points ``(x, y, y_err, annotation)``; a series of several points
    is joined by a line (e.g. one solver over its step counts), a single point is a marker."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points = sorted(p for p in points if np.isfinite(p[0]) and np.isfinite(p[1]))
        if not points:
            continue
        xs, ys, errs, notes = zip(*points)
        errs = [0.0 if not np.isfinite(e) else e for e in errs]
        ax.errorbar(xs, ys, yerr=errs, label=label, marker="o", capsize=3,
                    linestyle="-" if len(points) > 1 else "none")
        for xv, yv, note in zip(xs, ys, notes):
            if note:
                ax.annotate(note, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_bars(values: dict[str, tuple[float, float]], path: Path, *, ylabel: str, title: str) -> Path:
    """One bar per label, ``(mean, std)``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(values)), 4.5))
    labels = list(values)
    means = [values[k][0] for k in labels]
    errs = [0.0 if not np.isfinite(values[k][1]) else values[k][1] for k in labels]
    ax.bar(range(len(labels)), means, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
