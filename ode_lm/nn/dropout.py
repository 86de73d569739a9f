"""Dropout as GPT-2 places it, drawn from one key so masks can be shared or renewed on purpose.

GPT-2 drops three things (``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop`` in its config):

    x_0      = drop_embd(tok + pos)
    a        = drop_resid(proj(drop_attn(softmax(q k^T / sqrt(d_h))) v))
    m        = drop_resid(fc2(gelu(fc1(.))))

Each kept unit is scaled by ``1 / (1 - rate)`` (inverted dropout), so evaluation without
dropout needs no rescaling. ``Dropout`` holds the rates and one PRNG key; every mask is a
deterministic function of that key and of what it masks (``EMBEDDING``, ``ATTENTION``, the
two residual branches), so drawing it twice gives the same mask. That is what makes an ODE's
vector field a deterministic function during a solve: the field keeps one ``Dropout`` and
every evaluation draws the same masks (``model.dropout_masks = "per_solve"``). ``at(n)``
derives an independent ``Dropout`` for layer or step ``n`` (the discrete model's layers, or
``"per_step"`` masks over a fixed grid).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

# What a mask drops, folded into the key: one independent stream each; the last one is the
# parent of the keys of layers and solver steps (``Dropout.at``).
EMBEDDING, ATTENTION, ATTENTION_OUT, MLP_OUT, SUBKEYS = range(5)


class DropoutRates(NamedTuple):
    """``model.embd_dropout``, ``model.attn_dropout``, ``model.resid_dropout``."""

    embd: float = 0.0
    attn: float = 0.0
    resid: float = 0.0

    @property
    def any(self) -> bool:
        return max(self) > 0.0


def keep_mask(key: PRNGKeyArray, rate: float, shape: tuple[int, ...], dtype) -> Float[Array, "..."]:
    """``bernoulli(1 - rate) / (1 - rate)``: inverted dropout's multiplier."""
    keep = 1.0 - rate
    return jax.random.bernoulli(key, keep, shape).astype(dtype) / jnp.asarray(keep, dtype)


class Dropout(eqx.Module):
    """Dropout masks of one forward pass (or one layer / solver step of it), from ``key``."""

    key: PRNGKeyArray
    rates: DropoutRates = eqx.field(static=True)
    # model.dropout_masks = "per_step": an ODE solve renews the masks at every fixed step.
    per_step: bool = eqx.field(static=True, default=False)

    def at(self, index: int | Int[Array, ""]) -> "Dropout":
        """An independent ``Dropout`` for layer or solver step ``index``."""
        return Dropout(jax.random.fold_in(jax.random.fold_in(self.key, SUBKEYS), index), self.rates, self.per_step)

    def at_step(self, step: int | Int[Array, ""]) -> "Dropout":
        """The masks of fixed solver step ``step``: renewed per step, or the solve's own."""
        return self.at(step) if self.per_step else self

    def _apply(self, stream: int, rate: float, x: Float[Array, "..."]) -> Float[Array, "..."]:
        if rate == 0.0:
            return x
        return x * keep_mask(jax.random.fold_in(self.key, stream), rate, x.shape, x.dtype)

    def embedding(self, x: Float[Array, "batch seq dim"]) -> Float[Array, "batch seq dim"]:
        return self._apply(EMBEDDING, self.rates.embd, x)

    def attention_probs(self, probs: Float[Array, "batch heads q k"]) -> Float[Array, "batch heads q k"]:
        return self._apply(ATTENTION, self.rates.attn, probs)

    def attention_out(self, a: Float[Array, "batch seq dim"]) -> Float[Array, "batch seq dim"]:
        return self._apply(ATTENTION_OUT, self.rates.resid, a)

    def mlp_out(self, m: Float[Array, "batch seq dim"]) -> Float[Array, "batch seq dim"]:
        return self._apply(MLP_OUT, self.rates.resid, m)

    @property
    def drops_attention(self) -> bool:
        return self.rates.attn > 0.0
