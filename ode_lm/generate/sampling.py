"""Sampling next tokens from logits, and a simple full-recompute generation loop."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import ODEConfig
from ode_lm.models import LanguageModel


def sample_logits(logits: Float[Array, " vocab"], key: PRNGKeyArray, temperature: float
                  ) -> Int[Array, ""]:
    """Draw from ``softmax(logits / temperature)``; ``temperature = 0`` is greedy."""
    if temperature == 0:
        return jnp.argmax(logits)
    return jax.random.categorical(key, logits.astype(jnp.float32) / temperature)


@eqx.filter_jit
def _next_logits(model: LanguageModel, buffer: Int[Array, "1 length"], position: Int[Array, ""],
                 ode: ODEConfig) -> Float[Array, " vocab"]:
    logits, _ = model(buffer, ode)
    return logits[0, position - 1]


def generate_recompute(model: LanguageModel, prompt: np.ndarray, max_new_tokens: int, ode: ODEConfig,
                       *, key: PRNGKeyArray, temperature: float = 1.0, max_positions: int) -> np.ndarray:
    """Generate by re-running the whole sequence for every new token (no cache).

    The sequence lives in a fixed buffer of ``len(prompt) + max_new_tokens`` tokens, so the
    forward pass compiles once; causality makes the unfilled tail irrelevant.
    """
    length = len(prompt) + max_new_tokens
    if length > max_positions:
        raise ValueError(f"prompt + new tokens = {length} exceeds max_positions = {max_positions}")
    buffer = np.zeros((1, length), np.int32)
    buffer[0, :len(prompt)] = prompt
    for position in range(len(prompt), length):
        key, sub = jax.random.split(key)
        logits = _next_logits(model, jnp.asarray(buffer), jnp.asarray(position), ode)
        buffer[0, position] = int(sample_logits(logits, sub, temperature))
    return buffer[0, len(prompt):]
