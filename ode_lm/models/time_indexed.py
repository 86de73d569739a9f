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
from ode_lm.models.base import CachedField, ODELanguageModel, build_shared
from ode_lm.nn import Block, BlockGates, DropoutMasks, KVCache, Modulation, sinusoidal


class TimeIndexedField(CachedField):
    block: Block
    modulation: Modulation
    time_embed_dim: int = eqx.field(static=True)
    mlp_ratio: int = eqx.field(static=True)
    dropout: DropoutMasks | None = None

    def gates(self, t: Float[Array, ""]) -> BlockGates:
        # t stays float32 (bf16 would blur high-frequency features); cast the features.
        features = sinusoidal(t, self.time_embed_dim).astype(self.modulation.hidden.weight.dtype)
        flat = self.modulation(features)
        return BlockGates.split(flat, self.block.ln_attn.weight.shape[0], self.mlp_ratio)

    def __call__(self, t, x):
        return self.block(x, self.gates(t), self.dropout)

    def init_cache(self, slots, batch, max_len):
        return self.block.attn.empty_cache(slots, batch, max_len)

    def extend(self, t, x, cache, slot, start):
        return self.block.extend(x, self.gates(t), cache, slot, start)


def build_time_indexed(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32
                       ) -> ODELanguageModel:
    k_shared, k_block, k_mod = jax.random.split(key, 3)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    n_gates = sum(BlockGates.sizes(cfg.dim, cfg.mlp_ratio))
    field = TimeIndexedField(
        Block(cfg.dim, cfg.heads, cfg.mlp_ratio, key=k_block, std=cfg.init_std, dtype=dtype,
              attention=cfg.attention),
        Modulation(cfg.time_embed_dim, cfg.modulation_hidden, n_gates, key=k_mod,
                   std=cfg.init_std, dtype=dtype),
        cfg.time_embed_dim, cfg.mlp_ratio)
    return ODELanguageModel(embedding, field, readout, cfg.dropout)
