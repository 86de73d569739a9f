"""The time modulation ``gate(t) = sigmoid(MLP(features))`` of the time-indexed family."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ode_lm.nn.layers import Linear


class Modulation(eqx.Module):
    """``features -> Linear(hidden) -> SiLU -> Linear(n_gates) -> sigmoid``.

    One gate per output feature of every modulated weight matrix of the block; a split of
    the result gives each matrix its gate vector.
    """

    hidden: Linear
    out: Linear

    def __init__(self, in_dim: int, hidden: int, n_gates: int, *, key: PRNGKeyArray,
                 std: float, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        self.hidden = Linear(in_dim, hidden, key=k1, std=1.0 / in_dim**0.5, dtype=dtype)
        self.out = Linear(hidden, n_gates, key=k2, std=std, dtype=dtype)

    def __call__(self, features: Float[Array, " in_dim"]) -> Float[Array, " n_gates"]:
        return jax.nn.sigmoid(self.out(jax.nn.silu(self.hidden(features))))
