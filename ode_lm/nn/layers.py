"""Dense layers that act on the last axis of batched inputs ``[..., features]``."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class Linear(eqx.Module):
    """``y = x (W * gate) + b``.

    ``gate`` scales output features: with ``gate = sigmoid(m(t))`` this is the time-modulated
    layer ``W_eff(t) = W * gate(t)`` (gate broadcast over the input axis). Gating the weight
    (``fan_in x fan_out`` products) rather than the output (``tokens x fan_out``) keeps a
    full pass over the activations out of every forward and backward evaluation.
    """

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"] | None

    def __init__(self, fan_in: int, fan_out: int, *, key: PRNGKeyArray, std: float,
                 bias: bool = True, dtype=jnp.float32):
        self.weight = std * jax.random.normal(key, (fan_in, fan_out), dtype)
        self.bias = jnp.zeros((fan_out,), dtype) if bias else None

    def __call__(self, x: Float[Array, "... fan_in"],
                 gate: Float[Array, " fan_out"] | None = None) -> Float[Array, "... fan_out"]:
        y = x @ self.effective_weight(gate)
        return y if self.bias is None else y + self.bias

    def effective_weight(self, gate: Float[Array, " fan_out"] | None = None) -> Float[Array, "fan_in fan_out"]:
        return self.weight if gate is None else self.weight * gate

    def split_call(self, x: Float[Array, "... fan_in"], gate: Float[Array, " fan_out"] | None,
                   parts: int) -> tuple[Float[Array, "... part"], ...]:
        """``jnp.split(self(x, gate), parts, -1)``, computed as ``parts`` products.

        Splitting the weight instead of the output avoids slicing the activations in the
        forward pass and concatenating their gradients in the backward pass.
        """
        weights = jnp.split(self.effective_weight(gate), parts, axis=1)
        if self.bias is None:
            return tuple(x @ w for w in weights)
        return tuple(x @ w + b for w, b in zip(weights, jnp.split(self.bias, parts)))


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
