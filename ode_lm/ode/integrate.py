"""``integrate``: solve the model's ODE with the configured solver and sensitivity."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import TRAINING_SOLVE_ADJOINTS, ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.regularise import Augmented, augment
from ode_lm.ode.sensitivities import SENSITIVITIES
from ode_lm.ode.solvers import SOLVER_SPECS
from ode_lm.ode.stepping import T0, T1, TERM, SolveStats, fixed_grid, jittered_grid, step_control

__all__ = ["T0", "T1", "SolveStats", "accepted_grid", "fixed_grid", "integrate", "jittered_grid",
           "training_solve", "TRAINING_SOLVE_ADJOINTS"]


def integrate(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig,
              key: PRNGKeyArray | None = None) -> tuple[Float[Array, "*state"], SolveStats]:
    """Solve ``dx/dt = field(t, x)`` from ``x(0) = x0`` to ``t = 1``; return ``x(1)`` and stats.

    Fixed steps use the grid ``t_n = n / steps``; adaptive solves start at
    ``dt0 = 1/steps`` under a PID controller and may take up to ``ode.max_steps`` steps.
    ``ode.adjoint`` names the sensitivity (``sensitivities.py``).

    ``key`` makes it a training solve: with ``ode.grid_jitter > 0`` it steps on a random grid
    (``jittered_grid``), and with ``ode.kinetic_weight`` or ``ode.jacobian_weight > 0`` it
    also integrates the regularisers (``regularise.py``) into ``stats.kinetic`` /
    ``stats.jacobian``. Without ``key`` (evaluation) neither applies.
    """
    if ode.adjoint not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {ode.adjoint!r}; choose one of {', '.join(SENSITIVITIES)}")
    if ode.reversible and ode.adjoint != "reversible":
        raise ValueError(f"ODEConfig(reversible=True) conflicts with adjoint={ode.adjoint!r}; "
                         "pass adjoint='reversible' (config loading resolves the alias)")
    if key is None or not training_solve(ode):
        return SENSITIVITIES[ode.adjoint](field, x0, ode)
    if ode.adaptive or ode.adjoint not in TRAINING_SOLVE_ADJOINTS:
        raise ValueError(f"ode.grid_jitter, ode.kinetic_weight and ode.jacobian_weight need fixed steps and "
                         f"adjoint {' or '.join(TRAINING_SOLVE_ADJOINTS)}; got adjoint={ode.adjoint!r}, "
                         f"adaptive={ode.adaptive}")
    k_grid, k_probe = jax.random.split(key)
    grid = (jittered_grid(k_grid, ode.steps, ode.grid_jitter, jnp.promote_types(x0.dtype, jnp.float32))
            if ode.grid_jitter > 0 else None)
    if not (ode.kinetic_weight > 0 or ode.jacobian_weight > 0):
        return SENSITIVITIES[ode.adjoint](field, x0, ode, grid=grid)
    probe = jax.random.normal(k_probe, x0.shape, x0.dtype) if ode.jacobian_weight > 0 else None
    (x1, kinetic, jacobian), stats = SENSITIVITIES[ode.adjoint](Augmented(field, probe), augment(x0), ode,
                                                                grid=grid)
    return x1, stats._replace(kinetic=kinetic, jacobian=None if probe is None else jacobian)


def training_solve(ode: ODEConfig) -> bool:
    """Whether a training solve differs from an evaluation solve (jitter or regularisers)."""
    return ode.grid_jitter > 0 or ode.kinetic_weight > 0 or ode.jacobian_weight > 0


def accepted_grid(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig
                  ) -> tuple[Float[Array, " max_steps+1"], Int[Array, ""]]:
    """The step grid an adaptive solve of ``x0`` accepts: ``(times, accepted_steps)``.

    ``times[:accepted_steps + 1]`` runs from 0 to 1; the rest is padding (``inf``). A
    fixed-step ``ode`` gives ``fixed_grid(ode.steps)``.
    """
    if not ode.adaptive:
        return fixed_grid(ode.steps, jnp.result_type(float)), jnp.asarray(ode.steps)
    control = step_control(ode)
    sol = diffrax.diffeqsolve(
        TERM, SOLVER_SPECS[ode.solver].make(), t0=T0, t1=T1, dt0=control.dt0, y0=x0, args=field,
        saveat=diffrax.SaveAt(steps=True), stepsize_controller=control.controller,
        max_steps=control.max_steps, throw=False)
    times = jnp.concatenate([jnp.asarray([T0], sol.ts.dtype), sol.ts])
    return times, sol.stats["num_accepted_steps"]
