"""``integrate``: solve the model's ODE with the configured solver and sensitivity."""

from __future__ import annotations

from typing import Mapping

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import TRAINING_SOLVE_ADJOINTS, ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.fixed import Policy
from ode_lm.ode.regularise import Augmented, augment
from ode_lm.ode.sensitivities import GENERIC_SAVES, Grid, sensitivity
from ode_lm.ode.solvers import SOLVER_SPECS
from ode_lm.ode.stepping import T0, T1, SolveStats, diffeqsolve, fixed_grid, jittered_grid, solve_dtype

__all__ = ["T0", "T1", "SolveStats", "accepted_grid", "fixed_grid", "integrate", "jittered_grid",
           "training_grid", "training_solve", "TRAINING_SOLVE_ADJOINTS"]

STEPS_KEY = 1  # folded into the grid's key: the number of steps of ode.steps_range


def integrate(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig,
              key: PRNGKeyArray | None = None, *, saves: Mapping[str, Policy] = GENERIC_SAVES
              ) -> tuple[Float[Array, "*state"], SolveStats]:
    """Solve ``dx/dt = field(t, x)`` from ``x(0) = x0`` to ``t = 1``; return ``x(1)`` and stats.

    Fixed steps use the grid ``t_n = n / steps``; adaptive solves start at
    ``dt0 = 1/steps`` under a PID controller and may take up to ``ode.max_steps`` steps.
    ``ode.adjoint`` names the sensitivity (``sensitivities.py``); ``saves`` holds the field's
    ``jax.checkpoint`` policies by ``ode.checkpoint_saves`` name (``ode_lm.nn.SAVES``).

    ``key`` makes it a training solve: with ``ode.grid_jitter > 0`` or ``ode.steps_range`` it
    steps on a random grid (``training_grid``), and with ``ode.kinetic_weight`` or
    ``ode.jacobian_weight > 0`` it also integrates the regularisers (``regularise.py``) into
    ``stats.kinetic`` / ``stats.jacobian``. Without ``key`` (evaluation) none applies.
    """
    sens = sensitivity(ode, saves)
    if key is None or not training_solve(ode):
        return sens.solve(field, x0, ode)
    if ode.adaptive or ode.adjoint not in TRAINING_SOLVE_ADJOINTS:
        raise ValueError(f"ode.grid_jitter, ode.steps_range, ode.kinetic_weight and ode.jacobian_weight need "
                         f"fixed steps and adjoint {' or '.join(TRAINING_SOLVE_ADJOINTS)}; got "
                         f"adjoint={ode.adjoint!r}, adaptive={ode.adaptive}")
    k_grid, k_probe = jax.random.split(key)
    grid = training_grid(k_grid, ode, solve_dtype(x0))
    if not (ode.kinetic_weight > 0 or ode.jacobian_weight > 0):
        return sens.solve(field, x0, ode, grid)
    probe = jax.random.normal(k_probe, x0.shape, x0.dtype) if ode.jacobian_weight > 0 else None
    (x1, kinetic, jacobian), stats = sens.solve(Augmented(field, probe), augment(x0), ode, grid)
    return x1, stats._replace(kinetic=kinetic, jacobian=None if probe is None else jacobian)


def training_solve(ode: ODEConfig) -> bool:
    """Whether a training solve differs from an evaluation solve (random grids or regularisers)."""
    return ode.grid_jitter > 0 or bool(ode.steps_range) or ode.kinetic_weight > 0 or ode.jacobian_weight > 0


def training_grid(key: PRNGKeyArray, ode: ODEConfig, dtype) -> Grid | None:
    """The grid of one training solve (None: the fixed grid of ``ode.steps``).

    With ``ode.steps_range = [lo, hi]`` the number of steps ``N`` is drawn uniformly from
    ``lo .. hi`` and the solve is a masked one of ``hi`` steps (``fixed.py``):
    ``t_n = n / N`` up to ``N``, the remaining steps empty, so one compiled program serves
    every ``N``. ``ode.grid_jitter`` then moves the interior times of that grid (``key``).
    """
    if not ode.steps_range:
        return Grid(jittered_grid(key, ode.steps, ode.grid_jitter, dtype)) if ode.grid_jitter > 0 else None
    lo, hi = ode.steps_range
    taken = jax.random.randint(jax.random.fold_in(key, STEPS_KEY), (), lo, hi + 1)
    return Grid(fixed_grid(hi, dtype, taken=taken, key=key, jitter=ode.grid_jitter), taken)


def accepted_grid(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig
                  ) -> tuple[Float[Array, " max_steps+1"], Int[Array, ""]]:
    """The step grid an adaptive solve of ``x0`` accepts: ``(times, accepted_steps)``.

    ``times[:accepted_steps + 1]`` runs from 0 to 1; the rest is padding (``inf``). A
    fixed-step ``ode`` gives ``fixed_grid(ode.steps)`` in the solve's dtype.
    """
    if not ode.adaptive:
        return fixed_grid(ode.steps, solve_dtype(x0)), jnp.asarray(ode.steps)
    sol = diffeqsolve(SOLVER_SPECS[ode.solver].make(), field, x0, ode, diffrax.SaveAt(steps=True))
    times = jnp.concatenate([jnp.asarray([T0], sol.ts.dtype), sol.ts])
    return times, sol.stats["num_accepted_steps"]
