"""How every solve walks over depth-time: the interval, the term, the step-size control."""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ode_lm.config import ODEConfig

T0, T1 = 0.0, 1.0


class SolveStats(NamedTuple):
    nfe: Int[Array, ""]  # vector-field evaluations of the forward solve
    steps: Int[Array, ""]  # steps taken (accepted + rejected)
    failed: Bool[Array, ""]  # an adaptive solve that hit ode.max_steps before t = 1
    # Regularisers of a training solve (regularise.py), None when not asked for:
    kinetic: Float[Array, ""] | None = None  # integral of ||f||^2 dt, per token
    jacobian: Float[Array, ""] | None = None  # integral of ||df/dx||_F^2 dt (Hutchinson), per token


def _evaluate(t, x, field):
    return field(t, x)


# The field travels as diffrax's ``args`` (never closed over), so adjoints see its parameters.
TERM = diffrax.ODETerm(_evaluate)


def solve_dtype(x0: PyTree) -> jnp.dtype:
    """The dtype of a solve's times and state: at least float32 (float64 for float64 solves)."""
    return jnp.promote_types(jax.tree.leaves(x0)[0].dtype, jnp.float32)


def fixed_grid(steps: int, dtype=jnp.float32, *, taken: Int[Array, ""] | None = None,
               key: PRNGKeyArray | None = None, jitter: float = 0.0) -> Float[Array, " steps+1"]:
    """The depth-times ``t_0 .. t_steps`` of a fixed-step solve: the one grid constructor.

    Plainly ``t_n = n / N`` with ``N = steps``. With ``taken`` (a traced step count
    ``1 <= N <= steps``) the first ``N + 1`` times are that grid and the rest are 1: the
    steps past ``N`` are empty, which a masked solve skips (``ode.steps_range``). With
    ``key`` and ``jitter > 0`` each interior time ``0 < n < N`` moves at random::

        t_n = (n + jitter * (u_n - 1/2)) / N,    u_n ~ U(0, 1) independent,

    uniformly within ``jitter`` of a cell around ``n / N``, so for ``jitter <= 1`` the times
    stay sorted and the step sizes are positive and sum to 1; ``jitter = 1`` samples one time
    per cell (stratified).
    """
    if taken is None and (key is None or jitter == 0):
        return jnp.linspace(T0, T1, steps + 1, dtype=dtype)
    n = jnp.arange(steps + 1, dtype=dtype)
    if key is not None and jitter > 0:
        u = jax.random.uniform(key, (steps - 1,), dtype)
        n = jnp.concatenate([n[:1], n[1:-1] + jitter * (u - 0.5), n[-1:]])
    count = steps if taken is None else taken.astype(dtype)
    return jnp.where(jnp.arange(steps + 1) >= count, jnp.asarray(T1, dtype), n / count)


def jittered_grid(key: PRNGKeyArray, steps: int, jitter: float, dtype=jnp.float32
                  ) -> Float[Array, " steps+1"]:
    """A random grid on ``steps`` steps (``fixed_grid`` with ``key`` and ``jitter``); ``t_0 = 0``,
    ``t_N = 1``; ``jitter = 0`` is the plain grid."""
    return fixed_grid(steps, dtype, key=key, jitter=jitter)


class StepControl(NamedTuple):
    controller: diffrax.AbstractStepSizeController
    dt0: float
    max_steps: int


def step_control(ode: ODEConfig) -> StepControl:
    """Fixed steps on ``t_n = n / steps``, or a PID controller starting at ``dt0 = 1/steps``."""
    dt0 = (T1 - T0) / ode.steps
    if ode.adaptive:
        controller = diffrax.PIDController(rtol=ode.rtol, atol=ode.atol, pcoeff=ode.pcoeff,
                                           icoeff=ode.icoeff, dcoeff=ode.dcoeff)
        return StepControl(controller, dt0, ode.max_steps)
    # ConstantStepSize rather than StepTo: the backsolve adjoint must run the grid backwards.
    return StepControl(diffrax.ConstantStepSize(), dt0, ode.steps)


def diffeqsolve(solver: diffrax.AbstractSolver, field, x0: PyTree, ode: ODEConfig, saveat: diffrax.SaveAt,
                adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint()) -> diffrax.Solution:
    """The one assembly of diffrax's ``diffeqsolve`` over ``[T0, T1]``: the field as ``args``,
    the step control of ``ode`` (``step_control``), failures reported in the solution (no throw)."""
    control = step_control(ode)
    return diffrax.diffeqsolve(TERM, solver, t0=T0, t1=T1, dt0=control.dt0, y0=x0, args=field, saveat=saveat,
                               stepsize_controller=control.controller, adjoint=adjoint,
                               max_steps=control.max_steps, throw=False)
