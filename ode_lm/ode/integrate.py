"""``integrate``: solve the model's ODE with the configured solver and sensitivity."""

from __future__ import annotations

from jaxtyping import Array, Float

from ode_lm.config import ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.sensitivities import SENSITIVITIES
from ode_lm.ode.stepping import T0, T1, SolveStats, fixed_grid

__all__ = ["T0", "T1", "SolveStats", "fixed_grid", "integrate"]


def integrate(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig
              ) -> tuple[Float[Array, "*state"], SolveStats]:
    """Solve ``dx/dt = field(t, x)`` from ``x(0) = x0`` to ``t = 1``; return ``x(1)`` and stats.

    Fixed steps use the grid ``t_n = n / steps``; adaptive solves start at
    ``dt0 = 1/steps`` under a PID controller and may take up to ``ode.max_steps`` steps.
    ``ode.adjoint`` names the sensitivity (``sensitivities.py``).
    """
    if ode.adjoint not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {ode.adjoint!r}; choose one of {', '.join(SENSITIVITIES)}")
    if ode.reversible and ode.adjoint != "reversible":
        raise ValueError(f"ODEConfig(reversible=True) conflicts with adjoint={ode.adjoint!r}; "
                         "pass adjoint='reversible' (config loading resolves the alias)")
    return SENSITIVITIES[ode.adjoint](field, x0, ode)
