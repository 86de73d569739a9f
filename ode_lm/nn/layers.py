"""Dense layers that act on the last axis of batched inputs ``[..., features]``."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class Linear(eqx.Module):
    """``y = (x W) * gate + b``.

    ``gate`` scales output features. With ``gate = sigmoid(m(t))`` this is exactly the
    time-modulated layer ``W_eff(t) = W * gate(t)`` (gate broadcast over the input axis),
    computed without materialising ``W_eff``.
    """

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"] | None

    def __init__(self, fan_in: int, fan_out: int, *, key: PRNGKeyArray, std: float,
                 bias: bool = True, dtype=jnp.float32):
        self.weight = std * jax.random.normal(key, (fan_in, fan_out), dtype)
        self.bias = jnp.zeros((fan_out,), dtype) if bias else None

    def __call__(self, x: Float[Array, "... fan_in"],
                 gate: Float[Array, " fan_out"] | None = None) -> Float[Array, "... fan_out"]:
        y = x @ self.weight
        if gate is not None:
            y = y * gate
        return y if self.bias is None else y + self.bias


class LayerNorm(eqx.Module):
    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, dim: int, *, dtype=jnp.float32, eps: float = 1e-5):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        # Statistics in at least float32: bf16 variances are too coarse.
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = x32.mean(-1, keepdims=True)
        var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * self.weight + self.bias
