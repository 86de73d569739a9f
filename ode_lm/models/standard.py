"""The standard family: N distinct pre-norm transformer layers, the discrete baseline.

    x_0      = embed(tokens)
    x_{n+1}  = x_n + block_n(x_n)        # block_n(x) = attn_n(LN(x)) + mlp_n(LN(x)), n < N
    logits   = head(LN(x_N))

It is not an ODE: ``[ode]`` settings are ignored and the "solve" always reports
``nfe = steps = model.layers``. The layers' parameters are stacked along a leading axis
and applied with ``jax.lax.scan``, so compile time does not grow with depth (the ODE
families' solve is a loop too, which keeps the step-time comparison fair).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import ModelConfig, ODEConfig
from ode_lm.models.base import Embedding, LanguageModel, Readout, build_shared
from ode_lm.nn import Block, DropoutMasks
from ode_lm.ode import SolveStats


class StandardLanguageModel(LanguageModel):
    embedding: Embedding
    layers: Block  # every leaf has a leading axis of size ``model.layers``
    readout: Readout
    dropout: float = eqx.field(static=True)

    @property
    def num_layers(self) -> int:
        return self.layers.ln_attn.weight.shape[0]

    def layer(self, n: int | Int[Array, ""]) -> Block:
        """Layer ``n`` as an ordinary :class:`Block`."""
        return jax.tree.map(lambda leaf: leaf[n], self.layers)

    def hidden_final(self, tokens: Int[Array, "batch seq"], ode: ODEConfig | None = None, *,
                     key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq dim"], SolveStats]:
        x0 = self.embedding(tokens)
        train = key is not None and self.dropout > 0
        keys = jax.random.split(key, self.num_layers + 1) if train else None
        if train:
            x0 = x0 * DropoutMasks.draw(keys[0], x0.shape, self.dropout, x0.dtype).attn
        # As in the ODE families, the residual stream stays at least float32 under bf16 compute.
        compute = x0.dtype
        params, static = eqx.partition(self.layers, eqx.is_array)

        def apply_layer(x, inputs):
            layer_params, layer_key = inputs
            block = eqx.combine(layer_params, static)
            masks = DropoutMasks.draw(layer_key, x.shape, self.dropout, compute) if train else None
            return x + block(x.astype(compute), dropout=masks).astype(x.dtype), None

        x, _ = jax.lax.scan(apply_layer, x0.astype(jnp.promote_types(compute, jnp.float32)),
                            (params, keys[1:] if train else None))
        n = jnp.asarray(self.num_layers, jnp.int32)
        return x, SolveStats(nfe=n, steps=n, failed=jnp.asarray(False))

    def __call__(self, tokens, ode=None, *, key=None):
        x, stats = self.hidden_final(tokens, ode, key=key)
        return self.readout(x.astype(self.embedding.tokens.dtype), self.embedding), stats


def build_standard(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> StandardLanguageModel:
    k_shared, k_layers = jax.random.split(key)
    embedding, readout = build_shared(cfg, vocab, k_shared, dtype)

    @eqx.filter_vmap
    def make_layer(k):
        return Block(cfg.dim, cfg.heads, cfg.mlp_ratio, key=k, std=cfg.init_std, dtype=dtype,
                     attention=cfg.attention)

    return StandardLanguageModel(embedding, make_layer(jax.random.split(k_layers, cfg.layers)),
                                 readout, cfg.dropout)
