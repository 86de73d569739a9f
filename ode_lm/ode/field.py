"""The abstract vector field ``dx/dt = f(t, x)`` that every ODE family provides."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree


def cast_floating(tree: PyTree, dtype) -> PyTree:
    """Cast every floating-point array leaf of ``tree`` to ``dtype``."""
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


class VectorField(eqx.Module):
    """A module whose call is the derivative of the hidden state over depth-time ``t``.

    Its parameters are module leaves, so the backsolve adjoint (which differentiates the
    solve's ``args``) sees them: ``integrate`` passes the field as ``args`` and never closes
    over it.
    """

    @abc.abstractmethod
    def __call__(self, t: Float[Array, ""], x: Float[Array, "*state"]) -> Float[Array, "*state"]:
        ...

    def at_step(self, step: int | Int[Array, ""]) -> "VectorField":
        """The field that fixed solver step ``step`` evaluates: itself, unless the field
        renews something per step (dropout masks with ``model.dropout_masks = "per_step"``)."""
        return self


class CastField(VectorField):
    """Evaluate ``inner`` in a lower ``dtype`` while the solver's state stays wider.

    Mixed precision for ODEs: the state ``x`` and the step/error arithmetic stay in float32
    (a bfloat16 state would lose the small ``dt * f`` increments), the block runs in bf16.

    ``inner``'s parameters are cast at every evaluation, not once before the solve: a solve
    evaluates the same parameters N times, and reverse mode sums the N gradients in the
    dtype of what the solve closes over. Kept float32 here, the sum is float32 (summed in
    bf16 it erred by 2.3% of the gradient at 64 Euler steps, against 0.7% for float32).
    """

    inner: VectorField
    dtype: jnp.dtype = eqx.field(static=True)

    def __call__(self, t, x):
        return cast_floating(self.inner, self.dtype)(t, x.astype(self.dtype)).astype(x.dtype)

    def at_step(self, step):
        return CastField(self.inner.at_step(step), self.dtype)
