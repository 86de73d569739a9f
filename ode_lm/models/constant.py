"""The constant family: the time-indexed model with ``t`` taken out (the ablation).

    W_eff    = W_base * sigmoid(MLP(c))        # c: a learned vector, in place of sinusoidal(t)
    f(t, x)  = attn(LN(x)) + mlp(LN(x))        # the same for every t

Everything else (block, modulation MLP, parameter count up to ``c``) is the time-indexed
model's, so comparing the two answers "does depth-time matter?". ``f`` is autonomous, so
Euler with N steps is an N-layer transformer with fully shared weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ode_lm.config import ModelConfig
from ode_lm.models.base import ODELanguageModel, build_shared, ode_language_model
from ode_lm.models.time_indexed import time_indexed_field


def build_constant(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> ODELanguageModel:
    k_shared, k_field, k_const = jax.random.split(key, 3)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    # Std 1/sqrt(2): the root mean square of sin/cos features, the scale the MLP expects.
    constant = (jax.random.normal(k_const, (cfg.time_embed_dim,)) / 2**0.5).astype(dtype)
    field = time_indexed_field(cfg, k_field, dtype, constant=constant)
    return ode_language_model(cfg, embedding, field, readout)
