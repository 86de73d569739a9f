"""The PyTorch peers of ``bench_gpu.py``: the models and training steps a PyTorch user runs.

Every peer trains with the same step as ode-lm's: bf16 autocast, float32 weights and
cross-entropy, global gradient-norm clipping at 1, fused AdamW, SDPA attention, random tokens.

- ``torchdiffeq``: the time-indexed model (ode-lm's ``time_indexed`` family: one block whose
  dense layers are gated per feature by an MLP of sinusoidal features of ``t``) solved by
  torchdiffeq's ``odeint`` (Euler), eager.
- ``torchdiffeq_compiled``: the same under ``torch.compile`` (torchdiffeq's grid set-up calls
  ``.item()``, a graph break, so the compiled program is split there).
- ``euler_compiled``: the same model with the Euler loop written by hand
  (``x <- x + h f(t_n, x)``, the steps unrolled) under ``torch.compile``: one graph.
- ``gpt2_compiled``: GPT-2 (sequential pre-norm blocks ``x += attn(LN1 x); x += mlp(LN2 x)``,
  learned positions, tied head, GELU tanh, biases, dropout 0, residual projections initialised
  at 0.02 / sqrt(2 layers)) under ``torch.compile``, as nanoGPT trains it.

``torch.compile`` wraps the forward pass and the loss; the optimizer runs eagerly (fused AdamW
is already one kernel per group of tensors).
"""

from __future__ import annotations

import gc
import math
import time

from _timing import StepTime, time_steps

ODE_PEERS = ("torchdiffeq", "torchdiffeq_compiled", "euler_compiled")
COMPILED = ("torchdiffeq_compiled", "euler_compiled", "gpt2_compiled")
PEERS = ODE_PEERS + ("gpt2_compiled",)


def build(name: str, size: dict, device):
    from _torch_models import GPT2, TimeIndexed  # needs torch

    d, heads, steps, seq, vocab = (size[k] for k in ("dim", "heads", "steps", "seq", "vocab"))
    if name == "gpt2_compiled":
        return GPT2(vocab, d, heads, steps, seq).to(device)
    return TimeIndexed(vocab, d, heads, steps, seq, "euler" if name == "euler_compiled" else "torchdiffeq").to(device)


def peer_step(name: str, size: dict):
    """One peer's training step on random tokens, as a zero-argument callable returning the
    loss, and the device synchronisation to time it with."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build(name, size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    vocab = size["vocab"]
    x = torch.randint(0, vocab, (size["batch"], size["seq"]), device=device)
    y = torch.randint(0, vocab, (size["batch"], size["seq"]), device=device)

    def loss_fn(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))

    loss_of = torch.compile(loss_fn) if name in COMPILED else loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step, sync


def time_peer(name: str, size: dict, repeats: int) -> StepTime:
    """One peer's training step, timed like ours; ``first_call`` includes ``torch.compile``."""
    step, sync = peer_step(name, size)
    start = time.perf_counter()
    assert math.isfinite(float(step().detach()))
    first_call = time.perf_counter() - start
    return time_steps(step, repeats, 3, lambda _: sync())._replace(first_call=first_call)


def release() -> None:
    """Give a finished peer's cached GPU blocks back before the next side runs."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
