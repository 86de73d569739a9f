"""Data parallelism with ``jax.sharding``: a 1-D mesh over every device, the batch split
along it, parameters and optimizer state replicated, or with ``train.fsdp = true`` sharded
over the same axis (``sharding.py``). XLA inserts the gradient all-reduce (FSDP: the weight
all-gathers and gradient reduce-scatters); there is no hand-written communication.

Multi-process runs (``train.distributed = true``: several hosts, or several processes on
one) call ``jax.distributed.initialize()`` first; the mesh then spans every process's
devices. Each process runs the same program on the same global batch, drawn from
``(seed, step)``, and feeds only the rows its devices hold. Process 0 is the lead: it alone
writes the run directory (config, metrics, checkpoints, TensorBoard) and prints; the others
read checkpoints from it when resuming, so the run directory must be on a shared filesystem.
"""

from __future__ import annotations

import socket
import time

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ode_lm.config import Config
from ode_lm.errors import ConfigError
from ode_lm.train.sharding import state_shardings

_initialized = False


def maybe_initialize_distributed(cfg: Config) -> None:
    """``jax.distributed.initialize`` once per process when ``train.distributed`` is set."""
    global _initialized
    t = cfg.train
    if not t.distributed or _initialized:
        return
    # CPU processes exchange gradients over gloo (GPUs use NCCL regardless of this flag).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if t.coordinator_address and t.process_id > 0:
        wait_for_coordinator(t.coordinator_address, t.join_timeout)
    try:
        jax.distributed.initialize(coordinator_address=t.coordinator_address or None,
                                   num_processes=t.num_processes or None,
                                   process_id=None if t.process_id < 0 else t.process_id,
                                   initialization_timeout=t.join_timeout)
    except (ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise ConfigError(f"[train] distributed = true, but jax.distributed.initialize failed: "
                          f"{first_line}. Outside a detected cluster set train.coordinator_address "
                          "(host:port of process 0), train.num_processes and train.process_id") from None
    _initialized = True


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Block until ``host:port`` accepts connections. JAX's client aborts the whole process
    (no Python exception) when it cannot reach the coordinator, so look first."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"[train] coordinator_address = {address!r}: nothing accepted a "
                                  f"connection within train.join_timeout = {timeout} s ({e}); start "
                                  "process 0 there, or fix the address") from None
            time.sleep(0.5)


def is_lead() -> bool:
    """Whether this process writes the run directory and prints (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agreed_signal(requested: int | None) -> int | None:
    """The stop request of any process (a signal number), so that all stop at the same step;
    a process that stopped alone would leave the others waiting in the next all-reduce."""
    if jax.process_count() == 1:
        return requested
    every = multihost_utils.process_allgather(np.int32(requested or 0))
    return int(np.max(every)) or None


def all_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a check only some processes can make)."""
    if jax.process_count() == 1:
        return ok
    every = multihost_utils.process_allgather(np.int32(bool(ok)))
    return bool(np.min(every))


def local_copy(tree):
    """``tree``'s arrays on this process's first device (for work one process does alone,
    e.g. the end-of-training sample); replicated arrays hold the whole value locally, sharded
    ones are gathered first (every process must call this then)."""
    if jax.process_count() == 1:  # every device is this process's already
        return tree
    arrays, static = eqx.partition(tree, eqx.is_array)
    arrays = jax.tree.map(lambda a: a if a.is_fully_replicated else jax.jit(
        lambda x: x, out_shardings=NamedSharding(a.sharding.mesh, PartitionSpec()))(a), arrays)
    device = jax.local_devices()[0]
    local = jax.tree.map(lambda a: jax.device_put(np.asarray(a.addressable_data(0)), device), arrays)
    return eqx.combine(local, static)


class DataParallel:
    """Placement of batches (sharded over ``data``) and state (replicated, or sharded over
    ``data`` with ``train.fsdp``)."""

    def __init__(self, cfg: Config):
        if cfg.train.fsdp and not cfg.train.data_parallel:
            raise ConfigError("[train] fsdp = true shards the state over the devices of the data "
                              "axis; it needs train.data_parallel = true")
        devices = jax.devices() if cfg.train.data_parallel else jax.local_devices()[:1]
        if jax.process_count() > 1 and not cfg.train.data_parallel:
            raise ConfigError("[train] data_parallel = false cannot be combined with distributed = true "
                              f"over {jax.process_count()} processes: every process holds a share of the batch")
        n = len(devices)
        if cfg.train.batch_size % n:
            raise ConfigError(f"[train] batch_size = {cfg.train.batch_size} must be divisible by the "
                              f"{n} devices it is sharded over; use a multiple of {n} or set "
                              "train.data_parallel = false")
        # Auto axes: XLA's sharding propagation partitions the step (no per-op annotations).
        self.mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.devices, self.fsdp = n, cfg.train.fsdp

    def batch(self, array: np.ndarray) -> jax.Array:
        """Place a global batch ``[batch, ...]``: every process passes the same global array
        and contributes the rows its own devices hold."""
        return jax.make_array_from_callback(array.shape, self.batch_sharding, lambda index: array[index])

    def replicate(self, tree):
        arrays, static = eqx.partition(tree, eqx.is_array)
        return eqx.combine(jax.device_put(arrays, self.replicated), static)

    def state_shardings(self, state):
        """The shardings of the training state ``state`` (``sharding.state_shardings``)."""
        return state_shardings(state, self.mesh, self.fsdp)
