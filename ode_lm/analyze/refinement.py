"""Does the trained model converge under refinement? Loss and logits against NFE.

A continuous-depth model is one function only if finer solves of its ODE converge. For a
solver of order ``p`` on a smooth field, the error after ``N`` steps falls as
``C N^-p``, so between ``N`` and ``2N`` steps ``log2(e_N / e_2N)`` estimates ``p``
(``observed_order``). The reference here is a tight adaptive solve; the *discretisation
gap* of a run is

    gap = (L_trained_grid - L_converged) / L_converged

with ``L`` the held-out loss: negative when the trained grid beats the ODE it
discretises (the weights fit the grid, not the ODE), about zero for a resolved model.
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ode_lm.ablate.depth import eval_ode
from ode_lm.config import ODEConfig
from ode_lm.data import BatchSampler
from ode_lm.ode import VectorField, integrate
from ode_lm.train.steps import token_cross_entropy

SOLVERS = ("euler", "rk4", "tsit5")
STEP_COUNTS = (1, 2, 4, 8, 16, 32, 64)
# The reference of refinement: a tight adaptive solve (float32 states: tolerances near 1e-6).
REFERENCE = {"solver": "tsit5", "adaptive": True, "rtol": 1e-6, "atol": 1e-6, "max_steps": 4096, "steps": 64}
ERROR_FLOOR = 1e-5  # float32 logits: changes below this are rounding, not discretisation


def observed_order(steps: list[int], errors: list[float], floor: float = ERROR_FLOOR) -> float | None:
    """The slope ``log(e_i / e_{i+1}) / log(N_{i+1} / N_i)`` in the asymptotic regime: the mean
    over the last two pairs of successive step counts whose errors both lie above ``floor``
    (coarse grids are pre-asymptotic; below the floor is rounding). None without such a pair."""
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i])
              for i in range(len(steps) - 1) if errors[i] > floor and errors[i + 1] > floor]
    return float(np.mean(slopes[-2:])) if slopes else None


def solve_errors(field: VectorField, x0, exact, solver: str, step_counts=STEP_COUNTS) -> list[float]:
    """Max-norm errors of fixed-step solves of ``field`` from ``x0`` against ``exact = x(1)``."""
    return [float(jnp.max(jnp.abs(integrate(field, x0, ODEConfig(solver=solver, steps=n))[0] - exact)))
            for n in step_counts]


@eqx.filter_jit
def _logits(model, tokens, targets, ode: ODEConfig):
    logits, stats = model(tokens, ode)
    loss = token_cross_entropy(logits, targets).mean()  # the training loss's formula
    return logits.astype(jnp.float32), loss, stats.nfe, stats.failed


def refinement(model, sampler: BatchSampler, ode: ODEConfig, batches: int, *,
               solvers=SOLVERS, step_counts=STEP_COUNTS, progress: bool = True,
               say: Callable[[str], None] = print) -> dict:
    """Held-out loss and max logit change (against ``REFERENCE``) of every solver at every
    step count, the trained grid's loss, the gap and each solver's observed order."""
    settings = [(s, n) for s in solvers for n in step_counts]
    reference = eval_ode(ode, **REFERENCE)
    ref_logits, ref_loss, ref_nfe, failed = [], [], [], False
    for i in range(batches):
        logits, loss, nfe, bad = _logits(model, *sampler.val_batch(i), reference)
        failed |= bool(bad)
        ref_logits.append(logits), ref_loss.append(float(loss)), ref_nfe.append(int(nfe))
    rows = []
    for solver, n in tqdm(settings, desc="refinement", unit="solve", disable=not progress, dynamic_ncols=True):
        losses, change, nfes = [], 0.0, []
        for i in range(batches):
            logits, loss, nfe, _ = _logits(model, *sampler.val_batch(i), eval_ode(ode, solver=solver, steps=n,
                                                                                  adaptive=False))
            losses.append(float(loss)), nfes.append(int(nfe))
            change = max(change, float(jnp.max(jnp.abs(logits - ref_logits[i]))))
        rows.append({"solver": solver, "steps": n, "nfe": float(np.mean(nfes)),
                     "val_loss": float(np.mean(losses)), "max_logit_change": change})
    if failed:
        say(f"warning: the adaptive reference ({REFERENCE['solver']}, rtol {REFERENCE['rtol']}) reached "
            f"max_steps = {REFERENCE['max_steps']}; its logits are not converged")
    trained = eval_ode(ode)
    trained_loss = float(np.mean([float(_logits(model, *sampler.val_batch(i), trained)[1]) for i in range(batches)]))
    converged = float(np.mean(ref_loss))
    orders = {s: observed_order([r["steps"] for r in rows if r["solver"] == s],
                                [r["max_logit_change"] for r in rows if r["solver"] == s]) for s in solvers}
    return {"rows": rows, "orders": orders, "trained_loss": trained_loss,
            "reference": {**REFERENCE, "val_loss": converged, "nfe": float(np.mean(ref_nfe)),
                          "failed": failed},
            "converged_loss": converged, "gap": (trained_loss - converged) / converged}
