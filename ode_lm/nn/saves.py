"""What a checkpointed solver step of the block keeps for reverse mode, by ``ode.checkpoint_saves``.

These are ``jax.checkpoint`` policies over the block's own values, so they live with the
block: the model passes the configured one to the solve (``ode.integrate(..., saves=...)``),
and ``ode/`` never needs to know the names of the block's primitives.

- ``states``: nothing inside the step; the backward pass recomputes the whole step from its
  input state (the solve keeps the states).
- ``matmuls``: the outputs of the matrix products (dots without batch dimensions: the
  block's projections), of the fused attention kernel (cuDNN's output and softmax
  statistics on a GPU) and of the block's standardisation with its per-token statistics
  (``layers.standardize``), from which the backward pass needs no state at all; the
  elementwise work is recomputed, and attention too where it runs as plain XLA ops.
"""

from __future__ import annotations

from typing import Callable

import jax

from ode_lm.config import CHECKPOINT_SAVES
from ode_lm.nn.layers import STANDARDIZED

# JAX's primitives of the fused (cuDNN) attention forward pass: their outputs are what the
# kernel's backward pass reads, so keeping them saves running the forward kernel again.
FUSED_ATTENTION_FORWARD = frozenset({"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"})

_standardized = jax.checkpoint_policies.save_only_these_names(STANDARDIZED)


def matmuls_saveable(prim, *args, **params) -> bool:
    """Checkpoint policy: keep the block's matrix products, fused attention's outputs and the
    standardised input with its statistics."""
    return (prim.name in FUSED_ATTENTION_FORWARD or _standardized(prim, *args, **params)
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


SAVES: dict[str, Callable[..., bool]] = {
    "states": jax.checkpoint_policies.nothing_saveable,
    "matmuls": matmuls_saveable,
}
assert tuple(SAVES) == CHECKPOINT_SAVES, "nn.SAVES and config.CHECKPOINT_SAVES must name the same policies"
