"""The hypernetwork family: one block whose weights are all generated from depth-time.

    W(t)    = HyperNetwork(t)                   # every matrix, bias and layer-norm weight
    f(t, x) = attn_{W(t)}(LN_{W(t)}(x)) + mlp_{W(t)}(LN_{W(t)}(x))

``model.hyper_form = "dense"`` (the default) is Tong et al.'s continuous transformer as
released: every matrix a dense linear map of its own time embedding, with time-dependent
biases and layer norms (tens of millions of parameters at the reference size);
``"rank_one"`` generates rank-one updates of a base block, keeping the parameter count near
the time-indexed model's. The maths of both: ``ode_lm.nn.hypernetwork``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ode_lm.config import ModelConfig
from ode_lm.models.base import CachedField, ODELanguageModel, build_block, build_shared, ode_language_model
from ode_lm.nn import AbstractHyperNetwork, Block, BlockGates, DenseHyperNetwork, Dropout, RankOneHyperNetwork


class HypernetworkField(CachedField):
    hypernetwork: AbstractHyperNetwork
    dropout: Dropout | None = eqx.field(default=None, kw_only=True)  # set for a training solve

    def block_at(self, t) -> tuple[Block, BlockGates]:
        """The generated block at depth-time ``t`` (ungated): ``f(t, x) = block(x)``."""
        return self.hypernetwork(t), BlockGates()

    def __call__(self, t, x):
        block, gates = self.block_at(t)
        return block(x, gates, self.dropout)

    def init_cache(self, slots, batch, max_len):
        return self.hypernetwork.structure().attn.empty_cache(slots, batch, max_len)


def build_hypernetwork(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> ODELanguageModel:
    k_shared, k_block, k_hyper = jax.random.split(key, 3)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    block = build_block(cfg, k_block, dtype)
    if cfg.hyper_form == "dense":
        hyper = DenseHyperNetwork(block, cfg.time_embed_dim, cfg.hyper_hidden, key=k_hyper, dtype=dtype,
                                  max_frequency=cfg.time_max_frequency)
    else:
        hyper = RankOneHyperNetwork(block, cfg.time_embed_dim, cfg.hyper_hidden, key=k_hyper,
                                    std=cfg.init_std, dtype=dtype, max_frequency=cfg.time_max_frequency)
    return ode_language_model(cfg, embedding, HypernetworkField(hyper), readout)
