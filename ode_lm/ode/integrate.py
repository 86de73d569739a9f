"""``integrate``: the one place ode-lm calls diffrax."""

from __future__ import annotations

import diffrax
from jaxtyping import Array, Float

from ode_lm.config import ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.reversible import integrate_reversible
from ode_lm.ode.sensitivities import SENSITIVITIES
from ode_lm.ode.solvers import SOLVER_SPECS
from ode_lm.ode.stepping import T0, T1, TERM, SolveStats, fixed_grid, step_control

__all__ = ["T0", "T1", "SolveStats", "fixed_grid", "integrate"]


def integrate(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig
              ) -> tuple[Float[Array, "*state"], SolveStats]:
    """Solve ``dx/dt = field(t, x)`` from ``x(0) = x0`` to ``t = 1``; return ``x(1)`` and stats.

    Fixed steps use the grid ``t_n = n / steps``; adaptive solves start at
    ``dt0 = 1/steps`` under a PID controller and may take up to ``ode.max_steps`` steps.
    ``ode.adjoint = "reversible"`` solves with the reversible scheme of ``reversible.py``.
    """
    if ode.reversible and ode.adjoint != "reversible":
        raise ValueError(f"ODEConfig(reversible=True) conflicts with adjoint={ode.adjoint!r}; "
                         "pass adjoint='reversible' (config loading resolves the alias)")
    if ode.adjoint == "reversible":
        return integrate_reversible(field, x0, ode)
    if ode.adjoint not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {ode.adjoint!r}; choose one of "
                         f"{', '.join([*SENSITIVITIES, 'reversible'])}")
    spec = SOLVER_SPECS[ode.solver]
    control = step_control(ode)
    sol = diffrax.diffeqsolve(
        TERM, spec.make(), t0=T0, t1=T1, dt0=control.dt0, y0=x0, args=field,
        saveat=diffrax.SaveAt(t1=True), stepsize_controller=control.controller,
        adjoint=SENSITIVITIES[ode.adjoint](), max_steps=control.max_steps, throw=False)
    steps = sol.stats["num_steps"]
    failed = sol.result != diffrax.RESULTS.successful
    return sol.ys[-1], SolveStats(spec.nfe(steps), steps, failed)
