"""Where a decoded token's GPU time goes: kernels per token, GPU-busy and wall time per token.

Runs ode-lm's cached ``generate`` (batch 1 by default, greedy) on a randomly initialised
model at the decoding benchmark's size (``bench_generate.py``: dim 256, 4 heads, Euler with
6 steps; ``standard`` gets as many layers as the solve has steps) under ``jax.profiler``,
and reads the Perfetto trace. Wall time per token is measured without the profiler; the
gap between it and the GPU's busy time per token is time the GPU waits (launches, the
host's loop control).

    python scripts/profile_gpu_decode.py --families time_indexed standard hypernetwork
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from _timing import machine, print_table, write_json
from profile_gpu_step import group_of, kernel_times
from ode_lm.config import DECODE_WEIGHTS, FAMILIES, ModelConfig, ODEConfig
from ode_lm.generate import generate
from ode_lm.models import build_model


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["time_indexed"], choices=FAMILIES)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ode-steps", type=int, default=6, help="ode.steps (standard: model.layers)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="samples decoded at once")
    ap.add_argument("--unroll", type=int, default=None, help="generate.unroll (default: its default)")
    ap.add_argument("--decode-weights", default=None, choices=DECODE_WEIGHTS,
                    help="generate.decode_weights (default: its default)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="docs/results/gpu_profile_decode.json")
    return ap.parse_args()


def profile_family(family: str, args) -> dict:
    cfg = ModelConfig(family=family, dim=args.dim, heads=args.heads, layers=args.ode_steps, dropout=0.0,
                      max_positions=args.prompt_len + args.new_tokens)
    model = build_model(cfg, 256, jax.random.key(0))
    ode = ODEConfig(solver="euler", steps=args.ode_steps)
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (args.prompt_len,), 0, 256))

    settings = {k: v for k, v in (("unroll", args.unroll), ("decode_weights", args.decode_weights)) if v is not None}

    def run():
        return generate(model, prompt, ode, greedy=args.batch == 1, temperature=1.0, num_samples=args.batch,
                        max_new_tokens=args.new_tokens, **settings)  # host arrays: synced
    run()
    start = time.perf_counter()
    run()
    wall_us = (time.perf_counter() - start) / args.new_tokens * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run()
        totals, launches = kernel_times(Path(tmp))
    per_token = {k: v / args.new_tokens for k, v in totals.items()}  # us
    groups = collections.Counter()
    for k, us in per_token.items():
        groups[group_of(k)] += us
    top = dict(sorted(per_token.items(), key=lambda kv: -kv[1])[: args.top])
    return {"family": family, "wall_us_per_token": wall_us, "tokens_per_s": 1e6 / wall_us * args.batch,
            "busy_us_per_token": sum(per_token.values()), "kernels_per_token": launches / args.new_tokens,
            "groups_us": dict(groups), "top_kernels_us": top}


def main() -> None:
    args = parse_args()
    results = [profile_family(f, args) for f in args.families]
    print(f"{machine()['device']}: cached decoding, batch {args.batch}, {args.new_tokens} new tokens, "
          f"dim {args.dim}, Euler x {args.ode_steps}")
    print_table(["family", "tok/s", "wall us/token", "GPU busy us/token", "kernels/token"],
                [[r["family"], round(r["tokens_per_s"]), r["wall_us_per_token"], r["busy_us_per_token"],
                  round(r["kernels_per_token"], 1)] for r in results])
    for r in results:
        print_table([f"{r['family']}: kernel", "us/token"], [[k[:90], us] for k, us in r["top_kernels_us"].items()])
    write_json(args.out, {"benchmark": "gpu_decode_profile", "machine": machine(), "config": vars(args),
                          "results": results})


if __name__ == "__main__":
    main()
