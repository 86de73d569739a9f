"""A hypernetwork that generates every weight of a transformer block from depth-time ``t``.

    h(t)      = SiLU(W_h sinusoidal(t) + b_h)                     in R^H,  H = model.hyper_hidden
    M(t)      = M_0 + U_M diag(h(t)) V_M^T = M_0 + sum_j h_j(t) u_{M,j} v_{M,j}^T
                for each matrix M in {qkv, proj, fc1, fc2} of shape (n_in, n_out)
    v(t)      = v_0 + G h(t)
                for the vectors: both layer norms' gains and shifts and the four biases

This is a one-hidden-layer hypernetwork ``t -> h(t) -> all block weights`` whose output
layer is linear with bias ``(M_0, v_0)`` (the base block). A dense output layer would hold
``H * n_in * n_out`` parameters per matrix (~50M for a 256-wide block at H = 64); here each
hidden unit's contribution to a matrix is rank one, which costs ``H * (n_in + n_out)``
parameters per matrix and leaves ``M(t) - M_0`` of rank at most ``H``. The generated
matrices are materialised once per evaluation (``2 n_in n_out H`` FLOPs, independent of the
number of tokens) and used by the ordinary block.

Initialisation: ``U, V ~ N(0, std^2 / sqrt(H))``, so the entries of ``U diag(h) V^T`` have
about the base weights' scale ``std`` times ``rms(h)``: the weights vary with ``t`` from
the start.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ode_lm.nn.block import Block
from ode_lm.nn.layers import Linear
from ode_lm.nn.time_embedding import MAX_FREQUENCY, sinusoidal


def _matrices(b: Block) -> tuple[Array, ...]:
    return b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc1.weight, b.mlp.fc2.weight


def _vectors(b: Block) -> tuple[Array, ...]:
    return (b.ln_attn.weight, b.ln_attn.bias, b.attn.qkv.bias, b.attn.proj.bias,
            b.ln_mlp.weight, b.ln_mlp.bias, b.mlp.fc1.bias, b.mlp.fc2.bias)


class RankOneBasis(eqx.Module):
    """``h -> U diag(h) V^T``: one rank-one matrix per hidden unit, mixed by ``h``."""

    u: Float[Array, "fan_in hidden"]
    v: Float[Array, "fan_out hidden"]

    def __call__(self, h: Float[Array, " hidden"]) -> Float[Array, "fan_in fan_out"]:
        return (self.u * h) @ self.v.T


class HyperNetwork(eqx.Module):
    hidden: Linear
    matrices: tuple[RankOneBasis, ...]  # qkv, proj, fc1, fc2
    vectors: Linear  # h -> the concatenated vector offsets (no bias: v_0 lives in the block)
    time_embed_dim: int = eqx.field(static=True)
    max_frequency: float = eqx.field(static=True)

    def __init__(self, block: Block, time_embed_dim: int, hidden: int, *, key: PRNGKeyArray,
                 std: float, dtype=jnp.float32, max_frequency: float = MAX_FREQUENCY):
        k_hidden, k_vec, *k_mats = jax.random.split(key, 2 + 2 * 4)
        self.hidden = Linear(time_embed_dim, hidden, key=k_hidden, std=1.0 / time_embed_dim**0.5, dtype=dtype)
        scale = (std / hidden**0.5) ** 0.5
        self.matrices = tuple(
            RankOneBasis(scale * jax.random.normal(ku, (m.shape[0], hidden), dtype),
                         scale * jax.random.normal(kv, (m.shape[1], hidden), dtype))
            for m, ku, kv in zip(_matrices(block), k_mats[::2], k_mats[1::2]))
        n_vec = sum(v.shape[0] for v in _vectors(block))
        self.vectors = Linear(hidden, n_vec, key=k_vec, std=std / hidden**0.5, bias=False, dtype=dtype)
        self.time_embed_dim, self.max_frequency = time_embed_dim, max_frequency

    def __call__(self, base: Block, t: Float[Array, ""]) -> Block:
        """The block with every weight generated at depth-time ``t``."""
        h = jax.nn.silu(self.hidden(sinusoidal(t, self.time_embed_dim, self.max_frequency).astype(self.hidden.weight.dtype)))
        mats = tuple(m0 + basis(h) for m0, basis in zip(_matrices(base), self.matrices))
        offsets = self.vectors(h)
        vecs, start = [], 0
        for v0 in _vectors(base):
            vecs.append(v0 + offsets[start:start + v0.shape[0]])
            start += v0.shape[0]
        return eqx.tree_at(lambda b: _matrices(b) + _vectors(b), base, mats + tuple(vecs))
