"""How every solve walks over depth-time: the interval, the term, the step-size control."""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ode_lm.config import ODEConfig

T0, T1 = 0.0, 1.0


class SolveStats(NamedTuple):
    nfe: Int[Array, ""]  # vector-field evaluations of the forward solve
    steps: Int[Array, ""]  # steps taken (accepted + rejected)
    failed: Bool[Array, ""]  # an adaptive solve that hit ode.max_steps before t = 1


def _evaluate(t, x, field):
    return field(t, x)


# The field travels as diffrax's ``args`` (never closed over), so adjoints see its parameters.
TERM = diffrax.ODETerm(_evaluate)


def fixed_grid(steps: int, dtype=jnp.float32) -> Float[Array, " steps+1"]:
    """The depth-times ``0 = t_0 < ... < t_N = 1`` of a fixed-step solve."""
    return jnp.linspace(T0, T1, steps + 1, dtype=dtype)


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
