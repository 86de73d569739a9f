"""Training-step time and parameter count of every model family, in one run.

Each family is built at the same size (reference: dim 256, 4 heads, 6 Euler steps or 6
layers, seq 512, batch 32, dropout 0.1) and timed on its real jitted train step (the
``build_train_step`` of ``ode_lm.train.steps``, with its XLA options: forward, backward, AdamW) on
random tokens, so the script needs neither ``datasets`` nor ``tensorboardX``. Compile time is
excluded. Steps are timed back to back, as the trainer queues them (the headline and the
ratios), and synchronised one by one. Prints a table (ms/step, ratio to ``standard`` and to
``time_indexed``, model GFLOP per step from ``ode_lm.models.accounting``, achieved TFLOP/s)
and writes JSON, with each step's temporary memory from XLA's analysis of the compiled step.

``time_indexed_ssm`` gets one row per ``--ssm-form`` x ``--ssm-scan``; ``--seq`` takes several
lengths (every family at each; ratios within one length). Where a row fails (out of
memory, say), the table says so and the run goes on.

    python scripts/bench_families.py                          # reference size
    python scripts/bench_families.py --dim 128 --seq 128 --batch 8 --dtype float32   # CPU
    python scripts/bench_families.py --dtype bfloat16 --seq 512 2048 --ssm-form channel head \
        --ssm-scan associative chunked                       # the SSM's scans, two lengths (GPU)
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from _timing import machine, print_table, renamed_flag, time_steps, write_json
from ode_lm.config import (ADJOINTS, FAMILIES, SOLVERS, SSM_CARRIES, SSM_FORMS, SSM_PRODUCTS, SSM_SCANS,
                           config_from_dict)
from ode_lm.models import count_parameters
from ode_lm.models.accounting import flops_per_token, parameter_counts
from ode_lm.train.steps import build_train_step, init_state

VOCAB = 256  # the byte tokenizer's


def family_config(family: str, args: argparse.Namespace, seq: int, ssm_form: str, ssm_scan: str):
    return config_from_dict({
        "model": {"family": family, "dim": args.dim, "heads": args.heads, "layers": args.depth,
                  "max_positions": seq, "dropout": args.dropout, "attention": args.attention,
                  "ssm_state_size": args.ssm_state_size, "ssm_scan": ssm_scan, "ssm_form": ssm_form,
                  "ssm_chunk": args.ssm_chunk, "ssm_heads": args.ssm_heads, "ssm_carry": args.ssm_carry,
                  "ssm_products": args.ssm_products},
        "ode": {"solver": args.solver, "steps": args.depth, "adjoint": args.adjoint},
        "data": {"seq_len": seq},
        "train": {"batch_size": args.batch, "dtype": args.dtype, "steps": 1000},
    }, source="bench_families")


def time_family(family: str, args: argparse.Namespace, seq: int, ssm_form: str = "channel",
                ssm_scan: str = "auto") -> dict:
    cfg = family_config(family, args, seq, ssm_form, ssm_scan)
    model, _, opt_state = init_state(cfg, VOCAB)  # train.seed = 0
    train_step = build_train_step(cfg)
    rng = np.random.default_rng(0)
    inputs, targets = (jax.device_put(rng.integers(0, VOCAB, (args.batch, seq), dtype=np.int32))
                       for _ in range(2))
    step_args = (model, opt_state, inputs, targets, jax.random.key(1))
    start = time.perf_counter()
    compiled = train_step.compiled(*step_args)  # the trainer's own compiled step, XLA options included
    compile_s = time.perf_counter() - start
    memory = temp_mib(compiled)
    timing = time_steps(lambda: compiled(*step_args), args.repeats, 2, jax.block_until_ready)
    seconds = timing.back_to_back
    flops = flops_per_token(cfg, VOCAB)
    step_flops = flops.per_batch(flops.train_step)
    name = f"{family} ({ssm_form}, {ssm_scan})" if family == "time_indexed_ssm" else family
    return {"family": name, "seq": seq, "parameters": count_parameters(model), "components": parameter_counts(model),
            "ms_per_step": seconds * 1e3, "ms_per_step_synced": timing.synced * 1e3,
            "compile_s": compile_s, "nfe": flops.nfe,
            "model_tflop_per_step": step_flops / 1e12, "achieved_tflops": step_flops / seconds / 1e12,
            "tokens_per_s": args.batch * seq / seconds,
            "temp_mib": memory}


def temp_mib(compiled) -> float | None:
    """The step's temporary buffers by XLA's analysis (None where the backend has none)."""
    try:
        memory = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):
        return None
    return None if memory is None else memory.temp_size_in_bytes / 2**20


def time_row(family: str, args: argparse.Namespace, seq: int, ssm_form: str = "channel",
             ssm_scan: str = "auto") -> dict:
    """``time_family``, or the row's error (say, out of memory) so the other rows still run."""
    try:
        return time_family(family, args, seq, ssm_form, ssm_scan)
    except Exception as error:  # noqa: BLE001 -- one failed row must not lose the run's others
        name = f"{family} ({ssm_form}, {ssm_scan})" if family == "time_indexed_ssm" else family
        return {"family": name, "seq": seq, "error": f"{type(error).__name__}: {str(error)[:300]}"}


def add_ratios(group: list[dict]) -> None:
    """Each row's time over ``standard``'s and ``time_indexed``'s at its length (back to back, and synced)."""
    ok = {r["family"]: r for r in group if "error" not in r}
    for r in ok.values():
        for base in ("standard", "time_indexed"):
            for key, suffix in (("ms_per_step", ""), ("ms_per_step_synced", "_synced")):
                r[f"vs_{base}{suffix}"] = r[key] / ok[base][key] if base in ok else None


def rows(args: argparse.Namespace) -> list[dict]:
    """Every family at every ``--seq``; ``time_indexed_ssm`` once per form and scan."""
    ssm_variants = [(form, scan) for form in args.ssm_form for scan in args.ssm_scan]
    records = []
    for seq in args.seq:
        group = [time_row(family, args, seq, form, scan) for family in args.families
                 for form, scan in (ssm_variants if family == "time_indexed_ssm" else [("channel", "auto")])]
        add_ratios(group)
        records += group
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=6, help="ode.steps, and model.layers of 'standard'")
    ap.add_argument("--seq", type=int, nargs="+", default=[512], help="sequence length(s); each gets every family")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="train.dtype (bfloat16: mixed precision, float32 parameters)")
    ap.add_argument("--solver", default="euler", choices=SOLVERS)
    ap.add_argument("--adjoint", default="checkpoint", choices=ADJOINTS)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--ssm-state-size", type=int, default=64)
    ap.add_argument("--ssm-scan", nargs="+", default=["auto"], choices=SSM_SCANS,
                    help="time_indexed_ssm's scan(s); several give one row each")
    ap.add_argument("--ssm-form", nargs="+", default=["channel"], choices=SSM_FORMS,
                    help="time_indexed_ssm's form(s); one row per form and scan")
    ap.add_argument("--ssm-chunk", type=int, default=64, help="model.ssm_chunk (scan 'chunked')")
    ap.add_argument("--ssm-heads", type=int, default=4, help="model.ssm_heads (form 'head')")
    ap.add_argument("--ssm-carry", default="matmul", choices=SSM_CARRIES, help="model.ssm_carry (form 'head')")
    ap.add_argument("--ssm-products", default="wide", choices=SSM_PRODUCTS, help="model.ssm_products (form 'head')")
    ap.add_argument("--repeats", type=int, default=10, help="timed train steps per family")
    renamed_flag(ap, "--steps", "--repeats")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/families_<platform>.json)")
    args = ap.parse_args()

    info = machine()
    records = rows(args)
    print(f"train step per family: dim={args.dim} heads={args.heads} depth={args.depth} "
          f"batch={args.batch} dtype={args.dtype} {args.solver}/{args.adjoint} dropout={args.dropout}; "
          f"{info['device']} ({info['backend']})")

    def ratio(r, key):
        return "-" if r.get(key) is None else r[key]

    print_table(["family", "seq", "params", "ms/step", "synced ms/step", "x standard (synced)",
                 "x time_indexed (synced)", "temp MiB", "GFLOP/step", "TFLOP/s", "compile s"],
                [[r["family"], r["seq"], r["error"][:60]] + ["-"] * 8 if "error" in r else
                 [r["family"], r["seq"], f"{r['parameters']:,}", r["ms_per_step"], r["ms_per_step_synced"],
                  ratio(r, "vs_standard_synced"), ratio(r, "vs_time_indexed_synced"),
                  "-" if r["temp_mib"] is None else r["temp_mib"],
                  r["model_tflop_per_step"] * 1e3, r["achieved_tflops"], r["compile_s"]] for r in records])
    write_json(args.out or f"docs/results/families_{info['backend']}.json",
               {"benchmark": "families", "machine": info, "args": vars(args), "results": records})


if __name__ == "__main__":
    main()
