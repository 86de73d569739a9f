"""Shared benchmark helpers: compile once, then time calls synchronised or back to back."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import jax


def compile_and_time(fn, *args, repeats: int = 10, warmup: int = 2) -> tuple[float, float]:
    """``(compile_seconds, median_seconds_per_call)`` of ``jax.jit(fn)(*args)``.

    Compilation is timed separately (lower + compile); calls are synchronised with
    ``jax.block_until_ready`` before the clock stops.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return compile_s, time_compiled(compiled, *args, repeats=repeats, warmup=warmup)


def time_compiled(compiled, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds per synchronised call of an already compiled executable."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


class StepTime(NamedTuple):
    """Seconds per training step, measured two ways."""

    back_to_back: float  # steps queued as a training loop queues them; one sync at the end
    synced: float  # each step waited for before the next is queued: adds the host's dispatch
    first_call: float | None = None  # the first step with its tracing and compilation (ours)


def time_steps(step, repeats: int, warmup: int, sync, windows: int = 3) -> StepTime:
    """``back_to_back``: the median over ``windows`` runs of ``repeats`` consecutive steps of
    their mean time; ``synced``: the median of ``repeats`` single synchronised steps."""
    for _ in range(warmup):
        sync(step())
    synced = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(step())
        synced.append(time.perf_counter() - start)
    back_to_back = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(repeats):
            out = step()
        sync(out)
        back_to_back.append((time.perf_counter() - start) / repeats)
    return StepTime(statistics.median(back_to_back), statistics.median(synced))


def renamed_flag(parser, old: str, new: str) -> None:
    """``old`` was renamed ``new`` (one flag name per meaning across the scripts: ``--repeats``
    timed repeats, ``--ode-steps`` ODE steps, ``--train-steps`` training steps); passing it
    stops with a message naming the new flag."""
    parser.add_argument(old, nargs="*", help=argparse.SUPPRESS,
                        action=_Renamed, new=new)


class _Renamed(argparse.Action):
    def __init__(self, *args, new: str, **kwargs):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new} (same values)")
