"""Sinusoidal features of depth-time ``t``."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

MAX_FREQUENCY = 100.0  # t lives in [0, 1]: frequencies 1..100 rad resolve ~100 depth positions


def sinusoidal(t: Float[Array, ""] | float, dim: int) -> Float[Array, " dim"]:
    """``[sin(w_k t), cos(w_k t)]`` for ``k < dim/2``, with ``w_k`` geometric in ``[1, 100]``."""
    half = dim // 2
    freqs = MAX_FREQUENCY ** (jnp.arange(half) / max(half - 1, 1))
    angles = jnp.asarray(t) * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
