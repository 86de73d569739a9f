"""Memory and disk checked before any work: a size that cannot fit is refused in one line.

The estimates (``ode_lm.models.accounting``: ``train_memory``, ``generation_memory``) are lower
bounds of what the compiled programs allocate, computed from the config and the model's
shapes alone (``eqx.filter_eval_shape``: nothing is allocated or compiled). They are compared
with what the device has free (``memory_stats()`` of an accelerator) or, on CPU, with the
host's available memory (``/proc/meminfo``'s MemAvailable, capped by a cgroup limit). The
disk holding the run directory must have room for one checkpoint. ``--skip-resource-check``
(``check_resources = False``) turns this off for users who know better.
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax

from ode_lm.config import Config
from ode_lm.errors import UserError
from ode_lm.models import build_model
from ode_lm.models.accounting import MemoryEstimate, generation_memory, train_memory

SKIP = "pass --skip-resource-check if you know it fits"


class ResourceError(UserError):
    """A run or a generation that cannot fit in the memory or on the disk it has."""


def gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def parameter_count(cfg: Config, vocab: int) -> int:
    """Parameters of ``cfg``'s model from its shapes alone (no arrays are made)."""
    shapes = eqx.filter_eval_shape(build_model, cfg.model, vocab, jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(shapes) if hasattr(x, "size"))


def host_available() -> int | None:
    """Bytes of host memory available to this process: MemAvailable, capped by cgroup limits."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:
            found.append(int(cap) - used)
    return min(found) if found else None


def device_available() -> tuple[int | None, str, bool]:
    """``(free bytes per device, what, shared)``: an accelerator's own memory, or the host's
    (``shared``: every CPU device draws on the same host memory)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return (int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)),
                f"{device.device_kind} ({device.platform})", False)
    return host_available(), "this host (CPU)", True


def _refuse_if_short(asked: str, estimate: MemoryEstimate, devices: int, lower: str) -> None:
    available, where, shared = device_available()
    if available is None:
        return
    need = estimate.total * (devices if shared else 1)
    if need <= available:
        return
    parts = ", ".join(f"{name} {gib(n)}" for name, n in sorted(estimate.parts.items(), key=lambda kv: -kv[1])
                      if n)
    per = f" ({devices} devices x {gib(estimate.total)})" if shared and devices > 1 else \
        (" per device" if devices > 1 else "")
    raise ResourceError(f"{asked} needs at least {gib(need)} of memory{per} ({parts}), but {where} has "
                        f"{gib(available)} free; {lower}, or {SKIP}")


def _train_knobs(cfg: Config, estimate: MemoryEstimate, parameters: int) -> str:
    m = cfg.model
    if estimate.largest() in ("activations", "logits"):
        knobs = ["train.batch_size", "data.seq_len"]
        if estimate.largest() == "logits":
            pass
        elif m.family == "standard":
            knobs.append("model.layers")
        elif cfg.ode.adjoint == "direct":
            knobs.append('ode.adjoint = "checkpoint"')
        elif not cfg.ode.adaptive and cfg.ode.adjoint == "checkpoint":
            knobs.append("ode.steps")
        return "lower " + " or ".join(knobs)
    if m.max_positions * m.dim > parameters / 2:
        return "lower model.max_positions (its position table holds most parameters) or model.dim"
    return "lower model.dim" + (" or model.layers" if m.family == "standard" else "") + " or model.mlp_ratio"


def check_training_resources(cfg: Config, vocab: int, run_dir: Path) -> None:
    """Refuse a training run that cannot fit in memory, or whose first checkpoint cannot fit
    on the disk of ``run_dir``."""
    parameters = parameter_count(cfg, vocab)
    devices = len(jax.devices()) if cfg.train.data_parallel else 1
    estimate = train_memory(cfg, vocab, parameters, max(1, devices // jax.process_count()),
                            state_shards=devices if cfg.train.fsdp else 1)
    m = cfg.model
    asked = (f"training (model.dim = {m.dim}, model.max_positions = {m.max_positions}, {parameters:,} "
             f"parameters; train.batch_size = {cfg.train.batch_size}, data.seq_len = {cfg.data.seq_len})")
    local = len(jax.local_devices()) if cfg.train.data_parallel else 1
    _refuse_if_short(asked, estimate, local, _train_knobs(cfg, estimate, parameters))
    checkpoint = (estimate.parts["parameters"] + estimate.parts["optimizer"]) * (devices if cfg.train.fsdp else 1)
    _check_disk(run_dir, checkpoint + 2**20)


def _check_disk(run_dir: Path, need: int) -> None:
    where = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    try:
        st = os.statvfs(where)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise ResourceError(f"the disk holding {run_dir} has {gib(free)} free, but a checkpoint of this "
                            f"model needs {gib(need)}; free some space or set train.runs_dir to another "
                            f"disk, or {SKIP}")


def check_generation_resources(cfg: Config, vocab: int, parameters: int, samples: int, length: int,
                               prompt: int, cache: bool) -> None:
    """Refuse a generation whose caches and batch cannot fit in memory."""
    estimate = generation_memory(cfg, vocab, parameters, samples, length, prompt, cache)
    asked = (f"generating {samples} sample(s) of up to {length} positions (--num-samples {samples}; "
             f"model.max_positions = {cfg.model.max_positions})")
    _refuse_if_short(asked, estimate, 1, "lower --num-samples or --max-new-tokens (or --window's "
                     "context, bounded by model.max_positions)")
