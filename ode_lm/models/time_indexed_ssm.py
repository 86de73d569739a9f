"""The time-indexed SSM hybrid: the time-indexed block plus a selective state-space term.

    dx/dt = f_attn(t, x) + g_ssm(t, x)
    f_attn(t, x) = attn_t(LN(x)) + mlp_t(LN(x))      # the time-indexed block (gated weights)
    g_ssm(t, x)  = SelectiveSSM(x; A(t), B(t), C(t), D(t), Delta(t))

``g_ssm`` (``ode_lm.nn.ssm``) scans along the sequence with stable, depth-time-dependent
dynamics; it adds a recurrent path beside attention. Dropout masks apply to the block's
attention and MLP outputs, as in the time-indexed family; the SSM term is not dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ode_lm.config import ModelConfig
from ode_lm.models.base import ODELanguageModel, build_shared
from ode_lm.models.time_indexed import TimeIndexedField, time_indexed_field
from ode_lm.nn import Block, BlockGates, DropoutMasks, SelectiveSSM
from ode_lm.ode import VectorField


class TimeIndexedSSMField(VectorField):
    time_indexed: TimeIndexedField
    ssm: SelectiveSSM
    dropout: DropoutMasks | None = None

    def block_at(self, t) -> tuple[Block, BlockGates]:
        """The attention block and its gates at ``t`` (the SSM term is ``self.ssm(x, t)``)."""
        return self.time_indexed.block_at(t)

    def __call__(self, t, x):
        block, gates = self.time_indexed.block_at(t)
        return block(x, gates, self.dropout) + self.ssm(x, t)


def build_time_indexed_ssm(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32
                           ) -> ODELanguageModel:
    k_shared, k_field, k_ssm = jax.random.split(key, 3)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    ssm = SelectiveSSM(cfg.dim, cfg.ssm_state_size, cfg.time_embed_dim, cfg.modulation_hidden,
                       key=k_ssm, std=cfg.init_std, dtype=dtype, scan=cfg.ssm_scan)
    field = TimeIndexedSSMField(time_indexed_field(cfg, k_field, dtype), ssm)
    return ODELanguageModel(embedding, field, readout, cfg.dropout)
