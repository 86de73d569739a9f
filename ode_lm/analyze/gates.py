"""How the vector field's weights depend on depth-time: one row per output feature.

- ``time_indexed`` (and ``time_indexed_ssm``'s attention block): the modulation's gates
  ``sigmoid(MLP(sinusoidal(t)))`` of the four matrices (qkv, proj, fc1, fc2);
- ``hypernetwork``: the norm of each output feature's column of the generated matrices
  ``||W(t)[:, j]||``;
- ``constant``: gates that do not depend on ``t`` (a flat heatmap, as it should be).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MATRICES = ("qkv", "proj", "fc1", "fc2")


def _weights(block):
    return block.attn.qkv.weight, block.attn.proj.weight, block.mlp.fc1.weight, block.mlp.fc2.weight


def gate_rows(field, ts: np.ndarray) -> dict | None:
    """``{"kind", "matrices": {name: [len(ts), features]}}`` for a field with ``block_at(t)``;
    None for a field without one."""
    block_at = getattr(field, "block_at", None)
    if block_at is None:
        return None

    def at(t):
        block, gates = block_at(t)
        if gates.qkv is not None:
            return tuple(gates)
        return tuple(jnp.linalg.norm(w, axis=0) for w in _weights(block))  # Linear: x @ W, W [in, out]

    values = jax.jit(jax.vmap(at))(jnp.asarray(ts, jnp.float32))
    kind = "gates" if block_at(jnp.float32(0.0))[1].qkv is not None else "generated weight column norms"
    return {"kind": kind, "matrices": {name: np.asarray(v, np.float64) for name, v in zip(MATRICES, values)}}
