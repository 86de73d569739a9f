"""The time-indexed family: one block whose weights are modulated by depth-time.

    W_eff(t) = W_base * sigmoid(MLP(sinusoidal(t)))      # one gate per output feature
    f(t, x)  = attn_t(LN(x)) + mlp_t(LN(x))

Euler with N steps of 1/N is exactly an N-layer residual transformer whose layers share
``W_base`` and differ only through the gates at ``t = n/N``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ode_lm.config import ModelConfig
from ode_lm.models.base import CachedField, ODELanguageModel, build_block, build_shared, ode_language_model
from ode_lm.nn import Block, BlockGates, Dropout, Modulation, sinusoidal
from ode_lm.nn.time_embedding import MAX_FREQUENCY


class TimeIndexedField(CachedField):
    """``f(t, x) = block(x; gates(t))``.

    ``constant`` replaces ``sinusoidal(t)`` as the modulation's input when set: that is the
    ``constant`` family, the same model with ``t`` removed.
    """

    block_is_constant = True  # one block; only the gates depend on t

    block: Block
    modulation: Modulation
    time_embed_dim: int = eqx.field(static=True)
    mlp_ratio: int = eqx.field(static=True)
    dropout: Dropout | None = eqx.field(default=None, kw_only=True)  # set for a training solve
    constant: Float[Array, " time_embed_dim"] | None = None
    time_max_frequency: float = eqx.field(static=True, default=MAX_FREQUENCY)

    def gates(self, t: Float[Array, ""]) -> BlockGates:
        if self.constant is None:
            # t stays float32 (bf16 would blur high-frequency features); cast the features.
            features = sinusoidal(t, self.time_embed_dim, self.time_max_frequency).astype(self.modulation.hidden.weight.dtype)
        else:
            features = self.constant
        flat = self.modulation(features)
        return BlockGates.split(flat, self.block.ln_attn.weight.shape[0], self.mlp_ratio)

    def block_at(self, t: Float[Array, ""]) -> tuple[Block, BlockGates]:
        """The block and its gates at depth-time ``t``: ``f(t, x) = block(x, gates)``."""
        return self.block, self.gates(t)

    def __call__(self, t, x):
        return self.block(x, self.gates(t), self.dropout)

    def init_cache(self, slots, batch, max_len):
        return self.block.attn.empty_cache(slots, batch, max_len)


def time_indexed_field(cfg: ModelConfig, key: PRNGKeyArray, dtype,
                       constant: Float[Array, " time_embed_dim"] | None = None) -> TimeIndexedField:
    k_block, k_mod = jax.random.split(key)
    n_gates = sum(BlockGates.sizes(cfg.dim, cfg.mlp_ratio))
    return TimeIndexedField(
        build_block(cfg, k_block, dtype),
        Modulation(cfg.time_embed_dim, cfg.modulation_hidden, n_gates, key=k_mod,
                   std=cfg.init_std, dtype=dtype),
        cfg.time_embed_dim, cfg.mlp_ratio, constant=constant,
        time_max_frequency=cfg.time_max_frequency)


def build_time_indexed(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32
                       ) -> ODELanguageModel:
    k_shared, k_field = jax.random.split(key)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    return ode_language_model(cfg, embedding, time_indexed_field(cfg, k_field, dtype), readout)
