"""The abstract vector field ``dx/dt = f(t, x)`` that every ODE family provides."""

from __future__ import annotations

import abc

import equinox as eqx
from jaxtyping import Array, Float


class VectorField(eqx.Module):
    """A module whose call is the derivative of the hidden state over depth-time ``t``.

    Its parameters are module leaves, so the backsolve adjoint (which differentiates the
    solve's ``args``) sees them: ``integrate`` passes the field as ``args`` and never closes
    over it.
    """

    @abc.abstractmethod
    def __call__(self, t: Float[Array, ""], x: Float[Array, "*state"]) -> Float[Array, "*state"]:
        ...
