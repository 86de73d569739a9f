"""``integrate``: the one place ode-lm calls diffrax."""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ode_lm.config import ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.fixed import T0, T1, _evaluate, fixed_grid, solve_fixed
from ode_lm.ode.sensitivities import FIXED_STEP_POLICIES, SENSITIVITIES
from ode_lm.ode.solvers import SOLVER_SPECS


class SolveStats(NamedTuple):
    nfe: Int[Array, ""]  # vector-field evaluations of the forward solve
    steps: Int[Array, ""]  # steps taken (accepted + rejected)
    failed: Bool[Array, ""]  # an adaptive solve that hit ode.max_steps before t = 1


def integrate(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig
              ) -> tuple[Float[Array, "*state"], SolveStats]:
    """Solve ``dx/dt = field(t, x)`` from ``x(0) = x0`` to ``t = 1``; return ``x(1)`` and stats.

    Fixed steps use the grid ``t_n = n / steps``; adaptive solves start at
    ``dt0 = 1/steps`` under a PID controller and may take up to ``ode.max_steps`` steps.
    Fixed-step solves whose gradient is backpropagation through the solver (``checkpoint``,
    ``direct``) run as a scan over the solver's steps (``ode_lm.ode.fixed``); everything
    else goes through ``diffrax.diffeqsolve``.
    """
    if ode.adjoint not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {ode.adjoint!r}; choose one of {', '.join(SENSITIVITIES)}")
    spec = SOLVER_SPECS[ode.solver]
    if not ode.adaptive and ode.adjoint in FIXED_STEP_POLICIES:
        x1 = solve_fixed(spec.make(), field, x0, ode.steps, FIXED_STEP_POLICIES[ode.adjoint])
        steps = jnp.asarray(ode.steps)
        return x1, SolveStats(spec.nfe(steps), steps, jnp.asarray(False))
    if ode.adaptive:
        controller = diffrax.PIDController(rtol=ode.rtol, atol=ode.atol, pcoeff=ode.pcoeff,
                                           icoeff=ode.icoeff, dcoeff=ode.dcoeff)
        dt0, max_steps = (T1 - T0) / ode.steps, ode.max_steps
    else:
        # ConstantStepSize rather than StepTo: the backsolve adjoint must run the grid backwards.
        controller = diffrax.ConstantStepSize()
        dt0, max_steps = (T1 - T0) / ode.steps, ode.steps
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_evaluate), spec.make(), t0=T0, t1=T1, dt0=dt0, y0=x0, args=field,
        saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
        adjoint=SENSITIVITIES[ode.adjoint](), max_steps=max_steps, throw=False)
    steps = sol.stats["num_steps"]
    failed = sol.result != diffrax.RESULTS.successful
    return sol.ys[-1], SolveStats(spec.nfe(steps), steps, failed)
