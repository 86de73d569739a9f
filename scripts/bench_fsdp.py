"""What ``train.fsdp`` saves and what it costs.

``memory`` (CPU by default): per-device bytes of the training state (parameters + AdamW
state) at 1, 2, 4, ... devices, replicated and FSDP, from the arrays' resident shards and
from XLA's memory analysis of the compiled step (its argument bytes: the state plus one
batch). Each device count runs in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

    python scripts/bench_fsdp.py memory configs/time_indexed.toml      # -> docs/results/fsdp_cpu.json

``gpu`` (one accelerator):

- the step-time cost of ``train.fsdp = true`` on one device against false: the same state,
  batch and key, each variant compiled once, synchronised steps, alternating ``--rounds``
  times (ratios inside one process, compile excluded);
- the largest ``time_indexed`` width ``model.dim`` (``model.heads = dim / 64``) whose train
  step fits the device, by XLA's memory analysis of the compiled step (nothing is
  allocated: the state is abstract): replicated, and with FSDP's optimizer-state savings
  over ``--shards`` devices (each holds 1/N of AdamW's moments, in the step's inputs and its
  outputs). A bisection over multiples of ``--granularity``, stopped by ``--budget-s``
  (the bracket found so far is reported); each width compiles in its own process, with
  XLA's GEMM autotuning off (``fits_in_child``).

    python scripts/bench_fsdp.py gpu configs/time_indexed.toml          # -> docs/results/fsdp_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

from _timing import machine, print_table, time_compiled, write_json
from ode_lm.train.steps import peak_bytes

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def state_and_step(config: str, overrides: list[str], fsdp: bool, abstract: bool = False):
    """``(cfg, parallel, state, shardings, step, batch, key)`` of one train step."""
    import jax.numpy as jnp

    from ode_lm.config import load_config
    from ode_lm.train.parallel import DataParallel
    from ode_lm.train.sharding import place, state_shapes
    from ode_lm.train.steps import build_train_step, init_state

    cfg = load_config(config, [*overrides, f"train.fsdp={str(fsdp).lower()}"])
    parallel = DataParallel(cfg)
    if abstract:
        shapes = state_shapes(cfg, 256)
        shardings = parallel.state_shardings(shapes)
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        batch = [jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32,
                                      sharding=parallel.batch_sharding)] * 2
    else:
        model, _, opt_state = init_state(cfg, 256)
        shardings = parallel.state_shardings((model, opt_state))
        state = place((model, opt_state), shardings)
        tokens = jax.random.randint(jax.random.key(1), (cfg.train.batch_size, cfg.data.seq_len + 1), 0, 256)
        batch = [parallel.batch(jax.device_get(tokens[:, :-1])), parallel.batch(jax.device_get(tokens[:, 1:]))]
    step = build_train_step(cfg, state_shardings=shardings if fsdp else None)
    return cfg, parallel, state, shardings, step, batch, jax.random.key(0)


# ---- memory at several device counts (one process each) -----------------------------------

def measure_memory(config: str, overrides: list[str]) -> dict:
    from ode_lm.train.sharding import device_bytes

    out = {"devices": jax.device_count()}
    for fsdp in (False, True):
        _, _, state, _, step, batch, key = state_and_step(config, overrides, fsdp)
        analysis = step.compiled(*state, *batch, key).memory_analysis()
        out["fsdp" if fsdp else "replicated"] = {
            "resident_bytes": device_bytes(state),
            "compiled_argument_bytes": int(analysis.argument_size_in_bytes),
            "compiled_peak_bytes": peak_bytes(analysis)}
    return out


def memory(args) -> None:
    records = []
    for n in args.devices:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, __file__, "_measure", os.path.abspath(args.config), *args.overrides], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            sys.exit(f"{n} devices failed:\n{proc.stderr[-3000:]}")
        records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = records[0]["replicated"]["resident_bytes"]
    rows = [[r["devices"], v, r[v]["resident_bytes"] / MIB, r[v]["compiled_argument_bytes"] / MIB,
             r[v]["compiled_peak_bytes"] / MIB, r[v]["resident_bytes"] / base]
            for r in records for v in ("replicated", "fsdp")]
    print(f"{args.config} {' '.join(args.overrides)}: parameters + AdamW state per device")
    print_table(["devices", "state", "resident MiB", "step args MiB", "step peak MiB", "x 1 device"], rows)
    info = {**machine(), "devices": args.devices}
    write_json(args.out or "docs/results/fsdp_cpu.json",
               {"benchmark": "fsdp_memory", "machine": info, "config": args.config, "overrides": args.overrides,
                "results": records})


# ---- one accelerator: step time, and the widest model that fits -----------------------------

def step_time(args) -> dict:
    variants = {fsdp: state_and_step(args.config, args.overrides, fsdp) for fsdp in (False, True)}
    compiled = {fsdp: v[4].compiled(*v[2], *v[5], v[6]) for fsdp, v in variants.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for fsdp, (_, _, state, _, _, batch, key) in variants.items():
            times[fsdp].append(1e3 * time_compiled(compiled[fsdp], *state, *batch, key, repeats=args.repeats))
    best = {fsdp: min(t) for fsdp, t in times.items()}
    return {"replicated_ms": best[False], "fsdp_ms": best[True], "ratio": best[True] / best[False],
            "rounds_ms": {"replicated": times[False], "fsdp": times[True]}}


def fits(config: str, overrides: list[str], dim: int, capacity: int, shards: int) -> dict:
    """XLA's memory analysis of the train step at width ``dim``: peak bytes, optimizer bytes."""
    overrides = [*overrides, f"model.dim={dim}", f"model.heads={max(1, dim // 64)}"]
    _, _, state, _, step, batch, key = state_and_step(config, overrides, False, abstract=True)
    start = time.perf_counter()
    peak = peak_bytes(step.compiled(*state, *batch, key).memory_analysis())
    optimizer = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state[1]))
    parameters = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state[0]))
    # FSDP over N devices: each holds 1/N of the optimizer state it takes in and gives out.
    sharded = peak - 2 * optimizer * (1 - 1 / shards)
    return {"dim": dim, "parameters": parameters // 4, "peak_bytes": peak, "optimizer_bytes": optimizer,
            "peak_with_sharded_optimizer_bytes": int(sharded), "fits": peak <= capacity,
            "fits_with_sharded_optimizer": sharded <= capacity, "compile_s": time.perf_counter() - start}


def fits_in_child(args, dim: int, capacity: int) -> dict:
    """``fits`` in a fresh process with XLA's GEMM autotuning off: autotuning runs every
    candidate kernel at the probed width (minutes per probe at widths of 10k and more) and
    picks among kernels, not buffer sizes, so the memory analysis is that of the tuned step
    up to a kernel's workspace."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    env = {**os.environ, "XLA_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "_probe", os.path.abspath(args.config), str(dim), str(capacity),
                           str(args.shards), *args.overrides], env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"probe of model.dim={dim} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def widest(args, capacity: int, deadline: float) -> dict:
    probes: dict[int, dict] = {}

    def probe(dim):
        if dim not in probes:
            probes[dim] = fits_in_child(args, dim, capacity)
            print(f"  dim {dim}: peak {probes[dim]['peak_bytes'] / 2**30:.2f} GiB, with sharded optimizer "
                  f"{probes[dim]['peak_with_sharded_optimizer_bytes'] / 2**30:.2f} GiB", flush=True)
        return probes[dim]

    unit = args.granularity
    result, lo = {}, args.min_dim // unit
    for key in ("fits", "fits_with_sharded_optimizer"):  # what fits replicated fits sharded too
        hi = args.max_dim // unit  # in units: lo fits, hi does not
        if not probe(lo * unit)[key]:
            result[key] = {"largest_dim": None, "bracket": [None, lo * unit]}
            continue
        if probe(hi * unit)[key]:  # the whole range fits: raise --max-dim
            result[key] = {"largest_dim": None, "bracket": [hi * unit, None]}
            continue
        # the probes of the search before bound this one too
        lo = max([lo, *(d // unit for d, p in probes.items() if p[key])])
        hi = min([hi, *(d // unit for d, p in probes.items() if not p[key])])
        while hi - lo > 1 and time.monotonic() < deadline:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if probe(mid * unit)[key] else (lo, mid)
        result[key] = {"largest_dim": lo * unit if hi - lo == 1 else None, "bracket": [lo * unit, hi * unit]}
    return {"capacity_bytes": capacity, "search": result, "probes": sorted(probes.values(), key=lambda p: p["dim"])}


def gpu(args) -> None:
    deadline = time.monotonic() + args.budget_s
    stats = jax.local_devices()[0].memory_stats() or {}
    capacity = int(args.capacity_gib * 2**30) if args.capacity_gib else int(stats.get("bytes_limit", 0))
    if not capacity:
        sys.exit("no device memory limit reported; pass --capacity-gib")
    timing = step_time(args)
    print(f"{args.config} {' '.join(args.overrides)} on {machine()['device']}")
    print_table(["variant", "ms/step (best of rounds)"],
                [["train.fsdp = false", timing["replicated_ms"]], ["train.fsdp = true", timing["fsdp_ms"]],
                 ["ratio", timing["ratio"]]])
    print(f"widest model.dim that fits {capacity / 2**30:.1f} GiB (FSDP optimizer savings over {args.shards}):")
    search = widest(args, capacity, deadline)
    print_table(["state", "largest dim", "bracket"],
                [[k, str(v["largest_dim"]), f"{v['bracket'][0]}..{v['bracket'][1]}"]
                 for k, v in search["search"].items()])
    write_json(args.out or f"docs/results/fsdp_{jax.default_backend()}.json",
               {"benchmark": "fsdp_gpu", "machine": machine(), "config": args.config, "overrides": args.overrides,
                "shards": args.shards, "step_time": timing, "width": search})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":  # one device count (a child process)
        print(json.dumps(measure_memory(sys.argv[2], sys.argv[3:])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":  # one width (a child process)
        config, dim, capacity, shards, *overrides = sys.argv[2:]
        print(json.dumps(fits(config, overrides, int(dim), int(capacity), int(shards))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("memory", help="per-device state bytes at several CPU device counts")
    m.add_argument("config")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    m.add_argument("--out", default=None, help="JSON path (default docs/results/fsdp_cpu.json)")
    g = sub.add_parser("gpu", help="step-time cost on one device and the widest model that fits")
    g.add_argument("config")
    g.add_argument("overrides", nargs="*")
    g.add_argument("--rounds", type=int, default=3, help="alternations of the two step variants")
    g.add_argument("--repeats", type=int, default=20, help="synchronised steps per round")
    g.add_argument("--shards", type=int, default=8, help="devices FSDP would shard the optimizer over")
    g.add_argument("--min-dim", type=int, default=512)
    g.add_argument("--max-dim", type=int, default=32768)
    g.add_argument("--granularity", type=int, default=512, help="widths probed are multiples of this "
                   "(a multiple of 64: model.heads = dim / 64)")
    g.add_argument("--capacity-gib", type=float, default=None, help="device memory (default: reported limit)")
    g.add_argument("--budget-s", type=float, default=150.0, help="stop the width search after this long")
    g.add_argument("--out", default=None, help="JSON path (default docs/results/fsdp_<backend>.json)")
    args = ap.parse_args()
    memory(args) if args.mode == "memory" else gpu(args)


if __name__ == "__main__":
    main()
