"""The hypernetwork family: one block whose weights are all generated from depth-time.

    W(t)    = HyperNetwork(sinusoidal(t))       # every matrix, bias and layer-norm weight
    f(t, x) = attn_{W(t)}(LN_{W(t)}(x)) + mlp_{W(t)}(LN_{W(t)}(x))

the continuous-depth transformer in the style of Tong et al. The generator (a base block
plus a rank-one-per-hidden-unit output layer, see ``ode_lm.nn.hypernetwork`` for the maths)
keeps the parameter count near the time-indexed model's and the cost per evaluation near
one block's.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ode_lm.config import ModelConfig
from ode_lm.models.base import CachedField, ODELanguageModel, build_shared
from ode_lm.nn import Block, BlockGates, DropoutMasks, HyperNetwork


class HypernetworkField(CachedField):
    block: Block  # the base weights (M_0, v_0)
    hypernetwork: HyperNetwork
    dropout: DropoutMasks | None = None

    def block_at(self, t) -> tuple[Block, BlockGates]:
        """The generated block at depth-time ``t`` (ungated): ``f(t, x) = block(x)``."""
        return self.hypernetwork(self.block, t), BlockGates()

    def __call__(self, t, x):
        block, gates = self.block_at(t)
        return block(x, gates, self.dropout)

    def init_cache(self, slots, batch, max_len):
        return self.block.attn.empty_cache(slots, batch, max_len)

    def extend(self, t, x, cache, slot, start):
        block, gates = self.block_at(t)
        return block.extend(x, gates, cache, slot, start)


def build_hypernetwork(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> ODELanguageModel:
    k_shared, k_block, k_hyper = jax.random.split(key, 3)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    block = Block(cfg.dim, cfg.heads, cfg.mlp_ratio, key=k_block, std=cfg.init_std, dtype=dtype,
                  attention=cfg.attention)
    hyper = HyperNetwork(block, cfg.time_embed_dim, cfg.hyper_hidden, key=k_hyper, std=cfg.init_std, dtype=dtype,
                         max_frequency=cfg.time_max_frequency)
    return ODELanguageModel(embedding, HypernetworkField(block, hyper), readout, cfg.dropout)
