"""Training-step speed on a GPU: ours vs a PyTorch + torchdiffeq peer, vs the discrete
baseline, and model FLOPs utilisation (MFU).

For each size (reference: dim 256, 4 heads, 6 Euler steps, seq 512, batch 32; large: dim 1024,
16 heads, 12 steps, seq 1024) one run measures, compile time excluded:

- ours: ode-lm's real jitted train step (forward, backward, AdamW) in bf16 mixed precision;
- peer: the same time-indexed model and step written in PyTorch with torchdiffeq's ``odeint``
  (Euler, same steps), bf16 autocast, fused AdamW, SDPA attention;
- standard: ode-lm's discrete ``standard`` family with as many layers as Euler steps (same
  FLOPs), when that family is available.

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak. Model FLOPs per token use
the PaLM convention: 3 x forward, forward = NFE x (24 d^2 + 4 T d) + 2 d V (matmuls of the
block with MLP ratio 4, attention scores and values over the full context, LM head);
recomputation by checkpointing is not counted.

Steps are timed two ways, on both sides alike. The headline is back to back: ``repeats``
steps queued as a training loop queues them (ode-lm's trainer queues step n + 1 before it
reads step n's loss; PyTorch returns from a step before the GPU has run it), with one
synchronisation at the end. "Synced" waits for every step before queueing the next, so each
step also pays the host's time to dispatch it while the GPU idles.

    python scripts/bench_gpu.py --out docs/results/gpu.json [--markdown table.md]
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import numpy as np

from _timing import StepTime, machine, print_table, time_steps, write_json
from ode_lm.train.steps import TRAIN_STEP_COMPILER_OPTIONS

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "A100": 312.0}

SIZES = {
    "reference": dict(dim=256, heads=4, steps=6, seq=512, batch=32),
    "large": dict(dim=1024, heads=16, steps=12, seq=1024, batch=16),
}
VOCAB = 256


def options_less(option: str) -> dict:
    """ode-lm's XLA options of the train step without ``option`` (XLA's default for it)."""
    return {k: v for k, v in TRAIN_STEP_COMPILER_OPTIONS.items() if k != option}


# Other settings of ours timed with --variants, each applied on top of the run's own
# --adjoint / --attention / --checkpoint-saves (bfloat16 unless the variant says otherwise).
VARIANTS = {"direct": dict(adjoint="direct", checkpoint_saves="states"),  # stores everything
            "states": dict(checkpoint_saves="states"),
            "matmuls": dict(checkpoint_saves="matmuls"),
            "xla_attention": dict(attention="xla"), "float32": dict(dtype="float32"),
            "unrolled": dict(unroll=True),  # ode.unroll: the steps written out, no scan
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


def train_flops_per_token(dim: int, seq: int, nfe: int, vocab: int = VOCAB) -> float:
    forward = nfe * (24 * dim * dim + 4 * seq * dim) + 2 * dim * vocab
    return 3.0 * forward


def make_train_step(size: dict, family: str, adjoint: str = "checkpoint", attention: str = "auto",
                    dtype: str = "bfloat16", checkpoint_saves: str = "states",
                    compiler_options: dict | None = None, unroll: bool = False):
    """ode-lm's real jitted train step (forward, backward, AdamW) on random tokens, as a
    zero-argument callable that returns the loss."""
    from ode_lm.config import config_from_dict
    from ode_lm.train.precision import compute_dtype
    from ode_lm.train.steps import TrainStep
    from ode_lm.train.trainer import init_state

    model_cfg = {"family": family, "dim": size["dim"], "heads": size["heads"], "layers": size["steps"],
                 "max_positions": size["seq"], "dropout": 0.0, "attention": attention}
    cfg = config_from_dict({"model": model_cfg,
                            "ode": {"solver": "euler", "steps": size["steps"], "adjoint": adjoint,
                                    "checkpoint_saves": checkpoint_saves, "unroll": unroll},
                            "data": {"seq_len": size["seq"]},
                            "train": {"batch_size": size["batch"], "dtype": dtype}})
    model, optimizer, opt_state = init_state(cfg, VOCAB)
    step_fn = TrainStep(optimizer, cfg.ode, compute_dtype(cfg), compiler_options)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.integers(0, VOCAB, (size["batch"], size["seq"]), dtype=np.int32))
    y = jax.device_put(rng.integers(0, VOCAB, (size["batch"], size["seq"]), dtype=np.int32))
    state = {"model": model, "opt": opt_state}
    key = jax.random.key(0)

    def step():
        state["model"], state["opt"], metrics = step_fn(state["model"], state["opt"], x, y, key)
        return metrics["loss"]

    step.traces = lambda: step_fn.traces
    step.hlo = lambda: step_fn.compiled(model, opt_state, x, y, key).as_text()
    return step


def ours(size: dict, family: str, repeats: int, adjoint: str = "checkpoint", attention: str = "auto",
         dtype: str = "bfloat16", checkpoint_saves: str = "states", compiler_options: dict | None = None,
         unroll: bool = False) -> StepTime:
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


def peer(size: dict, repeats: int) -> StepTime:
    """The same time-indexed model and training step in PyTorch + torchdiffeq."""
    import math

    import torch
    import torch.nn.functional as F
    from torchdiffeq import odeint

    d, heads, steps, seq, batch = (size[k] for k in ("dim", "heads", "steps", "seq", "batch"))
    dev = torch.device("cuda")
    temb, hidden = 32, 64
    gate_sizes = [3 * d, d, 4 * d, d]

    class TimeIndexed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(VOCAB, d)
            self.pos = torch.nn.Parameter(0.02 * torch.randn(seq, d))
            self.ln_attn, self.ln_mlp, self.ln_f = (torch.nn.LayerNorm(d) for _ in range(3))
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.mod = torch.nn.Sequential(torch.nn.Linear(temb, hidden), torch.nn.SiLU(),
                                           torch.nn.Linear(hidden, sum(gate_sizes)))
            freqs = 100.0 ** (torch.arange(temb // 2) / max(temb // 2 - 1, 1))
            self.register_buffer("freqs", freqs)

        def field(self, t, x):
            angles = t * self.freqs
            g_qkv, g_proj, g_fc1, g_fc2 = torch.sigmoid(
                self.mod(torch.cat([angles.sin(), angles.cos()]))).split(gate_sizes)
            b, n, _ = x.shape
            q, k, v = (F.linear(self.ln_attn(x), self.qkv.weight) * g_qkv + self.qkv.bias).split(d, -1)
            shape = (b, n, heads, d // heads)
            a = F.scaled_dot_product_attention(*(z.view(shape).transpose(1, 2) for z in (q, k, v)),
                                               is_causal=True).transpose(1, 2).reshape(b, n, d)
            a = F.linear(a, self.proj.weight) * g_proj + self.proj.bias
            h = F.gelu(F.linear(self.ln_mlp(x), self.fc1.weight) * g_fc1 + self.fc1.bias, approximate="tanh")
            m = F.linear(h, self.fc2.weight) * g_fc2 + self.fc2.bias
            return (a + m).to(x.dtype)

        def forward(self, tokens):
            x0 = self.tok(tokens) + self.pos[: tokens.shape[1]]
            ts = torch.tensor([0.0, 1.0], device=tokens.device)
            x1 = odeint(self.field, x0, ts, method="euler", options={"step_size": 1.0 / steps})[-1]
            return self.ln_f(x1) @ self.tok.weight.T

    torch.manual_seed(0)
    model = TimeIndexed().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, VOCAB, (batch, seq), device=dev)
    y = torch.randint(0, VOCAB, (batch, seq), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    assert math.isfinite(float(step()))
    return time_steps(step, repeats, 3, lambda _: torch.cuda.synchronize())


def machine_versions(info: dict) -> dict:
    """``info`` with the peer's torch, CUDA and torchdiffeq versions where installed."""
    versions = dict(info)
    try:
        import torch
        import torchdiffeq
        versions.update(torch=torch.__version__, cuda=torch.version.cuda, torchdiffeq=torchdiffeq.__version__)
    except ImportError:
        pass
    return versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch + torchdiffeq peer")
    ap.add_argument("--no-standard", action="store_true", help="skip the discrete baseline")
    ap.add_argument("--adjoint", default="checkpoint", help="ode.adjoint of ours")
    ap.add_argument("--checkpoint-saves", default="states", help="ode.checkpoint_saves of ours")
    ap.add_argument("--attention", default="auto", help="model.attention of ours")
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                    help="also time ours under these other settings (no names: all)")
    ap.add_argument("--out", default="docs/results/gpu.json")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    args = ap.parse_args()
    variant_names = list(VARIANTS) if args.variants == [] else args.variants or []

    from ode_lm.config import FAMILIES

    info = machine()
    versions = machine_versions(info)
    peak = peak_tflops(info["device"], args.peak_tflops)
    rows, records = [], []
    for name in args.sizes:
        size = SIZES[name]
        tokens = size["batch"] * size["seq"]
        flops = train_flops_per_token(size["dim"], size["seq"], size["steps"]) * tokens
        t_ours = ours(size, "time_indexed", args.repeats, args.adjoint, args.attention,
                      checkpoint_saves=args.checkpoint_saves)
        t_std = (ours(size, "standard", args.repeats, args.adjoint, args.attention)
                 if "standard" in FAMILIES and not args.no_standard else None)
        variants = []
        for variant_name in variant_names:
            variant = VARIANTS[variant_name]  # on top of this run's settings of ours
            settings = dict(adjoint=args.adjoint, attention=args.attention,
                            checkpoint_saves=args.checkpoint_saves) | variant
            t = ours(size, "time_indexed", args.repeats, **settings)
            variants.append({"name": variant_name, **variant, "ms": t.back_to_back * 1e3,
                             "ms_synced": t.synced * 1e3, "first_call_s": t.first_call,
                             "mfu": flops / t.back_to_back / (peak * 1e12) if peak else None})
            print(f"variant {name}: {variant}: {t.back_to_back * 1e3:.2f} ms/step "
                  f"({t.synced * 1e3:.2f} synced; first call with compilation {t.first_call:.1f} s)")
        t_peer = None if args.no_peer else peer(size, args.repeats)
        if t_peer is not None:
            import torch
            gc.collect()
            torch.cuda.empty_cache()  # give the peer's cached blocks back before ours runs again
        ms = t_ours.back_to_back * 1e3
        mfu = flops / t_ours.back_to_back / (peak * 1e12) if peak else None
        rec = {"size": name, **size, "tokens_per_step": tokens, "model_tflops_per_step": flops / 1e12,
               "ours_ms": ms, "ours_tokens_per_s": tokens / t_ours.back_to_back, "ours_mfu": mfu,
               "ours_ms_synced": t_ours.synced * 1e3, "ours_first_call_s": t_ours.first_call,
               "peer_ms": t_peer and t_peer.back_to_back * 1e3,
               "peer_ms_synced": t_peer and t_peer.synced * 1e3,
               "speedup_vs_peer": t_peer and t_peer.back_to_back / t_ours.back_to_back,
               "speedup_vs_peer_synced": t_peer and t_peer.synced / t_ours.synced,
               "standard_ms": t_std and t_std.back_to_back * 1e3,
               "standard_ms_synced": t_std and t_std.synced * 1e3,
               "standard_first_call_s": t_std and t_std.first_call,
               "ode_overhead_vs_standard": t_std and t_ours.back_to_back / t_std.back_to_back - 1,
               "variants": variants}
        records.append(rec)
        # Written after every size: a run cut short keeps what it measured.
        write_json(args.out, {"benchmark": "gpu_train_step", "machine": versions,
                              "peak_bf16_tflops": peak, "results": records})
        rows.append([name, f"{ms:.2f}", f"{rec['ours_tokens_per_s']:,.0f}",
                     "n/a" if mfu is None else f"{100 * mfu:.1f}%",
                     "n/a" if t_peer is None else f"{rec['peer_ms']:.2f}",
                     "n/a" if t_peer is None else f"{rec['speedup_vs_peer']:.2f}x",
                     "n/a" if t_std is None else f"{rec['standard_ms']:.2f}",
                     "n/a" if t_std is None else f"{100 * rec['ode_overhead_vs_standard']:+.1f}%",
                     f"{rec['ours_ms_synced']:.2f}" + ("" if t_peer is None else
                                                       f" / {rec['peer_ms_synced']:.2f}"
                                                       f" = {rec['speedup_vs_peer_synced']:.2f}x")])
    headers = ["size", "ours ms/step", "ours tokens/s", "MFU (bf16)", "torchdiffeq ms/step",
               "speed-up", "standard ms/step", "ODE overhead", "each step synced: ours / peer ms"]
    print(f"{info['device']}, jax {info['jax']}, bf16 peak {peak} TFLOP/s")
    print_table(headers, rows)
    if args.markdown:
        lines = [f"GPU: {info['device']}; jax {info['jax']}"
                 + (f"; torch {versions.get('torch')} (CUDA {versions.get('cuda')}), torchdiffeq "
                    f"{versions.get('torchdiffeq')}" if "torch" in versions else "")
                 + f"; bf16 peak {peak} TFLOP/s.", "",
                 "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        from pathlib import Path
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
