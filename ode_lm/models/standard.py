"""The standard family: GPT-2, N distinct pre-norm transformer layers, the discrete baseline.

    x_0      = drop_embd(embed(tokens))
    x'_n     = x_n  + drop_resid(attn_n(LN1_n(x_n)))            # model.block = "sequential"
    x_{n+1}  = x'_n + drop_resid(mlp_n(LN2_n(x'_n)))            #   (GPT-2; the default)
    logits   = head(LN_f(x_N))

with dropout on the attention probabilities inside ``attn_n`` as well, independent masks in
every layer, and the residual projections (attention's output projection, the MLP's second
layer) initialised at ``init_std / sqrt(2 N)`` as in GPT-2. ``model.block = "parallel"``
gives ``x_{n+1} = x_n + drop(attn_n(LN1_n(x_n))) + drop(mlp_n(LN2_n(x_n)))`` instead (the
ODE families' vector field as N distinct layers).

It is not an ODE: ``[ode]`` settings are ignored and the "solve" always reports
``nfe = steps = model.layers``. Cached decoding keeps one key/value slot per layer.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import ModelConfig, ODEConfig
from ode_lm.models.base import Embedding, LanguageModel, Readout, build_block, build_shared, dropout_rates
from ode_lm.nn import Block, DecodeBlock, Dropout, DropoutRates, KVCache
from ode_lm.ode import SolveStats


class LayersCache(eqx.Module):
    """Decoding state: one key/value slot per layer, and each layer folded (``DecodeBlock``)."""

    kv: KVCache
    blocks: tuple[DecodeBlock, ...]


@eqx.filter_jit
def _empty_cache(layers: tuple[Block, ...], batch: int, max_len: int, dtype) -> LayersCache:
    """Empty keys and values and every layer folded, in one compiled call (issued op by op,
    the construction cost a GPU milliseconds of dispatch per generation)."""
    kv = layers[0].attn.empty_cache(len(layers), batch, max_len)
    return LayersCache(kv, tuple(DecodeBlock.of(block, dtype=dtype) for block in layers))


class StandardLanguageModel(LanguageModel):
    embedding: Embedding
    layers: tuple[Block, ...]
    readout: Readout
    dropout: DropoutRates = eqx.field(static=True)
    sequential: bool = eqx.field(static=True, default=True)  # model.block resolved

    def layer(self, block: Block, x: Float[Array, "batch seq dim"], compute, dropout: Dropout | None
              ) -> Float[Array, "batch seq dim"]:
        """One layer on the (at least float32) residual stream ``x``, computing in ``compute``."""
        if self.sequential:
            x = x + block.attention_branch(x.astype(compute), dropout=dropout).astype(x.dtype)
            return x + block.mlp_branch(x.astype(compute), dropout=dropout).astype(x.dtype)
        return x + block(x.astype(compute), dropout=dropout).astype(x.dtype)

    def hidden_final(self, tokens: Int[Array, "batch seq"], ode: ODEConfig | None = None, *,
                     key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq dim"], SolveStats]:
        """``x_N`` and the stats of a solve with one evaluation per layer; ``ode`` is unused."""
        x = self.embedding(tokens)
        drop = Dropout(key, self.dropout) if key is not None and self.dropout.any else None
        if drop is not None:
            x = drop.embedding(x)
        # As in the ODE families, the residual stream stays at least float32 under bf16 compute.
        compute = x.dtype
        x = x.astype(jnp.promote_types(compute, jnp.float32))
        for n, block in enumerate(self.layers):
            x = self.layer(block, x, compute, None if drop is None else drop.at(n))
        n = jnp.asarray(len(self.layers), jnp.int32)
        return x, SolveStats(nfe=n, steps=n, failed=jnp.asarray(False))

    def __call__(self, tokens, ode=None, *, key=None):
        x, stats = self.hidden_final(tokens, ode, key=key)
        return self.readout(x.astype(self.embedding.tokens.dtype), self.embedding), stats

    def init_cache(self, prompt, ode, max_len, decode_weights="auto") -> LayersCache:
        return _empty_cache(self.layers, prompt.shape[0], max_len, self.embedding.tokens.dtype)

    def extend(self, tokens, start, cache: LayersCache):
        x = self.embedding.lookup(tokens, start)
        compute = x.dtype
        x = x.astype(jnp.promote_types(compute, jnp.float32))
        kv = cache.kv
        for slot, block in enumerate(cache.blocks):
            if self.sequential:
                a, kv = block.attention_branch(x.astype(compute), kv, slot, start)
                x = x + a.astype(x.dtype)
                x = x + block.mlp_branch(x.astype(compute)).astype(x.dtype)
            else:
                dx, kv = block(x.astype(compute), kv, slot, start)
                x = x + dx.astype(x.dtype)
        return self.readout(x.astype(compute), self.embedding), LayersCache(kv, cache.blocks)


def residual_init_std(cfg: ModelConfig) -> float:
    """GPT-2's init of the residual projections: ``init_std / sqrt(2 * layers)`` (two residual
    branches per layer, so the stream's variance at init does not grow with depth)."""
    return cfg.init_std / math.sqrt(2 * cfg.layers)


def build_standard(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> StandardLanguageModel:
    k_shared, k_layers = jax.random.split(key)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)
    layers = tuple(build_block(cfg, k, dtype, resid_std=residual_init_std(cfg))
                   for k in jax.random.split(k_layers, cfg.layers))
    return StandardLanguageModel(embedding, layers, readout, dropout_rates(cfg), sequential=cfg.sequential)
