"""Training memory, step time and gradient error of each sensitivity as the steps grow.

For N in --ode-steps and each sensitivity (checkpoint, direct, backsolve, reversible), one
training step (forward, backward, AdamW update) of the time-indexed model on random tokens:

- temp MiB: the compiled executable's peak temporary memory
  (``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``);
- step ms: median synchronised time per step, compilation excluded;
- grad err: relative L2 error of the parameter gradient against ``direct`` (backprop
  through the base solver), in float64 on a small model (--grad-dim/--grad-seq). For
  ``reversible`` a second figure compares with ``direct`` backprop through the reversible
  scheme itself, which its gradient must equal.

Targets: reversible memory at the largest N <= 1.2x at the smallest; direct grows linearly;
reversible step time <= 2.5x checkpoint's. Prints a table and the targets, writes JSON and
a PNG plot. Needs no data pipeline (no ``datasets``/``tensorboardX``).

    python scripts/bench_memory.py                              # GPU-sized defaults
    python scripts/bench_memory.py --dim 64 --seq 64 --batch 4  # a small CPU run

``--checkpoint-saves states matmuls`` adds a ``checkpoint+matmuls`` row per N: checkpoint
keeping the matrix products' outputs too (``ode.checkpoint_saves``).
"""

from __future__ import annotations

import argparse
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from _timing import machine, print_table, renamed_flag, time_compiled, write_json
from ode_lm.config import (ADJOINTS, CHECKPOINT_SAVES, REVERSIBLE_SOLVERS, Config, DataConfig, ModelConfig,
                           ODEConfig, TrainConfig)
from ode_lm.models import build_model
from ode_lm.ode import integrate_reversible
from ode_lm.train.steps import build_train_step, cross_entropy, init_state

VOCAB = 256
MIB = 2 ** 20


def model_config(dim: int, heads: int, seq: int) -> ModelConfig:
    return ModelConfig(dim=dim, heads=heads, max_positions=max(seq, 8), dropout=0.0)


def measure_step(cfg: ModelConfig, ode: ODEConfig, batch: int, seq: int, repeats: int) -> dict:
    """Compile the trainer's training step (forward, backward, AdamW; ``build_train_step``);
    its temporary memory and median time."""
    run = Config(model=cfg, ode=ode, data=DataConfig(seq_len=seq), train=TrainConfig(batch_size=batch))
    model, _, opt_state = init_state(run, VOCAB)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, VOCAB)
    args = (model, opt_state, tokens[:, :-1], tokens[:, 1:], jax.random.key(2))
    compiled = build_train_step(run).compiled(*args)
    memory = compiled.memory_analysis()
    seconds = time_compiled(compiled, *args, repeats=repeats)
    return {"temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes), "step_s": seconds}


def gradient(model, tokens, ode: ODEConfig, reversible_gradient: str | None = None):
    """Flat float64 gradient of the next-token loss; ``reversible_gradient`` picks how the
    reversible scheme is differentiated ("reversible" or "direct")."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(m):
        if reversible_gradient is None:
            return cross_entropy(m, inputs, targets, ode, None)[0]
        x1, _ = integrate_reversible(m.field, m.embedding(inputs), ode, gradient=reversible_gradient)
        logits = m.readout(x1, m.embedding)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gradient_errors(args, steps: int) -> dict:
    """Relative gradient errors against direct backprop, float64, small model."""
    with jax.enable_x64(True):
        cfg = model_config(args.grad_dim, args.grad_heads, args.grad_seq)
        model = build_model(cfg, VOCAB, jax.random.key(0), jnp.float64)
        tokens = jax.random.randint(jax.random.key(2), (2, args.grad_seq + 1), 0, VOCAB)
        ode = ODEConfig(solver=args.solver, steps=steps, reversible_coupling=args.coupling)
        reference = gradient(model, tokens, ode)
        errors = {}
        for label, adjoint, saves in variants(args):
            if adjoint == "reversible":
                rev_ode = ODEConfig(solver=args.solver, steps=steps, adjoint="reversible",
                                    reversible_coupling=args.coupling)
                g = gradient(model, tokens, rev_ode, "reversible")
                errors["reversible"] = rel_err(g, reference)
                errors["reversible_vs_own_direct"] = rel_err(g, gradient(model, tokens, rev_ode, "direct"))
            else:
                ode_v = dataclasses.replace(ode, adjoint=adjoint, checkpoint_saves=saves)
                errors[label] = rel_err(gradient(model, tokens, ode_v), reference)
        return errors


def variants(args) -> list[tuple[str, str, str]]:
    """``(label, ode.adjoint, ode.checkpoint_saves)`` of every row: each sensitivity, and
    ``checkpoint`` once per ``--checkpoint-saves`` policy ("checkpoint+matmuls")."""
    rows = []
    for adjoint in args.sensitivities:
        for saves in args.checkpoint_saves if adjoint == "checkpoint" else ["states"]:
            rows.append((adjoint if saves == "states" else f"{adjoint}+{saves}", adjoint, saves))
    return rows


def plot(records: list[dict], sensitivities: list[str], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for adjoint in sensitivities:
        rows = [r for r in records if r["sensitivity"] == adjoint]
        n = [r["steps"] for r in rows]
        axes[0].plot(n, [r["temp_bytes"] / MIB for r in rows], "o-", label=adjoint)
        axes[1].plot(n, [r["step_s"] * 1e3 for r in rows], "o-", label=adjoint)
        if adjoint != "direct":
            axes[2].plot(n, [max(r["grad_rel_err"], 1e-17) for r in rows], "o-", label=adjoint)
    rows = [r for r in records if r["sensitivity"] == "reversible"]
    if rows:
        axes[2].plot([r["steps"] for r in rows], [max(r["grad_rel_err_own_direct"], 1e-17) for r in rows],
                     "x--", label="reversible vs direct through the same scheme")
    for ax, ylabel in zip(axes, ["peak temporary memory (MiB)", "training step (ms)",
                                 "gradient rel. error vs direct (float64)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("solver steps N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ode-steps", dest="steps", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                    help="ode.steps N of each row")
    renamed_flag(ap, "--steps", "--ode-steps")
    ap.add_argument("--sensitivities", nargs="+", default=list(ADJOINTS), choices=ADJOINTS)
    ap.add_argument("--checkpoint-saves", nargs="+", default=["states"], choices=CHECKPOINT_SAVES,
                    help="ode.checkpoint_saves policies to time for checkpoint (one row each)")
    ap.add_argument("--solver", default="euler", choices=REVERSIBLE_SOLVERS)
    ap.add_argument("--coupling", type=float, default=ODEConfig().reversible_coupling)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--grad-dim", type=int, default=16)
    ap.add_argument("--grad-heads", type=int, default=2)
    ap.add_argument("--grad-seq", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/memory_<platform>.json)")
    ap.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    args = ap.parse_args()
    if "direct" not in args.sensitivities:
        ap.error("--sensitivities must include direct (the reference)")
    return args


def measure_all(args) -> tuple[list[list], list[dict]]:
    """One row per (N, sensitivity): the step's temporaries, its time and its gradient error."""
    cfg = model_config(args.dim, args.heads, args.seq)
    rows, records = [], []
    for n in args.steps:
        errors = gradient_errors(args, n)
        for label, adjoint, saves in variants(args):
            ode = ODEConfig(solver=args.solver, steps=n, adjoint=adjoint, checkpoint_saves=saves,
                            reversible_coupling=args.coupling)
            m = measure_step(cfg, ode, args.batch, args.seq, args.repeats)
            record = {"steps": n, "sensitivity": label, **m, "grad_rel_err": errors[label]}
            own = errors.get("reversible_vs_own_direct") if adjoint == "reversible" else None
            if own is not None:
                record["grad_rel_err_own_direct"] = own
            records.append(record)
            rows.append([n, label, m["temp_bytes"] / MIB, m["step_s"] * 1e3, f"{errors[label]:.2e}",
                         "" if own is None else f"{own:.2e}"])
            print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.3f}" for c in rows[-1]), flush=True)
    return rows, records


def targets_of(args, records: list[dict]) -> dict:
    """Reversible memory flat in N, direct memory linear in N, reversible time vs checkpoint."""
    def get(adjoint, n, key):
        return next(r[key] for r in records if r["sensitivity"] == adjoint and r["steps"] == n)

    lo, hi = min(args.steps), max(args.steps)
    targets = {}
    if "reversible" in args.sensitivities:
        targets["reversible_memory_ratio"] = get("reversible", hi, "temp_bytes") / get("reversible", lo, "temp_bytes")
        targets["reversible_memory_ok"] = targets["reversible_memory_ratio"] <= 1.2
    direct_mem = np.array([get("direct", n, "temp_bytes") for n in args.steps], float)
    slope, intercept = np.polyfit(args.steps, direct_mem, 1)
    fitted = slope * np.array(args.steps) + intercept
    targets["direct_bytes_per_step"] = float(slope)
    targets["direct_linear_r2"] = float(1 - np.sum((direct_mem - fitted) ** 2) / np.sum((direct_mem - direct_mem.mean()) ** 2))
    if {"reversible", "checkpoint"} <= set(args.sensitivities):
        ratios = {n: get("reversible", n, "step_s") / get("checkpoint", n, "step_s") for n in args.steps}
        targets["reversible_over_checkpoint_time"] = ratios
        targets["reversible_time_ok"] = max(ratios.values()) <= 2.5
    return targets


def report(args, rows: list[list], targets: dict, title: str) -> None:
    print(title)
    print_table(["N", "sensitivity", "temp MiB", "step ms", "grad err vs direct", "vs own direct"], rows)
    if "reversible_memory_ratio" in targets:
        print(f"reversible memory N={max(args.steps)} / N={min(args.steps)}: {targets['reversible_memory_ratio']:.3f} "
              f"(target <= 1.2: {'met' if targets['reversible_memory_ok'] else 'MISSED'})")
    print(f"direct memory: {targets['direct_bytes_per_step'] / MIB:.3f} MiB per step, linear fit R^2 = "
          f"{targets['direct_linear_r2']:.4f}")
    if "reversible_time_ok" in targets:
        worst = max(targets["reversible_over_checkpoint_time"].values())
        print(f"reversible / checkpoint step time: at most {worst:.2f}x (target <= 2.5x: "
              f"{'met' if targets['reversible_time_ok'] else 'MISSED'})")


def main() -> None:
    args = parse_args()
    out = args.out or f"docs/results/memory_{jax.default_backend()}.json"
    rows, records = measure_all(args)
    targets = targets_of(args, records)
    title = (f"one AdamW step, time-indexed model dim={args.dim} heads={args.heads} seq={args.seq} "
             f"batch={args.batch}, solver={args.solver}, lambda={args.coupling}, {machine()['device']}")
    report(args, rows, targets, title)
    write_json(out, {"benchmark": "memory", "machine": machine(), "args": vars(args),
                     "results": records, "targets": targets})
    plot(records, [label for label, _, _ in variants(args)], args.plot or str(out).removesuffix(".json") + ".png", title)


if __name__ == "__main__":
    main()
