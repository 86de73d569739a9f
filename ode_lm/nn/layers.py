"""Dense layers that act on the last axis of batched inputs ``[..., features]``."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int, PRNGKeyArray


def _leading(x: Array, trailing: Array) -> tuple[int, ...]:
    """The axes of ``x`` that a ``trailing``-shaped operand is broadcast over."""
    return tuple(range(x.ndim - trailing.ndim))


def _wide(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _parameter_sum(wide: Array, parameter: Array) -> Array:
    """``wide`` (already at least float32) summed over the axes ``parameter`` is broadcast
    over, behind the barrier below, rounded once to ``parameter``'s dtype."""
    return jax.lax.optimization_barrier(jnp.sum(wide, axis=_leading(wide, parameter))).astype(parameter.dtype)


# scale, add_bias and gather_rows return parameter gradients summed over positions (or over
# a weight's rows) in at least float32, whatever a backend does with 16-bit sums: autodiff of
# `x * s`, `x + b` or `table[ids]` in bf16 sums in bf16 (16,384 positions: 1.5% relative
# error against float64, where rounding the float32 sum once gives 0.3%), while PyTorch's
# mixed-precision GPT-2 keeps its gains', biases' and embeddings' gradients in float32. The
# barrier keeps XLA from fusing a sum into the concatenation of all gates' gradients, where
# the GPU backend gave each column one thread (3.4 ms of a 12-step training step at dim 1024
# on an H200; under 0.2 ms now).


@jax.custom_vjp
def scale(x: Float[Array, "..."], s: Float[Array, "..."]) -> Float[Array, "..."]:
    """``x * s`` with ``s`` the shape of ``x``'s trailing axes, broadcast over the leading ones:
    a weight's columns times their gates, every position times a norm's gain.

    ``d s = sum_leading dy * x`` (at least float32 accumulation), ``d x = dy * s``.
    """
    return x * s


def _scale_fwd(x, s):
    return x * s, (x, s)


def _scale_bwd(residuals, dy):
    x, s = residuals
    wide = _wide(x.dtype)
    return (dy * s).astype(x.dtype), _parameter_sum(dy.astype(wide) * x.astype(wide), s)


scale.defvjp(_scale_fwd, _scale_bwd)


def add_bias(y: Float[Array, "..."], bias: Float[Array, "..."]) -> Float[Array, "..."]:
    """``y + bias`` (``bias`` the shape of ``y``'s trailing axes, broadcast over the leading
    ones) in their common dtype; ``d bias = sum_leading dy`` in at least float32."""
    dtype = jnp.result_type(y, bias)
    return _biased(y.astype(dtype), bias.astype(dtype))


@jax.custom_vjp
def _biased(y, bias):
    return y + bias


def _biased_fwd(y, bias):
    return y + bias, bias


def _biased_bwd(bias, dy):
    return dy, _parameter_sum(dy.astype(_wide(dy.dtype)), bias)


_biased.defvjp(_biased_fwd, _biased_bwd)


@jax.custom_vjp
def gather_rows(table: Float[Array, "rows features"], ids: Int[Array, "*positions"]
                ) -> Float[Array, "*positions features"]:
    """``table[ids]``; ``d table`` adds each position's ``dy`` into row ``ids``, in at least
    float32 (frequent tokens repeat hundreds of times in a batch: a 16-bit scatter-add
    would round every one of those additions)."""
    return table[ids]


def _gather_rows_fwd(table, ids):
    return table[ids], (jnp.zeros((0,) + table.shape, table.dtype), ids)  # an empty stand-in: shape, dtype


def _gather_rows_bwd(residuals, dy):
    like, ids = residuals
    rows = jnp.zeros(like.shape[1:], _wide(like.dtype)).at[ids].add(dy.astype(_wide(dy.dtype)))
    return rows.astype(like.dtype), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


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
            y = scale(y, gate)
        return y if bias is None else add_bias(y, bias)

    def effective(self, gate: Float[Array, " fan_out"] | None = None, norm: LayerNorm | None = None,
                  input_shift: Float[Array, " fan_in"] | None = None, gate_weights: bool = True
                  ) -> tuple[Float[Array, "fan_in fan_out"], Float[Array, " fan_out"] | None]:
        """``(W', b')`` with ``layer(x) = x W' + b'`` (see the class docstring); with a gate
        and ``gate_weights=False``, ``W'`` is ungated and ``layer(x) = (x W') * gate + b'``."""
        gated = gate is not None and gate_weights
        weight = scale(self.weight, gate) if gated else self.weight
        if norm is not None and norm.bias is not None:
            input_shift = norm.bias if input_shift is None else input_shift + norm.bias
        bias = self.bias
        if input_shift is not None:
            shift = input_shift @ weight
            if gate is not None and not gated:
                shift = shift * gate
            bias = shift if bias is None else bias + shift
        if norm is not None:
            weight = scale(weight.T, norm.weight).T  # row i times gamma_i
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
    x32 = x.astype(_wide(x.dtype))
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
        y = scale(x_hat, self.weight)
        return y if self.bias is None else add_bias(y, self.bias)

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        return self.affine(self.standardize(x))
