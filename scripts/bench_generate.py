"""Generation speed: KV-cached decoding vs full recomputation (``--no-cache``), in one run.

The time-indexed model at reference size (dim 256, 4 heads, Euler with 6 steps), randomly
initialised (speed does not depend on the weights), batch 1, greedy. Compilation is kept out
of the clock: every padded length ``--no-cache`` meets is compiled up front, and the cached
generation runs once before it is timed. ``generate`` returns host arrays, so the clock
stops after the device has finished. Tokens/s counts new tokens over the whole call
(prefill included).

Batched rows: ``--batch`` sizes (default 1, 8, 64) sample that many sequences of one prompt in
one batch (``num_samples``; temperature 1) for ``--batch-new-tokens`` new tokens (default
1024): tokens/s counts every sequence's new tokens. ``streamed_tokens_per_s`` is batch-1
cached decoding with an ``on_token`` callback (chunks of ``generate.chunk`` tokens per device
call, the path ``ode-lm generate`` streams through).

Also measures how far adaptive decoding on the frozen prompt grid drifts from a full
adaptive recomputation (docs/generation.md).

    python scripts/bench_generate.py                      # 128, 512, 1024 new tokens
    python scripts/bench_generate.py --new-tokens 128 512 # a subset
    python scripts/bench_generate.py --batch 1 8 64 --batch-new-tokens 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import machine, print_table, renamed_flag, write_json  # noqa: E402

from ode_lm.config import GATE_APPLY, ModelConfig, ODEConfig  # noqa: E402
from ode_lm.generate import generate, greedy_logits  # noqa: E402
from ode_lm.models import build_model  # noqa: E402


def timed(fn) -> float:
    """Seconds of ``fn()``; generate() returns host arrays, so the device work is done."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def adaptive_deviation(model, prompt, new_tokens: int, rtol: float) -> dict:
    """Cached greedy decoding on the prompt's frozen adaptive grid vs an adaptive solve of
    the whole sequence (which picks its own grid)."""
    ode = ODEConfig(solver="tsit5", adaptive=True, rtol=rtol, atol=rtol * 1e-3)
    p = prompt.shape[1]
    cache = model.init_cache(prompt, ode, p + new_tokens)

    new, cached = greedy_logits(model, prompt, cache, new_tokens)
    cached = cached[:, p:]
    full, stats = eqx.filter_jit(model)(jnp.concatenate([prompt, new], axis=1), ode)
    full = full[:, p:]
    return {"solver": "tsit5", "rtol": rtol, "new_tokens": new_tokens,
            "prompt_grid_steps": int(cache.grid.shape[0] - 1), "full_sequence_steps": int(stats.steps),
            "max_abs_logit_deviation": float(jnp.abs(cached - full).max()),
            "greedy_agreement": float(jnp.mean(jnp.argmax(full[:, :-1], -1) == new[:, 1:]))}


def batch_throughput(model, prompt, ode, batches: list[int], new_tokens: int) -> list[dict]:
    """Cached sampling of ``batch`` sequences at once; compile excluded (one untimed run each)."""
    rows, results = [], []
    for batch in batches:
        def run():
            return generate(model, prompt, ode, temperature=1.0, max_new_tokens=new_tokens, num_samples=batch)
        run()
        seconds = timed(run)
        rate = batch * new_tokens / seconds
        rows.append([batch, new_tokens, round(rate, 1), round(rate / batch, 1), round(seconds, 3)])
        results.append({"batch": batch, "new_tokens": new_tokens, "tokens_per_s": rate,
                        "tokens_per_s_per_sequence": rate / batch, "seconds": seconds})
    if rows:
        print_table(["batch", "new tokens", "tok/s (all sequences)", "tok/s per sequence", "seconds"], rows)
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--ode-steps", dest="steps", type=int, default=6, help="ode.steps of the model")
    renamed_flag(parser, "--steps", "--ode-steps")
    parser.add_argument("--bucket", type=int, default=128, help="padding granularity of --no-cache")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64], help="batched rows (none: skip)")
    parser.add_argument("--batch-new-tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=32, help="generate.chunk of the streamed row")
    parser.add_argument("--gate-apply", default="auto", choices=GATE_APPLY, help="model.gate_apply")
    parser.add_argument("--rtol", type=float, default=1e-3, help="adaptive-deviation tolerance")
    parser.add_argument("--out", default=None, help="JSON path (default docs/results/generate_<backend>.json)")
    return parser.parse_args()


def cached_vs_recompute(model, prompt, ode, args, n: int) -> tuple[list, dict]:
    """Batch-1 greedy decoding of ``n`` tokens cached, recomputed (``--no-cache``) and
    streamed: one table row and its record (compiled beforehand)."""
    run = {c: (lambda c=c: generate(model, prompt, ode, greedy=True, max_new_tokens=n, cache=c,
                                    bucket=args.bucket)) for c in (True, False)}
    run["streamed"] = lambda: generate(model, prompt, ode, greedy=True, max_new_tokens=n, chunk=args.chunk,
                                       on_token=lambda _: None)
    run[True]()  # compile the cached paths (--no-cache's lengths are compiled up front)
    run["streamed"]()
    tokens, seconds = {}, {}
    for c in (True, False, "streamed"):
        seconds[c] = timed(lambda c=c: tokens.__setitem__(c, run[c]()))
    agree = float(np.mean(tokens[True] == tokens[False]))
    rate = {c: n / seconds[c] for c in seconds}
    row = [n, round(rate[True], 1), round(rate["streamed"], 1), round(rate[False], 1),
           round(rate[True] / rate[False], 1), round(seconds[True], 3), round(seconds[False], 3), agree]
    return row, {"new_tokens": n, "cached_tokens_per_s": rate[True],
                 "recompute_tokens_per_s": rate[False], "speedup": rate[True] / rate[False],
                 "cached_s": seconds[True], "recompute_s": seconds[False],
                 "greedy_token_agreement": agree, "streamed_tokens_per_s": rate["streamed"],
                 "streamed_chunk": args.chunk,
                 "streamed_same_tokens": bool(np.array_equal(tokens["streamed"], tokens[True]))}


def main() -> None:
    args = parse_args()
    longest = args.prompt_len + max(args.new_tokens + ([args.batch_new_tokens] if args.batch else []))
    cfg = ModelConfig(dim=args.dim, heads=args.heads, max_positions=longest, dropout=0.0, gate_apply=args.gate_apply)
    model = build_model(cfg, 256, jax.random.key(0))
    ode = ODEConfig(solver=args.solver, steps=args.steps)
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (args.prompt_len,), 0, 256))
    print(f"time_indexed dim {args.dim}, {args.heads} heads, {args.solver} x {args.steps} steps, "
          f"prompt {args.prompt_len}, batch 1, on {machine()['device']}")

    # Compile every padded length --no-cache will meet (one new token from a prompt that long).
    for length in range(args.bucket, longest + args.bucket, args.bucket):
        length = min(length, longest - 1)
        generate(model, np.resize(prompt, length), ode, greedy=True, max_new_tokens=1, cache=False,
                 bucket=args.bucket)
    rows, results = zip(*(cached_vs_recompute(model, prompt, ode, args, n) for n in args.new_tokens))
    print_table(["new tokens", "cached tok/s", f"streamed (chunk {args.chunk}) tok/s", "no-cache tok/s",
                 "speedup", "cached s", "no-cache s", "greedy agree"], list(rows))
    batch_results = batch_throughput(model, prompt, ode, args.batch, args.batch_new_tokens)

    deviation = adaptive_deviation(model, jnp.asarray(prompt)[None], min(64, max(args.new_tokens)), args.rtol)
    print(f"adaptive tsit5 rtol {args.rtol}: prompt grid {deviation['prompt_grid_steps']} steps, "
          f"full-sequence solve {deviation['full_sequence_steps']} steps; max |logit deviation| "
          f"{deviation['max_abs_logit_deviation']:.3g}, greedy agreement {deviation['greedy_agreement']:.3f}")
    out = args.out or f"docs/results/generate_{jax.default_backend()}.json"
    write_json(out, {"machine": machine(), "config": vars(args), "results": list(results),
                     "batch_results": batch_results, "adaptive_deviation": deviation})


if __name__ == "__main__":
    main()
