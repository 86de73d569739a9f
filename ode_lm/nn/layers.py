"""Dense layers that act on the last axis of batched inputs ``[..., features]``."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, PRNGKeyArray


@jax.custom_vjp
def gate_columns(weight: Float[Array, "fan_in fan_out"], gate: Float[Array, " fan_out"]
                 ) -> Float[Array, "fan_in fan_out"]:
    """``weight * gate``: column ``j`` (output feature ``j``) scaled by ``gate[j]``."""
    return weight * gate


def _gate_columns_fwd(weight, gate):
    return weight * gate, (weight, gate)


def _gate_columns_bwd(residuals, d_gated):
    weight, gate = residuals
    # d gate_j = sum_i d_gated_ij weight_ij, accumulated in at least float32 whatever a
    # backend does with 16-bit sums. The barrier keeps XLA from fusing this column sum into
    # the concatenation of all gates' gradients, where the GPU backend gives each column one
    # thread (3.4 ms of a 12-step training step at dim 1024 on an H200; under 0.2 ms now).
    wide = jnp.promote_types(weight.dtype, jnp.float32)
    d_gate = jax.lax.optimization_barrier(jnp.sum(d_gated.astype(wide) * weight.astype(wide), axis=0))
    return d_gated * gate, d_gate.astype(gate.dtype)


gate_columns.defvjp(_gate_columns_fwd, _gate_columns_bwd)


@jax.custom_vjp
def gelu(h: Float[Array, "..."]) -> Float[Array, "..."]:
    """The tanh approximation of GELU, ``jax.nn.gelu(h, approximate=True)``.

    Its derivative is written out, ``0.5 (1 + t) + 0.5 h (1 - t^2) z'(h)`` with
    ``t = tanh(z(h))`` and ``z(h) = sqrt(2 / pi) (h + 0.044715 h^3)``, so the backward pass
    reads ``h`` and the incoming gradient once and shares ``t`` with the ``gelu(h)`` it
    recomputes for the next layer's weight gradient; differentiating the forward formula
    made XLA store ``tanh(z)`` in a pass of its own and read it back.
    """
    return jax.nn.gelu(h, approximate=True)


def _gelu_fwd(h):
    return gelu(h), h


def _gelu_bwd(h, d_out):
    c = float(np.sqrt(2 / np.pi))  # a Python float: keeps h's dtype
    t = jnp.tanh(c * (h + 0.044715 * (h**3)))  # z as jax.nn.gelu writes it: one tanh for both
    slope = 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * 0.044715 * h**2)
    # The barrier keeps the bias gradient's column sum out of this elementwise pass: fused,
    # the GPU backend ran the pass at the pace of a column reduction.
    return (jax.lax.optimization_barrier((d_out * slope).astype(h.dtype)),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gates_weights(gate_apply: str, x: Float[Array, "... fan_in"]) -> bool:
    """Whether a gated layer of ``x`` scales its weight's columns (``weights``) or its product's
    outputs (``activations``); ``auto``: the weights when ``x`` has at least ``fan_in`` tokens,
    i.e. whenever the weight is the smaller of the two (the activations for few-token decoding)."""
    if gate_apply == "auto":
        return math.prod(x.shape[:-1]) >= x.shape[-1]
    return gate_apply == "weights"


class Linear(eqx.Module):
    """``y = x (W * gate) + b``, optionally after a layer norm's affine map folded in.

    ``gate`` scales output features: with ``gate = sigmoid(m(t))`` this is the time-modulated
    layer ``W_eff(t) = W * gate(t)`` (gate broadcast over the input axis). Gating the weight
    (``fan_in x fan_out`` products) rather than the output (``tokens x fan_out``) keeps a
    full pass over the activations out of every forward and backward evaluation whenever
    there are more tokens than input features. ``gate_apply`` (``model.gate_apply``, see
    ``gates_weights``) may instead compute the same ``(x W) * gate + b``: the cheaper form for
    a few tokens, as in decoding, where gating the weight reads and writes it once more.

    ``norm``: the input is a standardised ``x_hat`` and the layer computes
    ``(x_hat * gamma + beta) (W * gate) + b = x_hat W' + b'`` with
    ``W' = diag(gamma) W diag(gate)`` and ``b' = beta (W diag(gate)) + b``: the norm's affine
    map costs weight-sized work instead of two passes over the activations.

    ``input_shift``: the layer of ``x + s``, i.e. ``b' = s (W diag(gate)) + b`` (same reason).
    """

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"] | None

    def __init__(self, fan_in: int, fan_out: int, *, key: PRNGKeyArray, std: float,
                 bias: bool = True, dtype=jnp.float32):
        self.weight = std * jax.random.normal(key, (fan_in, fan_out), dtype)
        self.bias = jnp.zeros((fan_out,), dtype) if bias else None

    def __call__(self, x: Float[Array, "... fan_in"], gate: Float[Array, " fan_out"] | None = None,
                 norm: LayerNorm | None = None, input_shift: Float[Array, " fan_in"] | None = None,
                 gate_apply: str = "weights") -> Float[Array, "... fan_out"]:
        gate_weights = gates_weights(gate_apply, x)
        weight, bias = self.effective(gate, norm, input_shift, gate_weights)
        y = x @ weight
        if gate is not None and not gate_weights:
            y = y * gate
        return y if bias is None else y + bias

    def effective(self, gate: Float[Array, " fan_out"] | None = None, norm: LayerNorm | None = None,
                  input_shift: Float[Array, " fan_in"] | None = None, gate_weights: bool = True
                  ) -> tuple[Float[Array, "fan_in fan_out"], Float[Array, " fan_out"] | None]:
        """``(W', b')`` with ``layer(x) = x W' + b'`` (see the class docstring); with a gate
        and ``gate_weights=False``, ``W'`` is ungated and ``layer(x) = (x W') * gate + b'``."""
        gated = gate is not None and gate_weights
        weight = gate_columns(self.weight, gate) if gated else self.weight
        if norm is not None and norm.bias is not None:
            input_shift = norm.bias if input_shift is None else input_shift + norm.bias
        bias = self.bias
        if input_shift is not None:
            shift = input_shift @ weight
            if gate is not None and not gated:
                shift = shift * gate
            bias = shift if bias is None else bias + shift
        if norm is not None:
            weight = norm.weight[:, None] * weight
        return weight, bias


# checkpoint_name of a standardisation's output and its reciprocal deviation: with them kept,
# the backward pass needs neither the norm's input nor a pass recomputing its statistics.
STANDARDIZED = "standardized"


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardize(x: Float[Array, "... dim"], eps: float) -> Float[Array, "... dim"]:
    """``x_hat = (x - mean) / sqrt(var + eps)`` over the last axis, in ``x``'s dtype.

    Statistics in at least float32 (bf16 variances are too coarse). The gradient is written
    in terms of the output, ``dx = r (g - mean(g) - x_hat mean(g x_hat))`` with
    ``r = 1 / sqrt(var + eps)``, so a backward pass reads ``x_hat`` and ``r`` (named
    ``STANDARDIZED`` for checkpoint policies) instead of recomputing them from ``x``.
    """
    return _standardize_fwd(x, eps)[0]


def _standardize_fwd(x, eps):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centered = x32 - x32.mean(-1, keepdims=True)
    rstd = checkpoint_name(jax.lax.rsqrt((centered**2).mean(-1, keepdims=True) + eps), STANDARDIZED)
    # The output is the residual itself: the products that read x_hat and this gradient then
    # share one kept value.
    x_hat = checkpoint_name((centered * rstd).astype(x.dtype), STANDARDIZED)
    return x_hat, (x_hat, rstd)


def _standardize_bwd(eps, residuals, g):
    x_hat, rstd = residuals
    g32, x_hat32 = g.astype(rstd.dtype), x_hat.astype(rstd.dtype)
    dx = rstd * (g32 - g32.mean(-1, keepdims=True) - x_hat32 * (g32 * x_hat32).mean(-1, keepdims=True))
    return (dx.astype(x_hat.dtype),)


standardize.defvjp(_standardize_fwd, _standardize_bwd)


class LayerNorm(eqx.Module):
    """``x_hat * weight + bias`` with ``x_hat`` standardised over the last axis; ``bias``
    None leaves the shift out (``model.bias = false``)."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, dim: int, *, dtype=jnp.float32, eps: float = 1e-5, bias: bool = True):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype) if bias else None
        self.eps = eps

    def standardize(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        """``(x - mean) / sqrt(var + eps)`` over the last axis, without the affine map."""
        return standardize(x, self.eps)

    def affine(self, x_hat: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        """``x_hat * weight + bias``: the norm of an already standardised ``x_hat``."""
        y = x_hat * self.weight
        return y if self.bias is None else y + self.bias

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        return self.affine(self.standardize(x))
