"""Where a training step's GPU time goes: kernel time per step, grouped into matmuls,
attention and everything else (elementwise, reductions, copies).

Runs ode-lm's real train step (``--family``, time-indexed by default; bf16, Euler) at a ``bench_gpu.py`` size
under ``jax.profiler``, reads the Perfetto trace and sums GPU kernel durations.

The step runs as it trains: XLA's CUDA graphs run their kernels by dependency, so kernels
overlap (the busy time can exceed the wall time) and a kernel's duration is not what it
costs the step. ``--serial`` compiles the step without CUDA graphs: kernels then run one at a
time, and each trace event names the HLO instruction it ran, which the script maps to the
step's phase (``forward``, ``backward`` and its ``recompute``, ``update``) by the
instruction's JAX op name.

``--peer`` profiles a PyTorch peer's step (``_torch_peers.py``, as ``bench_gpu.py`` times it)
under ``torch.profiler`` instead, with the same kernel groups: the two steps side by side,
kernel group by kernel group.

    python scripts/profile_gpu_step.py --size large --out docs/results/gpu_profile.json
    python scripts/profile_gpu_step.py --size gpt2_small --family standard --serial
    python scripts/profile_gpu_step.py --size gpt2_small --peer gpt2_compiled --out /tmp/peer.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax

from _timing import machine, print_table, renamed_flag, write_json
from _torch_peers import PEERS, peer_step
from bench_gpu import SIZES, machine_versions, make_train_step
from ode_lm.config import FAMILIES
from ode_lm.train.steps import TRAIN_STEP_COMPILER_OPTIONS

# --serial: the train step's own XLA options, without CUDA graphs (command buffers).
SERIAL_OPTIONS = {**TRAIN_STEP_COMPILER_OPTIONS, "xla_gpu_enable_command_buffer": ""}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]*)"', re.M)

GROUPS = {"matmul": ("gemm", "nvjet", "cutlass", "cublas", "matmul"),
          "attention": ("sdpa", "flash", "cudnn", "attention")}


def group_of(kernel: str) -> str:
    name = kernel.lower()
    for group, needles in GROUPS.items():
        if any(n in name for n in needles):
            return group
    return "other"


def phase_of(op_name: str) -> str:
    """The step's phase of an HLO instruction, from the JAX op name XLA keeps with it
    (``jit(_step)/transpose(jvp())/...`` is the backward pass)."""
    if "transpose(" in op_name:
        return "recompute" if "rematted_computation" in op_name else "backward"
    return "forward" if "jvp(" in op_name else "update"


def op_names(hlo: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op name in its metadata, over the compiled module."""
    return {name: op for name, op in _INSTRUCTION.findall(hlo)}


def kernel_times(trace_dir: Path) -> tuple[collections.Counter, collections.Counter, int]:
    """Total microseconds per GPU kernel name and per HLO instruction (the trace's
    ``hlo_op``: a whole CUDA graph's name unless the step runs without them) in the Perfetto
    trace under ``trace_dir``, and the number of kernels."""
    trace = json.load(gzip.open(next(trace_dir.rglob("perfetto_trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in e["args"].get("name", "")}
    kernels, instructions, launches = collections.Counter(), collections.Counter(), 0
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            kernels[e["name"]] += e.get("dur", 0)
            instructions[(e.get("args", {}).get("hlo_op", "?"), group_of(e["name"]))] += e.get("dur", 0)
            launches += 1
    return kernels, instructions, launches


def attribute(instructions: collections.Counter, names: dict[str, str], repeats: int, top: int) -> dict:
    """Milliseconds per step by (phase, group), and the ``top`` instructions with their op names."""
    phases, rows = collections.Counter(), []
    for (inst, group), us in instructions.most_common():
        op = names.get(inst, "?")
        phases[f"{phase_of(op)} {group}"] += us / repeats / 1e3
        rows.append({"instruction": inst, "group": group, "op_name": op, "ms": us / repeats / 1e3})
    print_table(["phase and group", "ms/step"], [[k, f"{ms:.2f}"] for k, ms in phases.most_common()])
    print_table(["instruction", "op name", "ms/step"],
                [[r["instruction"][:40], r["op_name"][-70:], f"{r['ms']:.3f}"] for r in rows[:top]])
    return {"phases_ms": dict(phases), "top_instructions": rows[:top]}


def torch_kernel_times(trace: Path) -> tuple[collections.Counter, int]:
    """Total microseconds per GPU kernel (memsets and copies included) in a PyTorch
    profiler's Chrome trace, and the number of kernels."""
    kernels, launches = collections.Counter(), 0
    for e in json.loads(trace.read_text())["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"):
            kernels[e["name"]] += e.get("dur", 0)
            launches += 1
    return kernels, launches


def profile_ours(args) -> tuple[collections.Counter, float, int, dict]:
    """ode-lm's step under ``jax.profiler``: microseconds per kernel over ``--repeats`` steps,
    wall ms per step (profiler on), kernels, and (``--serial``) the per-instruction table."""
    step = make_train_step(SIZES[args.size], args.family, args.adjoint, checkpoint_saves=args.checkpoint_saves,
                           compiler_options=SERIAL_OPTIONS if args.serial else None)
    hlo = step.hlo()
    if args.hlo:
        Path(args.hlo).write_text(hlo)
    for _ in range(3):
        jax.block_until_ready(step())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.repeats):
                jax.block_until_ready(step())
            wall = (time.perf_counter() - start) / args.repeats * 1e3
        totals, instructions, launches = kernel_times(Path(tmp))
    by_instruction = attribute(instructions, op_names(hlo), args.repeats, args.top) if args.serial else {}
    return totals, wall, launches, by_instruction


def profile_peer(args) -> tuple[collections.Counter, float, int, dict]:
    """The PyTorch peer ``--peer`` (``_torch_peers.py``, the step ``bench_gpu.py`` times) under
    ``torch.profiler``, the same figures as ``profile_ours`` (no per-instruction table)."""
    import torch

    step, sync = peer_step(args.peer, SIZES[args.size])
    for _ in range(3):
        step()
        sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(args.repeats):
                step()
                sync()
            wall = (time.perf_counter() - start) / args.repeats * 1e3
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        totals, launches = torch_kernel_times(Path(tmp) / "trace.json")
    return totals, wall, launches, {}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="large", choices=list(SIZES))
    ap.add_argument("--family", default="time_indexed", choices=FAMILIES,
                    help="model family (standard: the per-kernel table to set the ODE step's against)")
    ap.add_argument("--peer", default=None, choices=PEERS,
                    help="profile this PyTorch peer's step instead of ours (needs torch)")
    ap.add_argument("--repeats", type=int, default=5, help="train steps run under the profiler")
    renamed_flag(ap, "--steps-profiled", "--repeats")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--adjoint", default="checkpoint", help="ode.adjoint")
    ap.add_argument("--checkpoint-saves", default="auto", help="ode.checkpoint_saves")
    ap.add_argument("--out", default="docs/results/gpu_profile.json")
    ap.add_argument("--hlo", default=None, help="also write the step's optimised HLO here")
    ap.add_argument("--serial", action="store_true",
                    help="without CUDA graphs: kernels one at a time, attributed to HLO instructions and phases")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    totals, wall, launches, by_instruction = (profile_peer if args.peer else profile_ours)(args)
    per_step = {k: v / args.repeats / 1e3 for k, v in totals.items()}  # ms
    busy = sum(per_step.values())
    groups = collections.Counter()
    for k, ms in per_step.items():
        groups[group_of(k)] += ms
    kernels = launches / args.repeats
    who = f"peer {args.peer}" if args.peer else args.family
    print(f"{machine()['device']}: GPU busy {busy:.2f} ms of {wall:.2f} ms per step ({who}, {args.size}), "
          f"{kernels:.0f} kernels per step")
    print_table(["group", "ms/step", "share"], [[g, f"{ms:.2f}", f"{100 * ms / busy:.0f}%"]
                                                 for g, ms in groups.most_common()])
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]
    print_table(["kernel", "ms/step"], [[k[:90], f"{ms:.3f}"] for k, ms in top])
    ours = {} if args.peer else {"family": args.family, "serial": args.serial, "adjoint": args.adjoint,
                                 "checkpoint_saves": args.checkpoint_saves}
    write_json(args.out, {"benchmark": "gpu_step_profile", "machine": machine_versions(machine()) if args.peer else machine(),
                          "size": args.size, "peer": args.peer, **ours, **by_instruction, **SIZES[args.size],
                          "busy_ms": busy, "wall_ms_profiled": wall, "kernels_per_step": kernels,
                          "groups_ms": dict(groups), "top_kernels_ms": dict(top)})


if __name__ == "__main__":
    main()
