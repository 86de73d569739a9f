"""What does integrating through diffrax cost over a hand-written residual loop?

One training step of the time-indexed model (the trainer's, ``build_train_step``: forward,
backward, AdamW), two ways, same maths:

- ours: ``integrate`` with diffrax Euler, N fixed steps, the configured sensitivity;
- baseline: ``x <- x + (1/N) f(n/N, x)`` as a plain ``jax.lax.scan`` over N (``PlainLoop``).

Prints ms/step, the ratio ours / baseline and both compile times for each N, and writes
JSON. Compile time must not grow with N (both are loops, not unrolled).

    python scripts/bench_ode_overhead.py --out docs/results/ode_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from _timing import machine, print_table, renamed_flag, time_compiled, write_json
from ode_lm.config import config_from_dict
from ode_lm.ode.stepping import SolveStats
from ode_lm.train.steps import build_train_step, init_state


class PlainLoop(eqx.Module):
    """The model with its solve written by hand: ``x <- x + (1/N) f(n/N, x)`` as a
    ``jax.lax.scan`` over N, the rest (embedding, readout, mixed precision) the model's own."""

    model: eqx.Module

    def in_dtype(self, dtype) -> "PlainLoop":
        return PlainLoop(self.model.in_dtype(dtype))

    def __call__(self, tokens, ode, *, key=None):
        m, n = self.model, ode.steps
        x0 = m.embedding(tokens)

        def layer(x, i):
            t = i.astype(x.dtype) / n
            return x + (1.0 / n) * m.field(t, x.astype(x0.dtype)).astype(x.dtype), None
        x, _ = jax.lax.scan(layer, x0.astype(jnp.float32), jnp.arange(n))
        steps = jnp.asarray(n)
        return m.readout(x.astype(x0.dtype), m.embedding), SolveStats(steps, steps, jnp.asarray(False))


def compile_and_time(step, model, tokens, repeats: int) -> tuple[float, float]:
    """``(compile seconds, median seconds per synchronised step)`` of the train step on ``model``."""
    opt_state = step.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    args = (model, opt_state, tokens[:, :-1], tokens[:, 1:], jax.random.key(2))
    start = time.perf_counter()
    compiled = step.compiled(*args)
    return time.perf_counter() - start, time_compiled(compiled, *args, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ode-steps", dest="steps", type=int, nargs="+", default=[4, 8, 16], help="Euler steps N")
    renamed_flag(ap, "--steps", "--ode-steps")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--adjoint", default="checkpoint")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="docs/results/ode_overhead.json")
    args = ap.parse_args()

    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, 256)
    rows, records = [], []
    for n in args.steps:
        # The same mixed precision as training (train.dtype): bf16 field, f32 state.
        cfg = config_from_dict({"model": {"dim": args.dim, "heads": args.heads,
                                          "max_positions": max(args.seq, 8), "dropout": 0.0},
                                "ode": {"solver": "euler", "steps": n, "adjoint": args.adjoint},
                                "data": {"seq_len": args.seq},
                                "train": {"batch_size": args.batch, "dtype": args.dtype}}, "bench_ode_overhead")
        model, _, _ = init_state(cfg, 256)
        step = build_train_step(cfg)
        c_ours, t_ours = compile_and_time(step, model, tokens, args.repeats)
        c_base, t_base = compile_and_time(step, PlainLoop(model), tokens, args.repeats)
        rows.append([n, t_ours * 1e3, t_base * 1e3, t_ours / t_base, c_ours, c_base])
        records.append({"steps": n, "ours_ms": t_ours * 1e3, "scan_ms": t_base * 1e3,
                        "ratio": t_ours / t_base, "ours_compile_s": c_ours, "scan_compile_s": c_base})
    print(f"train step, time-indexed model dim={args.dim} heads={args.heads} seq={args.seq} "
          f"batch={args.batch}, adjoint={args.adjoint}, {machine()['device']}")
    print_table(["N", "diffrax ms", "scan ms", "ratio", "diffrax compile s", "scan compile s"], rows)
    write_json(args.out, {"benchmark": "ode_overhead", "machine": machine(), "args": vars(args),
                          "results": records})


if __name__ == "__main__":
    main()
