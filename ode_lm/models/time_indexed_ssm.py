"""The time-indexed SSM hybrid: the time-indexed block plus a selective state-space term.

    dx/dt = f_attn(t, x) + g_ssm(t, x)
    f_attn(t, x) = attn_t(LN(x)) + mlp_t(LN(x))      # the time-indexed block (gated weights)
    g_ssm(t, x)  = SelectiveSSM(x; A(t), B(t), C(t), D(t), Delta(t))

``g_ssm`` (``ode_lm.nn.ssm``) scans along the sequence with stable, depth-time-dependent
dynamics; it adds a recurrent path beside attention. Dropout masks apply to the block's
attention and MLP outputs, as in the time-indexed family; the SSM term is not dropped.
Cached decoding keeps, per evaluation, the attention keys/values and the SSM's recurrent
state after the last cached position, so a new token advances the recurrence by one step.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ode_lm.config import ModelConfig
from ode_lm.models.base import CachedField, ODELanguageModel, build_shared, ode_language_model
from ode_lm.models.time_indexed import TimeIndexedField, time_indexed_field
from ode_lm.nn import Block, BlockGates, Dropout, KVCache, SelectiveSSM


class SSMFieldCache(eqx.Module):
    """Per-evaluation attention keys/values and SSM states (after the last cached position)."""

    kv: KVCache
    ssm: Float[Array, "slots batch dim state"]


class TimeIndexedSSMField(CachedField):
    block_is_constant = True  # one block; only the gates depend on t

    time_indexed: TimeIndexedField
    ssm: SelectiveSSM
    dropout: Dropout | None = eqx.field(default=None, kw_only=True)  # set for a training solve

    def block_at(self, t) -> tuple[Block, BlockGates]:
        """The attention block and its gates at ``t`` (the SSM term is ``self.ssm(x, t)``)."""
        return self.time_indexed.block_at(t)

    def __call__(self, t, x):
        """``f_attn + g_ssm``; both norms standardise the same ``x`` (same eps), so it is
        standardised once and each applies its own gain and shift."""
        block, gates = self.time_indexed.block_at(t)
        if block.ln_attn.eps != self.ssm.norm.eps:
            return block(x, gates, self.dropout) + self.ssm(x, t)
        x_hat = block.ln_attn.standardize(x)
        return block.of_standardized(x_hat, gates, self.dropout) + self.ssm(x, t, x_hat)

    def init_cache(self, slots, batch, max_len):
        state = self.ssm.init_state(batch)
        return SSMFieldCache(self.time_indexed.init_cache(slots, batch, max_len),
                             jnp.zeros((slots, *state.shape), state.dtype))

    def extend(self, block, t, x, cache: SSMFieldCache, slot, start):
        a, kv = block(x, cache.kv, slot, start)
        state = jax.lax.dynamic_index_in_dim(cache.ssm, slot, keepdims=False)
        state, g = self.ssm.extend(state, x, t)
        states = jax.lax.dynamic_update_index_in_dim(cache.ssm, state, slot, 0)
        return a + g, SSMFieldCache(kv, states)


def build_time_indexed_ssm(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32
                           ) -> ODELanguageModel:
    k_shared, k_field, k_ssm = jax.random.split(key, 3)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    ssm = SelectiveSSM(cfg.dim, cfg.ssm_state_size, cfg.time_embed_dim, cfg.modulation_hidden,
                       key=k_ssm, std=cfg.init_std, dtype=dtype, scan=cfg.ssm_scan, form=cfg.ssm_form,
                       heads=cfg.ssm_heads, chunk=cfg.ssm_chunk, carry=cfg.ssm_carry, products=cfg.ssm_products,
                       max_frequency=cfg.time_max_frequency)
    field = TimeIndexedSSMField(time_indexed_field(cfg, k_field, dtype), ssm)
    return ode_language_model(cfg, embedding, field, readout)
