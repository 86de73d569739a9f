"""Sensitivities (how gradients flow through a solve), by name.

Each entry is a solve ``(field, x0, ode) -> (x(1), SolveStats)`` whose gradient is the
sensitivity's:

- ``checkpoint``: backpropagate through the solver's operations, recomputing what is not
  stored. Exact discrete gradient. Fixed steps keep the ``N`` states and recompute each
  step's intermediates once (``fixed.py``, policy ``ode.checkpoint_saves``: ``states``, or
  ``matmuls``, which also keeps the matrix products' and fused attention's outputs);
  adaptive solves recompute from O(sqrt(max_steps)) checkpoints (diffrax
  ``RecursiveCheckpointAdjoint``).
- ``direct``: backpropagate through every step, storing everything (fixed steps: ``fixed.py``,
  policy ``everything``; adaptive: diffrax ``RecursiveCheckpointAdjoint`` with one checkpoint per
  step). Exact discrete gradient; memory grows linearly with steps. (diffrax's
  ``DirectAdjoint`` runs a nested, checkpointed loop whose memory is nearly flat in the
  steps, so it is not the store-everything reference.)
- ``backsolve``: solve the continuous adjoint ODE backwards in time (diffrax
  ``BacksolveAdjoint``). O(1) memory; an approximation of the discrete gradient whose
  error shrinks with the solver's error.
- ``reversible``: solve with an algebraically reversible scheme built on the chosen explicit
  Runge--Kutta solver and backpropagate by reconstructing its states step by step
  (``reversible.py``). Exact gradient of that scheme; O(1) memory in the number of steps.
"""

from __future__ import annotations

import functools
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ode_lm.config import ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.fixed import solve_fixed
from ode_lm.ode.reversible import integrate_reversible
from ode_lm.ode.solvers import SOLVER_SPECS
from ode_lm.ode.stepping import T0, T1, TERM, SolveStats, step_control

Solve = Callable[[VectorField, Float[Array, "*state"], ODEConfig], tuple[Float[Array, "*state"], SolveStats]]


def store_every_step(max_steps: int) -> diffrax.AbstractAdjoint:
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=max_steps)


def solve_with_adjoint(adjoint: Callable[[int], diffrax.AbstractAdjoint], field: VectorField,
                       x0: Float[Array, "*state"], ode: ODEConfig
                       ) -> tuple[Float[Array, "*state"], SolveStats]:
    """``ode.solver`` under diffrax ``diffeqsolve``, differentiated by ``adjoint(max_steps)``."""
    spec = SOLVER_SPECS[ode.solver]
    control = step_control(ode)
    sol = diffrax.diffeqsolve(
        TERM, spec.make(), t0=T0, t1=T1, dt0=control.dt0, y0=x0, args=field,
        saveat=diffrax.SaveAt(t1=True), stepsize_controller=control.controller,
        adjoint=adjoint(control.max_steps), max_steps=control.max_steps, throw=False)
    steps = sol.stats["num_steps"]
    failed = sol.result != diffrax.RESULTS.successful
    return sol.ys[-1], SolveStats(spec.nfe(steps), steps, failed)


# ode.unroll = "auto" writes out fixed-step solves of up to this many field evaluations on a
# GPU (the program and its compile time grow with them; the large benchmark step, 12 Euler
# steps on an H200: 36.96 ms unrolled against 39.89 ms scanned), and scans beyond and on a CPU,
# where the scan costs nothing extra and compiles faster.
AUTO_UNROLL_MAX_NFE = 16


def unrolls(ode: ODEConfig, backend: str | None = None) -> bool:
    """Whether a fixed-step backprop solve is written out step by step (``ode.unroll``)."""
    if ode.unroll == "auto":
        nfe = SOLVER_SPECS[ode.solver].nfe(ode.steps)
        return (backend or jax.default_backend()) == "gpu" and not ode.adaptive and nfe <= AUTO_UNROLL_MAX_NFE
    return ode.unroll == "unroll"


def solve_by_backprop(policy: Callable[[ODEConfig], str], adjoint: Callable[[int], diffrax.AbstractAdjoint],
                      field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig,
                      grid: Float[Array, " steps+1"] | None = None
                      ) -> tuple[Float[Array, "*state"], SolveStats]:
    """Backpropagation through the solver: a scan with memory ``policy(ode)`` on fixed steps
    (compiles once for any number of steps, no while-loop bookkeeping; written out step by step
    with ``ode.unroll``), else ``adjoint``. ``grid``: fixed steps on these traced times."""
    if ode.adaptive:
        if grid is not None:
            raise ValueError("an explicit grid needs fixed steps (ode.adaptive = False)")
        return solve_with_adjoint(adjoint, field, x0, ode)
    spec = SOLVER_SPECS[ode.solver]
    steps = jnp.asarray(ode.steps)
    x1 = solve_fixed(spec.make(), field, x0, ode.steps, policy(ode), unrolls(ode), grid)
    return x1, SolveStats(spec.nfe(steps), steps, jnp.asarray(False))


SENSITIVITIES: dict[str, Solve] = {
    "checkpoint": functools.partial(solve_by_backprop, lambda ode: ode.checkpoint_saves,
                                    lambda _: diffrax.RecursiveCheckpointAdjoint()),
    "direct": functools.partial(solve_by_backprop, lambda _: "everything", store_every_step),
    "backsolve": functools.partial(solve_with_adjoint, lambda _: diffrax.BacksolveAdjoint()),
    "reversible": integrate_reversible,
}
