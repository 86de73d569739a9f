"""What every family shares: token + position embedding, the readout, the ODE forward pass.

An ODE family's forward pass::

    x(0)   = embed(tokens)                  # [batch, seq, dim]
    dx/dt  = f(t, x)                        # the family's VectorField, t in [0, 1]
    logits = head(LN(x(1)))
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import ModelConfig, ODEConfig
from ode_lm.nn import DropoutMasks, LayerNorm
from ode_lm.ode import CastField, SolveStats, VectorField, integrate


class Embedding(eqx.Module):
    tokens: Float[Array, "vocab dim"]
    positions: Float[Array, "max_positions dim"]

    def __init__(self, vocab: int, max_positions: int, dim: int, *, key: PRNGKeyArray,
                 std: float, dtype=jnp.float32):
        kt, kp = jax.random.split(key)
        self.tokens = std * jax.random.normal(kt, (vocab, dim), dtype)
        self.positions = std * jax.random.normal(kp, (max_positions, dim), dtype)

    def __call__(self, tokens: Int[Array, "batch seq"], offset: int | Int[Array, ""] = 0
                 ) -> Float[Array, "batch seq dim"]:
        pos = jax.lax.dynamic_slice_in_dim(self.positions, offset, tokens.shape[-1])
        return self.tokens[tokens] + pos


class Readout(eqx.Module):
    """Final layer norm and LM head; the head is the token embedding when tied."""

    norm: LayerNorm
    head: Float[Array, "dim vocab"] | None

    def __init__(self, dim: int, vocab: int, tied: bool, *, key: PRNGKeyArray, std: float,
                 dtype=jnp.float32):
        self.norm = LayerNorm(dim, dtype=dtype)
        self.head = None if tied else std * jax.random.normal(key, (dim, vocab), dtype)

    def __call__(self, x: Float[Array, "batch seq dim"], embedding: Embedding
                 ) -> Float[Array, "batch seq vocab"]:
        w = embedding.tokens.T if self.head is None else self.head
        return self.norm(x) @ w


class LanguageModel(eqx.Module):
    """Tokens ``[batch, seq]`` -> next-token logits ``[batch, seq, vocab]`` and solve stats."""

    @abc.abstractmethod
    def __call__(self, tokens: Int[Array, "batch seq"], ode: ODEConfig, *,
                 key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq vocab"], SolveStats]:
        """``key`` turns dropout on (training); ``None`` is the deterministic eval mode."""


class ODELanguageModel(LanguageModel):
    """An ODE family: the family supplies only ``field``, the vector field over depth-time."""

    embedding: Embedding
    field: VectorField
    readout: Readout
    dropout: float = eqx.field(static=True)

    def hidden_final(self, tokens: Int[Array, "batch seq"], ode: ODEConfig, *,
                     key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq dim"], SolveStats]:
        x0 = self.embedding(tokens)
        field = self.field
        if key is not None and self.dropout > 0:
            k_embed, k_field = jax.random.split(key)
            x0 = x0 * DropoutMasks.draw(k_embed, x0.shape, self.dropout, x0.dtype).attn
            masks = DropoutMasks.draw(k_field, x0.shape, self.dropout, x0.dtype)
            field = eqx.tree_at(lambda f: f.dropout, field, masks, is_leaf=lambda v: v is None)
        # The solver state and its error control stay at least float32 (mixed precision).
        state_dtype = jnp.promote_types(x0.dtype, jnp.float32)
        if state_dtype != x0.dtype:
            field, x0 = CastField(field, x0.dtype), x0.astype(state_dtype)
        return integrate(field, x0, ode)

    def __call__(self, tokens, ode, *, key=None):
        x1, stats = self.hidden_final(tokens, ode, key=key)
        return self.readout(x1.astype(self.embedding.tokens.dtype), self.embedding), stats


def build_shared(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype) -> tuple[Embedding, Readout]:
    ke, kr = jax.random.split(key)
    return (Embedding(vocab, cfg.max_positions, cfg.dim, key=ke, std=cfg.init_std, dtype=dtype),
            Readout(cfg.dim, vocab, cfg.tie_embeddings, key=kr, std=cfg.init_std, dtype=dtype))
