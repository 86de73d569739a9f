"""``ode-lm analyze RUN_DIR --out DIR``: is the trained model a resolved ODE?

Parts (``analysis.json`` keys), each with a figure and a section of ``report.md``:

- ``refinement``: loss and logits against NFE, the discretisation gap, convergence orders
  (``refinement.py``), on ``--batches`` held-out batches;
- ``jacobian_spectrum``, ``lyapunov``, ``energy``: the dynamics along the RK4 trajectory of
  the first held-out sequence (``dynamics.py``);
- ``gates``: the field's dependence on ``t`` (``gates.py``).

``standard`` has no vector field: it gets ``energy`` over its layers (``||x_l||``, the
rate ``L * ||block(x_l)||`` that an Euler step of ``1/L`` would integrate, and its sum).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ode_lm.ablate.report import describe_hardware
from ode_lm.analyze import dynamics, figures
from ode_lm.analyze.gates import gate_rows
from ode_lm.analyze.refinement import STEP_COUNTS, refinement
from ode_lm.config import ODE_FAMILIES
from ode_lm.data import BatchSampler, load_corpus
from ode_lm.errors import UserError
from ode_lm.paths import prepare_output_dir
from ode_lm.train import load_run

TRAJECTORY_STEPS = 32  # RK4 steps of the analysed trajectory
SPECTRUM_TIMES = 9  # times t = 0, 1/8, ..., 1 at which the Jacobian's spectrum is computed
ARNOLDI_STEPS = 16  # Krylov dimension: the leading ~ARNOLDI_STEPS/2 eigenvalues are reliable
LYAPUNOV_EXPONENTS = 4
GATE_TIMES = 65


def check_out_dir(out: Path) -> Path:
    """``out`` created as ode-lm's output directory (``ode_lm.paths``): new, empty, or holding
    a previous analysis (``analysis.json``, overwritten file by file); nothing is deleted."""
    return prepare_output_dir(out, "--out", markers=("analysis.json",))


def _dynamics(model, x0, seed: int, bar) -> dict:
    field = model.field
    ts, xs = dynamics.trajectory(field, x0, TRAJECTORY_STEPS)
    stride = TRAJECTORY_STEPS // (SPECTRUM_TIMES - 1)
    spectra = []
    for n in range(0, TRAJECTORY_STEPS + 1, stride):
        spectra.append((float(ts[n]), dynamics.spectrum_at(field, ts[n], xs[n], ARNOLDI_STEPS, seed + n)))
        bar.update(1)
    exponents = dynamics.lyapunov(field, ts, xs, LYAPUNOV_EXPONENTS, seed)
    bar.update(1)
    energy = {k: np.asarray(v, np.float64).tolist() for k, v in dynamics.energy(field, ts, xs).items()}
    gate_ts = np.linspace(0.0, 1.0, GATE_TIMES)
    gates = gate_rows(field, gate_ts)
    bar.update(1)
    return {
        "jacobian_spectrum": {
            "t": [t for t, _ in spectra],
            "eigenvalues": [[[float(v.real), float(v.imag)] for v in s["eigenvalues"][:ARNOLDI_STEPS // 2]]
                            for _, s in spectra],
            "spectral_radius": [s["spectral_radius"] for _, s in spectra],
            "norm": [s["norm"] for _, s in spectra],
            "arnoldi_steps": ARNOLDI_STEPS, "state_size": int(x0.size)},
        "lyapunov": {"exponents": exponents.tolist(), "trajectory_steps": TRAJECTORY_STEPS,
                     "sum": float(exponents.sum())},
        "energy": {"t": np.asarray(ts, np.float64).tolist(), **energy},
        "gates": None if gates is None else {"kind": gates["kind"], "t": gate_ts.tolist(),
                                             "matrices": {k: v.tolist() for k, v in gates["matrices"].items()}},
    }


def _standard_energy(model, tokens) -> dict:
    x = model.embedding(tokens).astype(jnp.float32)
    layers = len(model.layers)
    xs, rates = [x], []
    for block in model.layers:
        dx = block(x)
        rates.append(layers * dx)
        x = x + dx
        xs.append(x)
    norms = [float(jnp.linalg.norm(v, axis=-1).mean()) for v in xs]
    f_sq = [float(jnp.sum(jnp.square(r), axis=-1).mean()) for r in rates]
    kinetic = np.concatenate([[0.0], np.cumsum(np.asarray(f_sq) / layers)]).tolist()
    return {"t": (np.arange(layers + 1) / layers).tolist(), "layers": layers, "x_norm": norms,
            "f_norm": [*np.sqrt(f_sq).tolist(), float("nan")], "kinetic": kinetic}


def analyze(run: str | Path, out: str | Path, *, batches: int = 4, seed: int = 0, progress: bool = True,
            say: Callable[[str], None] = print, step_counts=STEP_COUNTS) -> Path:
    """Analyse the newest checkpoint of ``run``; write ``out/analysis.json``, ``out/report.md``
    and the figures; return the report's path."""
    if batches < 1:
        raise UserError(f"--batches {batches}: must be >= 1")
    loaded = load_run(run, warn=say)
    out = check_out_dir(Path(out))
    cfg = loaded.config
    corpus = load_corpus(cfg.data)
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    tokens = sampler.val_batch(0)[0][:1]
    result = {"run": str(run), "checkpoint": str(loaded.checkpoint), "step": loaded.step,
              "family": cfg.model.family, "trained_ode": {"solver": cfg.ode.solver, "steps": cfg.ode.steps,
                                                          "adaptive": cfg.ode.adaptive},
              "seed": seed, "batches": batches}
    if cfg.model.family in ODE_FAMILIES:
        say(f"analysing {loaded.checkpoint} (step {loaded.step}, {cfg.model.family}, trained with "
            f"{cfg.ode.solver} x {cfg.ode.steps}) on {batches} held-out batches")
        result["refinement"] = refinement(loaded.model, sampler, cfg.ode, batches, step_counts=step_counts,
                                          progress=progress, say=say)
        with tqdm(total=SPECTRUM_TIMES + 2, desc="dynamics", disable=not progress, dynamic_ncols=True) as bar:
            result.update(_dynamics(loaded.model, loaded.model.embedding(tokens).astype(jnp.float32), seed, bar))
    else:
        result["energy"] = _standard_energy(loaded.model, tokens)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    report = out / "report.md"
    report.write_text(_report(result, out))
    return report


def _report(r: dict, out: Path) -> str:
    trained = (f"{r['energy']['layers']} discrete layers (no vector field: refinement, spectrum, Lyapunov "
               "exponents and gates do not apply)" if "refinement" not in r else
               f"trained with {r['trained_ode']['solver']} x {r['trained_ode']['steps']}"
               f"{' (adaptive)' if r['trained_ode']['adaptive'] else ''}")
    lines = [f"# Analysis of {Path(r['run']).name}", "",
             f"- Checkpoint: `{r['checkpoint']}` (step {r['step']}); family {r['family']}; {trained}",
             f"- Held-out data: {r['batches']} batches; seed {r['seed']}",
             f"- Hardware: {describe_hardware()}", ""]
    if "refinement" in r:
        p = r["refinement"]
        ref = p["reference"]
        orders = ", ".join(f"{s} {'—' if o is None else f'{o:.2f}'}" for s, o in p["orders"].items())
        lines += ["## refinement", "",
                  f"Trained-grid loss {p['trained_loss']:.4f}, converged loss {p['converged_loss']:.4f} "
                  f"({ref['solver']} adaptive, rtol {ref['rtol']}, atol {ref['atol']}, NFE {ref['nfe']:.0f}"
                  f"{', did not converge' if ref['failed'] else ''}): discretisation gap "
                  f"**{100 * p['gap']:+.2f}%**. Observed orders (max logit change): {orders}.", "",
                  "| solver | steps | NFE | val loss | max logit change |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {x['solver']} | {x['steps']} | {x['nfe']:.0f} | {x['val_loss']:.4f} | "
                  f"{x['max_logit_change']:.2e} |" for x in p["rows"]]
        lines += ["", f"![refinement]({figures.refinement_figure(p, out / 'refinement.png').name})", ""]
    if "jacobian_spectrum" in r:
        s, ly = r["jacobian_spectrum"], r["lyapunov"]
        lines += ["## jacobian_spectrum", "",
                  f"Arnoldi ({s['arnoldi_steps']} JVPs per time) on the {s['state_size']:,}-dimensional state "
                  "of the first held-out sequence along its RK4 trajectory.", "",
                  "| t | spectral radius | 2-norm |", "| --- | --- | --- |"]
        lines += [f"| {t:.3f} | {a:.3f} | {b:.3f} |" for t, a, b in zip(s["t"], s["spectral_radius"], s["norm"])]
        lines += ["", f"![spectrum]({figures.spectrum_figure(s, out / 'jacobian_spectrum.png').name})", "",
                  "## lyapunov", "",
                  "Finite-time exponents over [0, 1]: " + ", ".join(f"{e:.3f}" for e in ly["exponents"])
                  + " (log of the linearised flow's leading singular values).", "",
                  f"![lyapunov]({figures.lyapunov_figure(ly, out / 'lyapunov.png').name})", ""]
    e = r["energy"]
    lines += ["## energy", "", f"||x|| from {e['x_norm'][0]:.3f} to {e['x_norm'][-1]:.3f}; kinetic energy "
              f"over [0, 1]: {e['kinetic'][-1]:.4g} per token.", "",
              f"![energy]({figures.energy_figure(e, out / 'energy.png').name})", ""]
    if r.get("gates"):
        lines += ["## gates", "", f"{r['gates']['kind']} against t.", "",
                  f"![gates]({figures.gates_figure(r['gates'], out / 'gates.png').name})", ""]
    elif "jacobian_spectrum" in r:
        lines += ["## gates", "", "This family's field has no time-indexed weights.", ""]
    return "\n".join(lines)
