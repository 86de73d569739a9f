"""Sinusoidal features of depth-time ``t``.

Choosing the highest frequency (``model.time_max_frequency``) from the step count: a
fixed-step solve with ``N`` steps reads the field only at ``t_n = n / N`` (plus its stages'
``c_j / N`` offsets), i.e. it samples ``t`` at spacing ``1/N``. By Nyquist, a feature
``sin(w t)`` with ``w > pi N`` rad per unit depth-time is indistinguishable on that grid
from one of lower frequency (it aliases), and training can then fit the *samples*
rather than a function of ``t``: the weights become an ``N``-layer network that finer
solves do not converge to. For a solver to resolve the field, ``w h = w / N`` must be
well below 1, so ``w_max`` of a few rad (at most ``pi N``) keeps the dynamics resolvable;
the default, 100 rad, resolves about 100 depth positions and aliases at any N < 32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

MAX_FREQUENCY = 100.0  # the default of model.time_max_frequency


def sinusoidal(t: Float[Array, ""] | float, dim: int, max_frequency: float = MAX_FREQUENCY
               ) -> Float[Array, " dim"]:
    """``[sin(w_k t), cos(w_k t)]`` for ``k < dim/2``, ``w_k`` geometric from 1 to
    ``max_frequency`` (so ``|w_k| <= max(1, max_frequency)``)."""
    half = dim // 2
    freqs = max_frequency ** (jnp.arange(half) / max(half - 1, 1))
    angles = jnp.asarray(t) * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
