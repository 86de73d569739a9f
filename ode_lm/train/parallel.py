"""Data parallelism with ``jax.sharding``: a 1-D mesh over every device, the batch split
along it, parameters and optimizer state replicated. XLA inserts the gradient all-reduce;
there is no hand-written communication.

Multi-host runs call ``jax.distributed.initialize()`` first (``train.distributed = true``;
the coordinator comes from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` or the cluster's auto-detection). Every process draws the same global batch
from ``(seed, step)`` and contributes its own rows.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ode_lm.config import Config
from ode_lm.errors import ConfigError

_initialized = False


def maybe_initialize_distributed(cfg: Config) -> None:
    global _initialized
    if cfg.train.distributed and not _initialized:
        jax.distributed.initialize()
        _initialized = True


class DataParallel:
    """Placement of batches (sharded over ``data``) and state (replicated)."""

    def __init__(self, cfg: Config):
        devices = jax.devices() if cfg.train.data_parallel else jax.local_devices()[:1]
        n = len(devices)
        if cfg.train.batch_size % n:
            raise ConfigError(f"[train] batch_size = {cfg.train.batch_size} must be divisible by the "
                              f"{n} devices it is sharded over; use a multiple of {n} or set "
                              "train.data_parallel = false")
        # Auto axes: XLA's sharding propagation partitions the step (no per-op annotations).
        self.mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.devices = n

    def batch(self, array: np.ndarray) -> jax.Array:
        """Place a global batch ``[batch, ...]``: each process passes the same global array."""
        if jax.process_count() == 1:
            return jax.device_put(array, self.batch_sharding)
        rows = array.shape[0] // jax.process_count()
        local = array[jax.process_index() * rows:(jax.process_index() + 1) * rows]
        return jax.make_array_from_process_local_data(self.batch_sharding, local, array.shape)

    def replicate(self, tree):
        arrays, static = eqx.partition(tree, eqx.is_array)
        return eqx.combine(jax.device_put(arrays, self.replicated), static)
