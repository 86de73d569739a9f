"""Key/value caches: one slot per attention evaluation, fixed size so decoding compiles once."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class KVCache(eqx.Module):
    """Keys and values of ``slots`` attention evaluations over ``max_len`` positions.

    A slot is one evaluation of an attention layer: a layer of a discrete stack, or one
    (step, stage) vector-field evaluation of an ODE solve. Positions not yet written hold
    zeros and are masked out by the reader.
    """

    keys: Float[Array, "slots batch heads max_len head_dim"]
    values: Float[Array, "slots batch heads max_len head_dim"]

    @classmethod
    def empty(cls, slots: int, batch: int, heads: int, max_len: int, head_dim: int, dtype) -> "KVCache":
        shape = (slots, batch, heads, max_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def write(self, slot: Int[Array, ""] | int, start: Int[Array, ""] | int,
              k: Float[Array, "batch chunk heads head_dim"], v: Float[Array, "batch chunk heads head_dim"]
              ) -> "KVCache":
        """Store a chunk's keys and values at positions ``start, start + 1, ...`` of ``slot``."""
        def put(buffer, new):
            new = jnp.swapaxes(new, 1, 2)[None].astype(buffer.dtype)
            zero = jnp.zeros((), jnp.int32)
            return jax.lax.dynamic_update_slice(buffer, new, (jnp.asarray(slot, jnp.int32), zero, zero,
                                                              jnp.asarray(start, jnp.int32), zero))
        return KVCache(put(self.keys, k), put(self.values, v))

    def read(self, slot: Int[Array, ""] | int) -> tuple[Float[Array, "batch heads max_len head_dim"],
                                                         Float[Array, "batch heads max_len head_dim"]]:
        return (jax.lax.dynamic_index_in_dim(self.keys, slot, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.values, slot, keepdims=False))

    def attend(self, slot: Int[Array, ""] | int, start: Int[Array, ""] | int,
               q: Float[Array, "batch chunk heads head_dim"], k: Float[Array, "batch chunk heads head_dim"],
               v: Float[Array, "batch chunk heads head_dim"]) -> tuple[Float[Array, "batch chunk heads head_dim"],
                                                                      "KVCache"]:
        """Causal attention of a chunk at positions ``start ...`` to itself and the cached prefix,
        after writing its keys and values into ``slot``: query ``start + i`` attends to
        positions ``<= start + i`` (the buffer's unwritten tail is masked). The softmax runs in
        at least float32 (float64 stays float64).

        The output is materialised (``optimization_barrier``): left alone, XLA on a GPU fuses
        the one-query ``probs @ values`` reduction into its consumer (``DecodeBlock``'s
        concatenation ahead of the merged output product), where one thread sums each output
        over the whole cache; at batch 64 that made a decoded token 3.6x slower on an H200
        (docs/results/gpu.md, "Generation")."""
        cache = self.write(slot, start, k, v)
        keys, values = cache.read(slot)
        wide = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("bthd,bhld->bhtl", q, keys).astype(wide) / jnp.sqrt(jnp.asarray(q.shape[-1], wide))
        visible = jnp.arange(self.max_len)[None, :] <= start + jnp.arange(q.shape[1])[:, None]
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(values.dtype)
        return jax.lax.optimization_barrier(jnp.einsum("bhtl,bhld->bthd", probs, values)), cache
