"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, greedy.

The steps, in order (each a no-op at its neutral value)::

    penalty   l_v <- l_v / r  if l_v > 0 else l_v * r,  for tokens v already present
    greedy    argmax_v l_v    (greedy = true, or temperature = 0)
    scale     l <- l / temperature
    top-k     keep the k largest logits
    top-p     keep the smallest set of most likely tokens whose probability is >= p
    sample    v ~ softmax(l)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ode_lm.config import GenerateConfig


class Sampling(NamedTuple):
    """The sampling knobs of a ``GenerateConfig``; hashable, so jitted code can take it static."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    greedy: bool

    @classmethod
    def of(cls, cfg: GenerateConfig) -> "Sampling":
        return cls(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty,
                   cfg.greedy or cfg.temperature == 0)


def penalize(logits: Float[Array, "batch vocab"], seen: Bool[Array, "batch vocab"], penalty: float
             ) -> Float[Array, "batch vocab"]:
    """The repetition penalty of Keskar et al. (2019) on the tokens ``seen`` so far."""
    if penalty == 1.0:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k_filter(logits: Float[Array, "batch vocab"], k: int) -> Float[Array, "batch vocab"]:
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Float[Array, "batch vocab"], p: float) -> Float[Array, "batch vocab"]:
    """Keep tokens while the probability of the strictly more likely ones is still < p."""
    if p >= 1.0:
        return logits
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(before < p, axis=-1, keepdims=True)  # >= 1: the top token always stays
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample(logits: Float[Array, "batch vocab"], seen: Bool[Array, "batch vocab"], key: PRNGKeyArray,
           s: Sampling) -> Int[Array, " batch"]:
    """One next token per row (see the module docstring for the order of the steps)."""
    logits = penalize(logits.astype(jnp.float32), seen, s.repetition_penalty)
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(top_k_filter(logits / s.temperature, s.top_k), s.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
