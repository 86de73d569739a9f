"""Training-step speed on a GPU: ours vs PyTorch peers (eager and ``torch.compile``), vs the
discrete baseline, and model FLOPs utilisation (MFU).

For each size one run measures, compile time excluded (and reported on its own):

- ours: ode-lm's real jitted train step (forward, backward, AdamW) in bf16 mixed precision,
  family ``time_indexed`` (Euler);
- standard: ode-lm's discrete ``standard`` family (GPT-2) with as many layers as Euler steps
  (same FLOPs up to the modulation MLP);
- the PyTorch peers (``_torch_peers.py``; same model, same step: bf16 autocast, fused AdamW,
  SDPA): at the ODE sizes the time-indexed model under torchdiffeq eager, torchdiffeq +
  ``torch.compile`` and a hand-written Euler loop + ``torch.compile``; at ``gpt2_small``
  (124M parameters, vocab 50304) a PyTorch GPT-2 under ``torch.compile`` against our ``standard``.

``speedup_vs_compiled_peer`` = the fastest compiled peer's step time / ours (``time_indexed``
at the ODE sizes, ``standard`` at ``gpt2_small``: like for like). The eager torchdiffeq peer
stays a column (``speedup_vs_peer``) so older results read the same.

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak, with the FLOPs of
``ode_lm.models.accounting.flops_per_token`` (what ``ode-lm info`` prints: 3 x forward,
matmuls only, attention over the full context; recomputation by checkpointing not counted).

Steps are timed two ways, on both sides alike. The headline is back to back: ``repeats``
steps queued as a training loop queues them (ode-lm's trainer queues step n + 1 before it
reads step n's loss; PyTorch returns from a step before the GPU has run it), with one
synchronisation at the end. "Synced" waits for every step before queueing the next, so each
step also pays the host's time to dispatch it while the GPU idles. ``first_call_s`` is the
first step with its tracing and compilation (``torch.compile``'s, for the peers).

    python scripts/bench_gpu.py --out docs/results/gpu.json [--markdown table.md]
    python scripts/bench_gpu.py --smoke --out /tmp/gpu.json   # every code path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import time

# JAX and the PyTorch peers share the GPU in one process: JAX reserves half of its memory
# (instead of 75%), leaving the other half to PyTorch's allocator (GPT-2 small's vocab-50304
# logits and their gradients alone take ~10 GB there). Set it yourself to override.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _timing import StepTime, machine, print_table, time_steps, write_json
from _torch_peers import COMPILED, ODE_PEERS, release, time_peer
from ode_lm.train.steps import TRAIN_STEP_COMPILER_OPTIONS

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "A100": 312.0}

VOCAB = 256  # the byte vocabulary of the ODE sizes
SIZES = {
    "reference": dict(dim=256, heads=4, steps=6, seq=512, batch=32, vocab=VOCAB),
    "large": dict(dim=1024, heads=16, steps=12, seq=1024, batch=16, vocab=VOCAB),
    # GPT-2 small: 124M parameters (12 layers; for ours time_indexed, 12 Euler steps).
    "gpt2_small": dict(dim=768, heads=12, steps=12, seq=1024, batch=16, vocab=50304),
}
# The peers of each size, and which of ours the compiled peers are compared with.
SIZE_PEERS = {"reference": ODE_PEERS, "large": ODE_PEERS, "gpt2_small": ("gpt2_compiled",)}
COMPARED = {"reference": "time_indexed", "large": "time_indexed", "gpt2_small": "standard"}
# --smoke: every size shrunk to run on a CPU in seconds (checks the code paths, not speed).
SMOKE = dict(dim=64, heads=2, steps=2, seq=32, batch=2)


def options_less(option: str) -> dict:
    """ode-lm's XLA options of the train step without ``option`` (XLA's default for it)."""
    return {k: v for k, v in TRAIN_STEP_COMPILER_OPTIONS.items() if k != option}


# Other settings of ours timed with --variants, each applied on top of the run's own
# --adjoint / --attention / --checkpoint-saves (bfloat16 unless the variant says otherwise).
VARIANTS = {"direct": dict(adjoint="direct", checkpoint_saves="states"),  # stores everything
            "states": dict(checkpoint_saves="states"),
            "matmuls": dict(checkpoint_saves="matmuls"),
            "xla_attention": dict(attention="xla"), "float32": dict(dtype="float32"),
            "unrolled": dict(unroll="unroll"),  # ode.unroll: the steps written out, no scan
            "scanned": dict(unroll="scan"),  # one compiled step scanned (the default before "auto")
            # XLA's own defaults, dot merger included (ode-lm's train step turns the merger
            # off: steps.py). No options at all: passing the merger's documented default
            # (32 MB) compiled the same products as turning it off (jax 0.11.2, H200).
            "xla_defaults": dict(compiler_options={}),
            # ode-lm's options less one: the scan's residual stacks zero-filled again; CUDA
            # graphs run as a chain of their commands (XLA's default) instead of by dependency.
            "stack_zero_fill": dict(compiler_options=options_less(
                "xla_gpu_enable_dus_accumulator_zero_init_elimination")),
            "graph_chain": dict(compiler_options=options_less("xla_gpu_command_buffer_scheduling_mode"))}


def peak_tflops(kind: str, override: float | None) -> float | None:
    if override:
        return override
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in kind:
            return peak
    return None


def size_config(size: dict, family: str, adjoint: str = "checkpoint", attention: str = "auto",
                dtype: str = "bfloat16", checkpoint_saves: str = "auto", unroll: str = "auto"):
    """The ode-lm config of one benchmark size (dropout 0; ``standard`` has ``steps`` layers)."""
    from ode_lm.config import config_from_dict

    model_cfg = {"family": family, "dim": size["dim"], "heads": size["heads"], "layers": size["steps"],
                 "max_positions": size["seq"], "dropout": 0.0, "attention": attention}
    return config_from_dict({"model": model_cfg,
                             "ode": {"solver": "euler", "steps": size["steps"], "adjoint": adjoint,
                                     "checkpoint_saves": checkpoint_saves, "unroll": unroll},
                             "data": {"seq_len": size["seq"]},
                             "train": {"batch_size": size["batch"], "dtype": dtype}})


def train_flops_per_step(size: dict, family: str) -> float:
    """Model FLOPs of one training step, by ode-lm's accounting (``ode-lm info``)."""
    from ode_lm.models.accounting import flops_per_token

    count = flops_per_token(size_config(size, family), size["vocab"])
    return count.per_batch(count.train_step)


def make_train_step(size: dict, family: str, adjoint: str = "checkpoint", attention: str = "auto",
                    dtype: str = "bfloat16", checkpoint_saves: str = "auto",
                    compiler_options: dict | None = None, unroll: str = "auto"):
    """ode-lm's real jitted train step (forward, backward, AdamW) on random tokens, as a
    zero-argument callable that returns the loss."""
    from ode_lm.train.steps import build_train_step, init_state

    cfg = size_config(size, family, adjoint, attention, dtype, checkpoint_saves, unroll)
    vocab = size.get("vocab", VOCAB)
    model, _, opt_state = init_state(cfg, vocab)
    step_fn = build_train_step(cfg, compiler_options)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.integers(0, vocab, (size["batch"], size["seq"]), dtype=np.int32))
    y = jax.device_put(rng.integers(0, vocab, (size["batch"], size["seq"]), dtype=np.int32))
    state = {"model": model, "opt": opt_state}
    key = jax.random.key(0)

    def step():
        state["model"], state["opt"], metrics = step_fn(state["model"], state["opt"], x, y, key)
        return metrics["loss"]

    step.traces = lambda: step_fn.traces
    step.hlo = lambda: step_fn.compiled(model, opt_state, x, y, key).as_text()
    return step


def ours(size: dict, family: str, repeats: int, adjoint: str = "checkpoint", attention: str = "auto",
         dtype: str = "bfloat16", checkpoint_saves: str = "auto", compiler_options: dict | None = None,
         unroll: str = "auto") -> StepTime:
    step = make_train_step(size, family, adjoint, attention, dtype, checkpoint_saves, compiler_options, unroll)
    start = time.perf_counter()
    jax.block_until_ready(step())
    first_call = time.perf_counter() - start
    timing = time_steps(step, repeats, 3, jax.block_until_ready)._replace(first_call=first_call)
    assert step.traces() == 1, "the train step must compile once"
    del step  # each configuration starts from freed device memory and empty caches
    gc.collect()
    jax.clear_caches()
    return timing


def machine_versions(info: dict) -> dict:
    """``info`` with the peers' torch, CUDA and torchdiffeq versions where installed."""
    versions = dict(info)
    try:
        import torch
        versions.update(torch=torch.__version__, cuda=torch.version.cuda)
        import torchdiffeq
        versions.update(torchdiffeq=torchdiffeq.__version__)
    except ImportError:
        pass
    return versions


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    ap.add_argument("--no-peer", action="store_true", help="skip every PyTorch peer")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers "
                    "(torch.compile on a CPU needs a C compiler and takes minutes)")
    ap.add_argument("--no-standard", action="store_true", help="skip the discrete baseline")
    ap.add_argument("--adjoint", default="checkpoint", help="ode.adjoint of ours")
    ap.add_argument("--checkpoint-saves", default="auto", help="ode.checkpoint_saves of ours (default: the "
                    "config default, auto)")
    ap.add_argument("--attention", default="auto", help="model.attention of ours")
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                    help="also time ours under these other settings (no names: all)")
    ap.add_argument("--smoke", action="store_true", help=f"shrink every size to {SMOKE} (CPU check)")
    ap.add_argument("--out", default="docs/results/gpu.json")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    return ap.parse_args()


def _ms(t: StepTime | None, field: str = "back_to_back") -> float | None:
    return None if t is None else getattr(t, field) * 1e3


def time_variants(size: dict, name: str, args, flops: float, peak: float | None) -> list[dict]:
    variants = []
    for variant_name in list(VARIANTS) if args.variants == [] else args.variants or []:
        variant = VARIANTS[variant_name]  # on top of this run's settings of ours
        settings = dict(adjoint=args.adjoint, attention=args.attention,
                        checkpoint_saves=args.checkpoint_saves) | variant
        t = ours(size, "time_indexed", args.repeats, **settings)
        variants.append({"name": variant_name, **variant, "ms": _ms(t), "ms_synced": _ms(t, "synced"),
                         "first_call_s": t.first_call,
                         "mfu": flops / t.back_to_back / (peak * 1e12) if peak else None})
        print(f"variant {name}: {variant}: {t.back_to_back * 1e3:.2f} ms/step "
              f"({t.synced * 1e3:.2f} synced; first call with compilation {t.first_call:.1f} s)")
    return variants


def time_peers(name: str, size: dict, args) -> dict[str, StepTime]:
    if args.no_peer:
        return {}
    peers = [p for p in SIZE_PEERS[name] if not (args.no_compile and p in COMPILED)]
    times = {}
    for p in peers:
        times[p] = time_peer(p, size, args.repeats)
        release()
        print(f"peer {name}: {p}: {times[p].back_to_back * 1e3:.2f} ms/step ({times[p].synced * 1e3:.2f} "
              f"synced; first call with compilation {times[p].first_call:.1f} s)")
    return times


def record(name: str, size: dict, t_ours: StepTime, t_std: StepTime | None, peers: dict[str, StepTime],
           variants: list[dict], peak: float | None, saves: str) -> dict:
    """One size's JSON record (the keys of earlier results kept, peers added)."""
    from ode_lm.ode.sensitivities import checkpoint_saves, unrolls

    tokens = size["batch"] * size["seq"]
    flops = {f: train_flops_per_step(size, f) for f in ("time_indexed", "standard")}

    def mfu(t, family="time_indexed"):
        return flops[family] / t.back_to_back / (peak * 1e12) if peak and t else None
    compared = {"time_indexed": t_ours, "standard": t_std}[COMPARED[name]]
    compiled = {p: t for p, t in peers.items() if p in COMPILED}
    fastest = min(compiled, key=lambda p: compiled[p].back_to_back) if compiled else None
    eager = peers.get("torchdiffeq")
    peer_family = "standard" if name == "gpt2_small" else "time_indexed"
    return {"size": name, **size, "tokens_per_step": tokens, "model_tflops_per_step": flops["time_indexed"] / 1e12,
            "standard_model_tflops_per_step": flops["standard"] / 1e12,
            "ours_ms": _ms(t_ours), "ours_tokens_per_s": tokens / t_ours.back_to_back, "ours_mfu": mfu(t_ours),
            "ours_ms_synced": _ms(t_ours, "synced"), "ours_first_call_s": t_ours.first_call,
            "ours_unrolled": unrolls(size_config(size, "time_indexed").ode),  # ode.unroll = "auto"'s pick
            "ours_checkpoint_saves": checkpoint_saves(size_config(size, "time_indexed", checkpoint_saves=saves).ode),
            "peer_ms": _ms(eager), "peer_ms_synced": _ms(eager, "synced"),
            "speedup_vs_peer": eager and eager.back_to_back / t_ours.back_to_back,
            "speedup_vs_peer_synced": eager and eager.synced / t_ours.synced,
            "peers": {p: {"ms": _ms(t), "ms_synced": _ms(t, "synced"), "first_call_s": t.first_call,
                          "mfu": mfu(t, peer_family), "compiled": p in COMPILED} for p, t in peers.items()},
            "compiled_peer": fastest, "compared_with_compiled_peer": COMPARED[name],
            "speedup_vs_compiled_peer": (compiled[fastest].back_to_back / compared.back_to_back
                                         if fastest and compared else None),
            "speedup_vs_compiled_peer_synced": (compiled[fastest].synced / compared.synced
                                                if fastest and compared else None),
            "standard_ms": _ms(t_std), "standard_ms_synced": _ms(t_std, "synced"),
            "standard_first_call_s": t_std and t_std.first_call, "standard_mfu": mfu(t_std, "standard"),
            "ode_overhead_vs_standard": t_std and t_ours.back_to_back / t_std.back_to_back - 1,
            "variants": variants}


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


HEADERS = ["size", "ours ms/step", "ours tokens/s", "MFU (bf16)", "standard ms/step", "ODE overhead",
           "torchdiffeq ms/step", "speed-up", "torchdiffeq+compile ms", "Euler+compile ms", "GPT-2+compile ms",
           "vs fastest compiled", "compile s: ours / standard / peers", "synced: ours / standard ms"]


def table_row(rec: dict) -> list[str]:
    peers = rec["peers"]

    def peer_ms(p):
        return _fmt(peers[p]["ms"], ".2f") if p in peers else "n/a"
    compile_s = " / ".join([_fmt(rec["ours_first_call_s"], ".1f"), _fmt(rec["standard_first_call_s"], ".1f")]
                           + [_fmt(v["first_call_s"], ".1f") for v in peers.values()])
    vs = rec["speedup_vs_compiled_peer"]
    return [rec["size"], _fmt(rec["ours_ms"], ".2f"), _fmt(rec["ours_tokens_per_s"], ",.0f"),
            _fmt(rec["ours_mfu"] and 100 * rec["ours_mfu"], ".1f", "%"), _fmt(rec["standard_ms"], ".2f"),
            _fmt(rec["ode_overhead_vs_standard"] and 100 * rec["ode_overhead_vs_standard"], "+.1f", "%"),
            peer_ms("torchdiffeq"), _fmt(rec["speedup_vs_peer"], ".2f", "x"), peer_ms("torchdiffeq_compiled"),
            peer_ms("euler_compiled"), peer_ms("gpt2_compiled"),
            "n/a" if vs is None else f"{vs:.2f}x ({rec['compared_with_compiled_peer']} vs {rec['compiled_peer']})",
            compile_s, f"{rec['ours_ms_synced']:.2f} / {_fmt(rec['standard_ms_synced'], '.2f')}"]


def main() -> None:
    args = parse_args()
    from ode_lm.config import FAMILIES

    info = machine()
    versions = machine_versions(info)
    peak = peak_tflops(info["device"], args.peak_tflops)
    records = []
    for name in args.sizes:
        size = SIZES[name] | (SMOKE if args.smoke else {})
        t_ours = ours(size, "time_indexed", args.repeats, args.adjoint, args.attention,
                      checkpoint_saves=args.checkpoint_saves)
        t_std = (ours(size, "standard", args.repeats, args.adjoint, args.attention)
                 if "standard" in FAMILIES and not args.no_standard else None)
        variants = time_variants(size, name, args, train_flops_per_step(size, "time_indexed"), peak)
        peers = time_peers(name, size, args)
        records.append(record(name, size, t_ours, t_std, peers, variants, peak, args.checkpoint_saves))
        # Written after every size: a run cut short keeps what it measured.
        write_json(args.out, {"benchmark": "gpu_train_step", "machine": versions, "smoke": args.smoke,
                              "peak_bf16_tflops": peak, "results": records})
    rows = [table_row(r) for r in records]
    print(f"{info['device']}, jax {info['jax']}, torch {versions.get('torch')}, bf16 peak {peak} TFLOP/s")
    print_table(HEADERS, rows)
    if args.markdown:
        lines = [f"GPU: {info['device']}; jax {info['jax']}"
                 + (f"; torch {versions.get('torch')} (CUDA {versions.get('cuda')}), torchdiffeq "
                    f"{versions.get('torchdiffeq')}" if "torch" in versions else "")
                 + f"; bf16 peak {peak} TFLOP/s.", "",
                 "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        from pathlib import Path
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
