"""Where the training state lives on the mesh: replicated, or sharded FSDP style.

With ``train.fsdp = true`` every matrix of the parameters and of the optimizer state (Adam's
moments have the parameters' shapes) is split into N equal slices along one dimension over
the mesh's ``data`` axis of N devices; vectors (biases, gains), scalars (the step count) and
matrices with no dimension divisible by N stay replicated. The dimension is the largest one
divisible by N, so the slices are as few rows/columns of the largest extent as possible and
every device holds about ``1/N`` of the state.

Nothing else changes: the jitted step takes the state in these shardings and constrains its
updated state to them (``TrainStep(state_shardings=...)``: it gathers the weights whole once
per step and sums their gradient whole before each device updates its slices); XLA inserts
the collectives, so the maths is the replicated step's.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def fsdp_spec(shape: tuple[int, ...], devices: int, axis: str = "data") -> PartitionSpec:
    """The partition of one array of ``shape`` over ``devices``: a matrix (2 or more
    dimensions) along its largest dimension divisible by ``devices``; else replicated."""
    if devices == 1 or len(shape) < 2:
        return PartitionSpec()
    divisible = [d for d in range(len(shape)) if shape[d] % devices == 0]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda d: (shape[d], -d))  # the largest; the first of equal ones
    return PartitionSpec(*(axis if d == dim else None for d in range(len(shape))))


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """A ``NamedSharding`` for every array leaf of ``tree`` (``None`` for other leaves):
    ``fsdp_spec`` of its shape, or replicated without ``fsdp``."""
    n = mesh.shape["data"]

    def one(leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            return None
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), n) if fsdp else PartitionSpec())
    return jax.tree.map(one, tree)


def place(tree: Any, shardings: Any) -> Any:
    """``tree`` with its arrays laid out as ``shardings`` (from ``state_shardings``). Every
    process passes the same values (a model built from the seed, or a restored one) and keeps
    the slices its own devices hold."""
    arrays, static = eqx.partition(tree, eqx.is_array)

    def put(a, sharding):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        if isinstance(a, jax.Array) and not a.is_fully_addressable:  # already global: reshard
            return jax.jit(lambda x: x, out_shardings=sharding)(a)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return eqx.combine(jax.tree.map(put, arrays, shardings), static)


def device_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays held by the fullest of this process's devices (from the
    arrays' addressable shards: what is actually resident)."""
    per_device: dict = {}
    for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for shard in a.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def planned_device_bytes(tree: Any, devices: int, fsdp: bool) -> int:
    """Bytes per device that ``tree``'s arrays (concrete or ``jax.ShapeDtypeStruct``) take when
    laid out over ``devices`` devices, without allocating them: what ``ode-lm info`` prints."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        spec = fsdp_spec(tuple(leaf.shape), devices) if fsdp else PartitionSpec()
        total += nbytes // devices if any(p is not None for p in spec) else nbytes
    return total


def state_shapes(cfg, vocab: int) -> tuple[Any, Any]:
    """``(model, opt_state)`` of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    from ode_lm.train.trainer import init_state  # the trainer places state with this module
    return eqx.filter_eval_shape(lambda: init_state(cfg, vocab)[::2])


def mesh_devices(cfg) -> int:
    """Devices of the data axis a run of ``cfg`` would train on, as seen from this process."""
    if not cfg.train.data_parallel:
        return 1
    if cfg.train.distributed and cfg.train.num_processes:
        return cfg.train.num_processes * jax.local_device_count()
    return jax.device_count()


def describe_state_memory(cfg, vocab: int, devices: int | None = None) -> str:
    """The ``ode-lm info`` lines: parameters and optimizer state per device on the
    configured mesh, replicated and with ``train.fsdp``."""
    n = mesh_devices(cfg) if devices is None else devices
    model, opt_state = state_shapes(cfg, vocab)
    from ode_lm.train.resources import gib
    rows = [("parameters", model), ("optimizer state", opt_state), ("total", (model, opt_state))]
    chosen = "fsdp" if cfg.train.fsdp else "replicated"
    lines = [f"training state per device, mesh of {n} device(s) on the data axis "
             f"(train.fsdp = {str(cfg.train.fsdp).lower()}: {chosen}):",
             f"  {'':<17}{'replicated':>12}{'fsdp':>12}"]
    for name, tree in rows:
        lines.append(f"  {name:<17}{gib(planned_device_bytes(tree, n, False)):>12}"
                     f"{gib(planned_device_bytes(tree, n, True)):>12}")
    return "\n".join(lines)
