"""The standard family: N distinct pre-norm transformer layers, the discrete baseline.

    x_0      = embed(tokens)
    x_{n+1}  = x_n + block_n(x_n)        # block_n(x) = attn_n(LN(x)) + mlp_n(LN(x)), n < N
    logits   = head(LN(x_N))

It is not an ODE: ``[ode]`` settings are ignored and the "solve" always reports
``nfe = steps = model.layers``. Dropout masks are drawn afresh for every layer. Cached
decoding keeps one key/value slot per layer.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import ModelConfig, ODEConfig
from ode_lm.models.base import Embedding, LanguageModel, Readout, build_shared
from ode_lm.nn import Block, BlockGates, DropoutMasks, KVCache
from ode_lm.ode import SolveStats


class StandardLanguageModel(LanguageModel):
    embedding: Embedding
    layers: tuple[Block, ...]
    readout: Readout
    dropout: float = eqx.field(static=True)

    def hidden_final(self, tokens: Int[Array, "batch seq"], ode: ODEConfig | None = None, *,
                     key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq dim"], SolveStats]:
        """``x_N`` and the stats of a solve with one evaluation per layer; ``ode`` is unused."""
        x = self.embedding(tokens)
        train = key is not None and self.dropout > 0
        keys = jax.random.split(key, len(self.layers) + 1) if train else [None] * (len(self.layers) + 1)
        if train:
            x = x * DropoutMasks.draw(keys[0], x.shape, self.dropout, x.dtype).attn
        # As in the ODE families, the residual stream stays at least float32 under bf16 compute.
        compute = x.dtype
        x = x.astype(jnp.promote_types(compute, jnp.float32))
        for block, k in zip(self.layers, keys[1:]):
            masks = DropoutMasks.draw(k, x.shape, self.dropout, compute) if train else None
            x = x + block(x.astype(compute), dropout=masks).astype(x.dtype)
        n = jnp.asarray(len(self.layers), jnp.int32)
        return x, SolveStats(nfe=n, steps=n, failed=jnp.asarray(False))

    def __call__(self, tokens, ode=None, *, key=None):
        x, stats = self.hidden_final(tokens, ode, key=key)
        return self.readout(x.astype(self.embedding.tokens.dtype), self.embedding), stats


    def init_cache(self, prompt, ode, max_len) -> KVCache:
        return self.layers[0].attn.empty_cache(len(self.layers), prompt.shape[0], max_len)

    def extend(self, tokens, start, cache: KVCache):
        x = self.embedding(tokens, start)
        compute = x.dtype
        x = x.astype(jnp.promote_types(compute, jnp.float32))
        for slot, block in enumerate(self.layers):
            dx, cache = block.extend(x.astype(compute), BlockGates(), cache, slot, start)
            x = x + dx.astype(x.dtype)
        return self.readout(x.astype(compute), self.embedding), cache


def build_standard(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> StandardLanguageModel:
    k_shared, k_layers = jax.random.split(key)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    layers = tuple(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, key=k, std=cfg.init_std, dtype=dtype,
                         attention=cfg.attention)
                   for k in jax.random.split(k_layers, cfg.layers))
    return StandardLanguageModel(embedding, layers, readout, cfg.dropout)
