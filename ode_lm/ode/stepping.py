"""How every solve walks over depth-time: the interval, the term, the step-size control."""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

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


def fixed_grid(steps: int, dtype=jnp.float32) -> Float[Array, " steps+1"]:
    """The depth-times ``0 = t_0 < ... < t_N = 1`` of a fixed-step solve."""
    return jnp.linspace(T0, T1, steps + 1, dtype=dtype)


def jittered_grid(key: PRNGKeyArray, steps: int, jitter: float, dtype=jnp.float32
                  ) -> Float[Array, " steps+1"]:
    """A random grid on ``steps`` steps: ``t_0 = 0``, ``t_N = 1`` and, for ``0 < n < N``,

        t_n = (n + jitter * (u_n - 1/2)) / N,    u_n ~ U(0, 1) independent.

    Each interior time moves uniformly within ``jitter`` of a cell around ``n / N``, so for
    ``jitter <= 1`` the times stay sorted and the step sizes are positive and sum to 1;
    ``jitter = 1`` samples one time per cell (stratified), ``0`` is ``fixed_grid``.
    """
    u = jax.random.uniform(key, (steps - 1,), dtype)
    interior = (jnp.arange(1, steps, dtype=dtype) + jitter * (u - 0.5)) / steps
    return jnp.concatenate([jnp.asarray([T0], dtype), interior, jnp.asarray([T1], dtype)])


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
