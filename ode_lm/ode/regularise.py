"""Regularisers of the learned dynamics (Finlay et al. 2020, "How to train your neural ODE").

Two integrals over the solve, per token (``B x T`` tokens of width ``D``)::

    kinetic  = 1/(B T) int_0^1 ||f(t, x(t))||^2 dt
    jacobian = 1/(B T) int_0^1 ||df/dx (t, x(t))||_F^2 dt
             ~ 1/(B T) int_0^1 ||eps^T df/dx||^2 dt,   eps ~ N(0, I) drawn once per solve

(Hutchinson: ``E ||eps^T J||^2 = tr(J J^T) = ||J||_F^2``.) Both are quadratures the solver
itself carries: ``Augmented`` appends them to the state, so the solve integrates
``d/dt (x, k, j) = (f, ||f||^2 / BT, ||eps^T J||^2 / BT)`` with the configured solver and
grid, and reverse mode differentiates them like the rest of the solve (``checkpoint`` and
``direct``). ``eps^T J`` is one vector-Jacobian product per evaluation, i.e. a backward
pass of the field inside the forward solve.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ode_lm.ode.field import VectorField

# (x, kinetic, jacobian): the solve's state with the two running integrals.
AugmentedState = tuple[Float[Array, "*state"], Float[Array, ""], Float[Array, ""]]


class Augmented(VectorField):
    """``inner`` with the regularisers' integrands appended to its state."""

    inner: VectorField
    probe: Float[Array, "*state"] | None  # Hutchinson's eps; None: no Jacobian term

    def __call__(self, t, state: AugmentedState) -> AugmentedState:
        x = state[0]
        tokens = x.size // x.shape[-1]
        if self.probe is None:
            f, jac = self.inner(t, x), jnp.zeros((), jnp.float32)
        else:
            f, vjp = jax.vjp(lambda y: self.inner(t, y), x)
            (row,) = vjp(self.probe.astype(f.dtype))
            jac = jnp.sum(jnp.square(row.astype(jnp.float32))) / tokens
        kinetic = jnp.sum(jnp.square(f.astype(jnp.float32))) / tokens
        return f, kinetic, jac

    def at_step(self, step):
        return Augmented(self.inner.at_step(step), self.probe)


def augment(x0: Float[Array, "*state"]) -> AugmentedState:
    zero = jnp.zeros((), jnp.float32)
    return x0, zero, zero
