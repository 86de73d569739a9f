"""The analysis figures (matplotlib, Agg backend, PNG), one per part."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ode_lm.ablate.plots import _save, pyplot


def refinement_figure(part: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (ax_loss, ax_change) = plt.subplots(1, 2, figsize=(11, 4.2))
    for solver in dict.fromkeys(r["solver"] for r in part["rows"]):
        rows = [r for r in part["rows"] if r["solver"] == solver]
        order = part["orders"].get(solver)
        label = solver + ("" if order is None else f" (order {order:.2f})")
        ax_loss.plot([r["nfe"] for r in rows], [r["val_loss"] for r in rows], marker=".", label=solver)
        ax_change.plot([r["nfe"] for r in rows], [max(r["max_logit_change"], 1e-12) for r in rows],
                       marker=".", label=label)
    ax_loss.axhline(part["converged_loss"], color="k", ls="--", lw=1, label="adaptive reference")
    ax_loss.axhline(part["trained_loss"], color="tab:red", ls=":", lw=1, label="trained grid")
    ax_loss.set(xscale="log", xlabel="NFE per forward pass", ylabel="validation loss (nats/token)",
                title=f"discretisation gap {100 * part['gap']:+.2f}%")
    ax_change.set(xscale="log", yscale="log", xlabel="NFE per forward pass",
                  ylabel="max |logit - reference logit|", title="convergence to the reference solve")
    for ax in (ax_loss, ax_change):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def spectrum_figure(part: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    ts = part["t"]
    ax_t.plot(ts, part["spectral_radius"], marker=".", label="spectral radius of df/dx")
    ax_t.plot(ts, part["norm"], marker=".", label="2-norm of df/dx")
    ax_t.set(xlabel="depth-time t", ylabel="per unit depth-time", title="Jacobian along the trajectory")
    ax_t.legend(fontsize="small")
    colours = plt.cm.viridis(np.linspace(0, 1, len(ts)))
    for t, values, c in zip(ts, part["eigenvalues"], colours):
        values = np.asarray(values)
        ax_c.scatter(values[:, 0], values[:, 1], s=10, color=c, label=f"t = {t:.2f}")
    ax_c.axvline(0, color="k", lw=0.5)
    ax_c.set(xlabel="Re", ylabel="Im", title="leading eigenvalues (Arnoldi)")
    ax_c.legend(fontsize="x-small", ncol=2)
    for ax in (ax_t, ax_c):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def lyapunov_figure(part: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    exps = part["exponents"]
    ax.bar(range(1, len(exps) + 1), exps)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="index", ylabel="exponent (per unit depth-time)",
           title="finite-time Lyapunov exponents over [0, 1]")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def energy_figure(part: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("x_norm", "f_norm", "kinetic"),
                              ("mean ||x(t)|| per token", "rms ||f(t, x(t))|| per token",
                               "kinetic energy int_0^t ||f||^2 ds per token")):
        ax.plot(part["t"], part[key], marker=".")
        ax.set(xlabel="depth-time t" if part.get("layers") is None else "layer / layers", title=label)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def gates_figure(part: dict, path: Path) -> Path:
    plt = pyplot()
    names = list(part["matrices"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8))
    for ax, name in zip(np.atleast_1d(axes), names):
        values = np.asarray(part["matrices"][name])
        image = ax.imshow(values.T, aspect="auto", origin="lower", extent=(0, 1, 0, values.shape[1]),
                          cmap="viridis", interpolation="nearest")
        ax.set(xlabel="depth-time t", ylabel="output feature", title=name)
        fig.colorbar(image, ax=ax)
    fig.suptitle(part["kind"] + " against t")
    return _save(fig, path)
