"""What does integrating through diffrax cost over a hand-written residual loop?

One training step (forward + backward) of the time-indexed model, two ways, same maths:

- ours: ``integrate`` with diffrax Euler, N fixed steps, the configured sensitivity;
- baseline: ``x <- x + (1/N) f(n/N, x)`` as a plain ``jax.lax.scan`` over N.

Prints ms/step, the ratio ours / baseline and both compile times for each N, and writes
JSON. Compile time must not grow with N (both are loops, not unrolled).

    python scripts/bench_ode_overhead.py --out docs/results/ode_overhead_cpu.json
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from _timing import compile_and_time, machine, print_table, write_json
from ode_lm.config import ModelConfig, ODEConfig
from ode_lm.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--adjoint", default="checkpoint")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="docs/results/ode_overhead.json")
    args = ap.parse_args()

    cfg = ModelConfig(dim=args.dim, heads=args.heads, max_positions=max(args.seq, 8), dropout=0.0)
    model = build_model(cfg, 256, jax.random.key(0))
    if args.dtype == "bfloat16":  # the same mixed precision as training: bf16 field, f32 state
        model = model.in_dtype(jnp.bfloat16)
    params, static = eqx.partition(model, eqx.is_array)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 256)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss_from_logits(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    rows, records = [], []
    for n in args.steps:
        ode = ODEConfig(solver="euler", steps=n, adjoint=args.adjoint)

        def ours(p):
            def loss(p):
                logits, _ = eqx.combine(p, static)(tokens, ode)
                return loss_from_logits(logits.astype(jnp.float32))
            return jax.value_and_grad(loss)(p)

        def baseline(p):
            def loss(p):
                m = eqx.combine(p, static)
                def layer(x, i):
                    t = i.astype(x.dtype) / n
                    return x + (1.0 / n) * m.field(t, x.astype(x0.dtype)).astype(x.dtype), None
                x0 = m.embedding(tokens)
                x, _ = jax.lax.scan(layer, x0.astype(jnp.float32), jnp.arange(n))
                return loss_from_logits(m.readout(x.astype(x0.dtype), m.embedding).astype(jnp.float32))
            return jax.value_and_grad(loss)(p)

        c_ours, t_ours = compile_and_time(ours, params, repeats=args.repeats)
        c_base, t_base = compile_and_time(baseline, params, repeats=args.repeats)
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
