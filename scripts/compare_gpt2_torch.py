"""Our ``standard`` family against a GPT-2 written here in PyTorch: same weights, same batches.

Both sides start from the same weights (the PyTorch model is loaded from a fresh ode-lm
model's arrays), read the same batches from ode-lm's ``BatchSampler`` and run the same
optimizer: global-norm clipping, AdamW with decoupled weight decay on parameters of two or
more dimensions only, the learning rate of ``optax.warmup_cosine_decay_schedule`` as
ode-lm's ``learning_rate_schedule`` sets it up (written out below and checked against
optax at every step). ode-lm trains with its own ``TrainStep`` (dropout key
``fold_in(key(seed + 1), step)``, as the trainer draws it); PyTorch with bf16 autocast
under ``torch.compile`` and fused AdamW.

- Phase 1, dropout 0: the per-step training losses of both (max and mean |difference|),
  next to the yardstick of bf16 noise: ode-lm's own bf16 curve against its float32 one.
- Phase 2, dropout 0.2: validation loss every ``--eval-every`` steps on the same held-out
  batches (eval mode, dropout off); best and final validation loss of both.

The PyTorch model mirrors the form ode-lm runs: GPT-2's sequential block
``x += attn(LN1(x)); x += mlp(LN2(x))`` (``--set model.block=parallel`` for the parallel
one); dropout on the embeddings, the attention probabilities and each residual branch. The
form that ran is printed and recorded.

Times are synchronised per step (the loss is read back each step) and leave out each
side's first ``WARMUP_STEPS`` steps, which compile. Needs ``torch`` (extra ``torch``).

Defaults: the char-level configuration 6 layers, 6 heads, dim 384, seq 256, batch 64,
1 MB of the embedded corpus, lr 1e-3 (100 warmup steps) cosine to 1e-4, Adam beta2 0.99,
weight decay 0.1; 300 steps, then 5000 steps at dropout 0.2 with 20 validation batches
every 250 steps. ``--set section.key=value`` passes further ode-lm overrides to both sides
(e.g. ``model.bias=false``, ``model.block=parallel``).

    python scripts/compare_gpt2_torch.py --out docs/results/gpt2_parity_gpu.json   # GPU
    python scripts/compare_gpt2_torch.py --layers 2 --heads 2 --dim 64 --seq 64 --batch 8 \\
        --max-bytes 200000 --parity-steps 30 --dropout-steps 40 --eval-every 20 --eval-batches 4 \\
        --warmup 5 --no-compile --out /tmp/gpt2_parity_cpu.json       # CPU check, ~2 min
"""

from __future__ import annotations

import os

# JAX takes 75% of the GPU by default; leave room for PyTorch in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _timing import machine, print_table, write_json  # noqa: E402
from ode_lm.config import Config, ODEConfig, config_from_dict, parse_override  # noqa: E402
from ode_lm.data import BatchSampler, load_corpus  # noqa: E402
from ode_lm.errors import ConfigError, UserError  # noqa: E402
from ode_lm.models import count_parameters  # noqa: E402
from ode_lm.models.accounting import flops_per_token  # noqa: E402
from ode_lm.train.optim import learning_rate_schedule  # noqa: E402
from ode_lm.train.evaluation import evaluate  # noqa: E402
from ode_lm.train.steps import build_eval_step, build_train_step, init_state  # noqa: E402

DROPOUT_KNOBS = ("dropout", "embd_dropout", "attn_dropout", "resid_dropout")
WARMUP_STEPS = 3  # per side, left out of ms/step: compilation (and torch.compile's recompiles)


# ---------------------------------------------------------------- configuration

def ode_lm_config(args: argparse.Namespace, dropout: float, steps: int) -> Config:
    """The run both sides follow. Dropout knobs are set one by one where they exist."""
    model = {"family": "standard", "dim": args.dim, "heads": args.heads, "layers": args.layers,
             "max_positions": args.seq, "tie_embeddings": True, "block": "sequential",
             **{k: dropout for k in DROPOUT_KNOBS}}
    raw = {"model": model,
           "data": {"tokenizer": "char", "max_bytes": args.max_bytes, "seq_len": args.seq},
           "train": {"steps": steps, "batch_size": args.batch, "seed": args.seed, "dtype": args.dtype},
           "optim": {"lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "warmup_steps": args.warmup,
                     "b1": 0.9, "b2": args.b2, "weight_decay": args.weight_decay, "grad_clip": 1.0}}
    for item in args.set:
        section, name, value = parse_override(item)
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, "compare_gpt2_torch")


def form_of(cfg: Config) -> dict:
    """What ode-lm runs: block form, bias, and the three dropout rates."""
    m = cfg.model
    return {"block": "sequential" if m.sequential else "parallel", "bias": m.bias,
            "embd_dropout": m.embd_dropout, "attn_dropout": m.attn_dropout, "resid_dropout": m.resid_dropout}


def describe_form(form: dict) -> str:
    block = "sequential (GPT-2)" if form["block"] == "sequential" else "parallel (not GPT-2)"
    return (f"block {block}, bias {str(form['bias']).lower()}, dropout embd {form['embd_dropout']} / "
            f"attn {form['attn_dropout']} / resid {form['resid_dropout']}")


def lr_at(cfg: Config, step: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, W, D, lr * min_lr_ratio) with ode-lm's W, D."""
    o, total = cfg.optim, cfg.train.steps
    warmup = min(o.warmup_steps, max(total - 1, 0))
    if step < warmup:
        return o.lr * step / warmup
    decay = max(total, warmup + 1) - warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
    return o.lr * ((1 - o.min_lr_ratio) * cosine + o.min_lr_ratio)


def check_schedule(cfg: Config) -> float:
    """Largest relative gap between ``lr_at`` and ode-lm's optax schedule over the run."""
    steps = np.arange(cfg.train.steps)
    theirs = np.asarray(jax.vmap(learning_rate_schedule(cfg.optim, cfg.train.steps))(steps))
    ours = np.array([lr_at(cfg, int(s)) for s in steps])
    gap = float(np.max(np.abs(theirs - ours)) / cfg.optim.lr)
    if gap > 1e-6:
        raise SystemExit(f"lr schedule differs from optax's by {gap:.2e} of the peak lr")
    return gap


# ---------------------------------------------------------------- the PyTorch GPT-2

class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool, attn_dropout: float, resid_dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.heads, self.attn_dropout = heads, attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, resid_dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(resid_dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, form: dict):
        super().__init__()
        self.parallel = form["block"] == "parallel"
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5, bias=form["bias"])
        self.attn = CausalSelfAttention(dim, heads, form["bias"], form["attn_dropout"], form["resid_dropout"])
        self.ln_2 = nn.LayerNorm(dim, eps=1e-5, bias=form["bias"])
        self.mlp = MLP(dim, mlp_ratio * dim, form["bias"], form["resid_dropout"])

    def forward(self, x):
        if self.parallel:
            return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 with a tied head: ``logits = LN_f(x_L) wte^T``; ``forward`` gives the mean loss."""

    def __init__(self, cfg: Config, vocab: int):
        super().__init__()
        m, form = cfg.model, form_of(cfg)
        self.wte = nn.Embedding(vocab, m.dim)
        self.wpe = nn.Embedding(m.max_positions, m.dim)
        self.drop = nn.Dropout(form["embd_dropout"])
        self.h = nn.ModuleList(Block(m.dim, m.heads, m.mlp_ratio, form) for _ in range(m.layers))
        self.ln_f = nn.LayerNorm(m.dim, eps=1e-5, bias=form["bias"])

    def logits(self, idx):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)

    def forward(self, idx, targets):
        logits = self.logits(idx)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def layer_arrays(layer) -> dict:
    """GPT-2 name -> (ode-lm array or None, whether torch stores it transposed)."""
    attn, mlp = layer.attn, layer.mlp
    return {"ln_1.weight": (layer.ln_attn.weight, False), "ln_1.bias": (layer.ln_attn.bias, False),
            "attn.c_attn.weight": (attn.qkv.weight, True), "attn.c_attn.bias": (attn.qkv.bias, False),
            "attn.c_proj.weight": (attn.proj.weight, True), "attn.c_proj.bias": (attn.proj.bias, False),
            "ln_2.weight": (layer.ln_mlp.weight, False), "ln_2.bias": (layer.ln_mlp.bias, False),
            "mlp.c_fc.weight": (mlp.fc1.weight, True), "mlp.c_fc.bias": (mlp.fc1.bias, False),
            "mlp.c_proj.weight": (mlp.fc2.weight, True), "mlp.c_proj.bias": (mlp.fc2.bias, False)}


def load_weights(gpt: GPT, model) -> GPT:
    """Copy an ode-lm ``standard`` model's arrays into ``gpt`` (torch Linear weights are [out, in])."""
    if model.readout.head is not None:
        raise ConfigError("compare_gpt2_torch: [model] tie_embeddings = false is not supported; "
                          "the GPT-2 here ties its head (leave tie_embeddings = true)")
    arrays = {"wte.weight": model.embedding.tokens, "wpe.weight": model.embedding.positions,
              "ln_f.weight": model.readout.norm.weight, "ln_f.bias": model.readout.norm.bias}
    for i, layer in enumerate(model.layers):
        for name, (value, transpose) in layer_arrays(layer).items():
            arrays[f"h.{i}.{name}"] = None if value is None else (value.T if transpose else value)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in arrays.items() if v is not None}
    expected = set(gpt.state_dict())
    if set(state) != expected:
        raise SystemExit(f"weights do not match: only ours {sorted(set(state) - expected)}, "
                         f"only torch's {sorted(expected - set(state))}")
    gpt.load_state_dict(state, strict=True)
    return gpt


# ---------------------------------------------------------------- the two trainers

class OdeLmSide:
    """ode-lm's own compiled train and eval steps, called as ``ode_lm.train.trainer`` calls them."""

    name = "ode-lm"

    def __init__(self, cfg: Config, vocab: int):
        self.model, _, self.opt_state = init_state(cfg, vocab)
        self.train_step, self.eval_step = build_train_step(cfg), build_eval_step(cfg)
        self.base_key = jax.random.key(cfg.train.seed + 1)

    def step(self, step: int, inputs, targets) -> float:
        key = jax.random.fold_in(self.base_key, step)
        self.model, self.opt_state, metrics = self.train_step(self.model, self.opt_state, inputs, targets, key)
        metrics = jax.device_get(metrics)  # one transfer, as the trainer reads them
        if not bool(metrics["finite"]):
            raise SystemExit(f"ode-lm: step {step + 1}: non-finite loss or gradient")
        return float(metrics["loss"])

    def evaluate(self, batches) -> float:
        return evaluate(self.model, self.eval_step, batches.__getitem__, len(batches), 1.0).loss


class TorchSide:
    name = "torch"

    def __init__(self, cfg: Config, gpt: GPT, device: torch.device, compile: bool):
        self.cfg, self.device, self.gpt = cfg, device, gpt.to(device)
        self.autocast = cfg.train.dtype == "bfloat16"
        self.params = list(gpt.parameters())
        o = cfg.optim
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(o.b1, o.b2), eps=o.eps,
                                     fused=device.type == "cuda")
        self.loss = torch.compile(gpt) if compile else gpt

    def _tensors(self, inputs, targets):
        return (torch.from_numpy(np.asarray(a)).to(self.device, torch.long) for a in (inputs, targets))

    def _loss(self, x, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.loss(x, y)

    def step(self, step: int, inputs, targets) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.cfg, step)
        loss = self._loss(*self._tensors(inputs, targets))
        loss.backward()
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # optax.clip_by_global_norm: g unchanged if ||g|| < c, else (g / ||g||) * c
        clip = self.cfg.optim.grad_clip
        torch._foreach_mul_(grads, torch.where(norm < clip, torch.ones_like(norm), clip / norm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value, norm = torch.stack([loss.detach(), norm]).tolist()  # one transfer
        if not (math.isfinite(value) and math.isfinite(norm)):
            raise SystemExit(f"torch: step {step + 1}: non-finite loss or gradient")
        return value

    def evaluate(self, batches) -> float:
        self.gpt.eval()
        with torch.no_grad():
            losses = [self._loss(*self._tensors(x, y)).item() for x, y in batches]
        self.gpt.train()
        return float(np.mean(losses))


def run_side(side, sampler: BatchSampler, steps: int, eval_every: int, val_batches: list) -> dict:
    """Train ``steps`` steps on ``sampler``'s batches; evaluate every ``eval_every`` (0: never)."""
    losses, seconds, evals = [], [], []
    for step in range(steps):
        batch = sampler.train_batch(step)
        start = time.perf_counter()
        losses.append(side.step(step, *batch))  # synchronised: the loss is read back
        seconds.append(time.perf_counter() - start)
        done = step + 1
        if eval_every and (done % eval_every == 0 or done == steps):
            evals.append({"step": done, "val_loss": side.evaluate(val_batches)})
    timed = seconds[WARMUP_STEPS:] or seconds
    return {"losses": losses, "evals": evals, "first_steps_s": sum(seconds[:WARMUP_STEPS]),
            "ms_per_step": 1e3 * statistics.median(timed), "timed_steps": len(timed)}


# ---------------------------------------------------------------- phases and report

def init_logits_gap(model, gpt: GPT, inputs: np.ndarray) -> float:
    """Max |logit difference| of the two models at initialisation, float32, full precision."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("highest"), torch.no_grad():
            ours = np.asarray(model(jnp.asarray(inputs), ODEConfig(), key=None)[0], np.float32)
            device = next(gpt.parameters()).device
            theirs = gpt.eval().logits(torch.from_numpy(inputs).to(device, torch.long)).cpu().numpy()
    finally:
        gpt.train()
        torch.set_float32_matmul_precision(previous)
    return float(np.abs(ours - theirs).max())


def run_phase(args, corpus, dropout: float, steps: int, eval_every: int, device) -> dict:
    cfg = ode_lm_config(args, dropout, steps)
    vocab = corpus.tokenizer.vocab_size
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    val_batches = [sampler.val_batch(i) for i in range(args.eval_batches)] if eval_every else []
    ours, flops = OdeLmSide(cfg, vocab), flops_per_token(cfg, vocab)
    torch.manual_seed(cfg.train.seed)
    theirs = TorchSide(cfg, load_weights(GPT(cfg, vocab), ours.model), device, args.compile)
    record = {"dropout": dropout, "steps": steps, "form": form_of(cfg), "schedule_max_gap": check_schedule(cfg),
              "parameters": count_parameters(ours.model),
              "init_logits_max_abs_diff": init_logits_gap(ours.model, theirs.gpt, sampler.train_batch(0)[0]),
              "train_tflop_per_step": flops.per_batch(flops.train_step) / 1e12}
    print(f"phase dropout={dropout}: {record['parameters']:,} parameters, {describe_form(record['form'])}, "
          f"init logits max |diff| {record['init_logits_max_abs_diff']:.2e}", flush=True)
    for side in (ours, theirs):
        start = time.perf_counter()
        record[side.name] = run_side(side, sampler, steps, eval_every, val_batches)
        print(f"  {side.name}: {steps} steps in {time.perf_counter() - start:.1f} s "
              f"({record[side.name]['ms_per_step']:.2f} ms/step)", flush=True)
    for name in ("ode-lm", "torch"):
        record[name]["tflops"] = record["train_tflop_per_step"] / (record[name]["ms_per_step"] / 1e3)
    return record


def float32_losses(args, corpus, steps: int) -> list[float]:
    """ode-lm's phase-1 losses in float32 at full matmul precision: the yardstick for bf16 noise."""
    cfg = ode_lm_config(argparse.Namespace(**{**vars(args), "dtype": "float32"}), 0.0, steps)
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    with jax.default_matmul_precision("highest"):
        return run_side(OdeLmSide(cfg, corpus.tokenizer.vocab_size), sampler, steps, 0, [])["losses"]


def summarise_parity(p: dict) -> dict:
    def gaps(a, b):
        diff = np.abs(np.array(a) - np.array(b))
        return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                "step_of_max": int(diff.argmax()) + 1}

    out = {**gaps(p["ode-lm"]["losses"], p["torch"]["losses"]),
           "final_loss": {k: p[k]["losses"][-1] for k in ("ode-lm", "torch")}}
    if "ode-lm float32" in p:  # how far bf16 rounding alone moves ode-lm's own curve
        out["bf16_noise"] = gaps(p["ode-lm"]["losses"], p["ode-lm float32"])
    return out


def summarise_dropout(p: dict) -> dict:
    out = {}
    for k in ("ode-lm", "torch"):
        evals = p[k]["evals"]
        best = min(evals, key=lambda e: e["val_loss"])
        out[k] = {"best_val": best["val_loss"], "best_step": best["step"], "final_val": evals[-1]["val_loss"]}
    out["best_diff"] = out["ode-lm"]["best_val"] - out["torch"]["best_val"]
    out["final_diff"] = out["ode-lm"]["final_val"] - out["torch"]["final_val"]
    return out


def report_parity(parity: dict) -> None:
    s1 = parity["summary"]
    print(f"\nphase 1: dropout 0, {parity['steps']} steps, training loss of each step; "
          f"{describe_form(parity['form'])}")
    print_table(["side", "first loss", "final loss", "ms/step", "TFLOP/s", "first steps s"],
                [[k, parity[k]["losses"][0], parity[k]["losses"][-1], parity[k]["ms_per_step"],
                  parity[k]["tflops"], parity[k]["first_steps_s"]] for k in ("ode-lm", "torch")])
    print(f"|loss difference| ode-lm vs torch: max {s1['max_abs_diff']:.2e} (step {s1['step_of_max']}), "
          f"mean {s1['mean_abs_diff']:.2e}; init logits max |diff| {parity['init_logits_max_abs_diff']:.2e}")
    if "bf16_noise" in s1:
        n = s1["bf16_noise"]
        print(f"bf16 noise, ode-lm bf16 vs ode-lm float32: max {n['max_abs_diff']:.2e} "
              f"(step {n['step_of_max']}), mean {n['mean_abs_diff']:.2e}")


def report_dropout(dropout: dict) -> None:
    s2 = dropout["summary"]
    print(f"\nphase 2: dropout {dropout['dropout']}, {dropout['steps']} steps, validation loss; "
          f"{describe_form(dropout['form'])}")
    print_table(["step", "ode-lm", "torch", "ode-lm - torch"],
                [[a["step"], a["val_loss"], b["val_loss"], a["val_loss"] - b["val_loss"]]
                 for a, b in zip(dropout["ode-lm"]["evals"], dropout["torch"]["evals"])])
    print_table(["side", "best val", "at step", "final val", "ms/step", "TFLOP/s"],
                [[k, s2[k]["best_val"], s2[k]["best_step"], s2[k]["final_val"], dropout[k]["ms_per_step"],
                  dropout[k]["tflops"]] for k in ("ode-lm", "torch")])
    print(f"best val difference (ode-lm - torch) {s2['best_diff']:+.4f}, final {s2['final_diff']:+.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-bytes", type=int, default=1_000_000, help="data.max_bytes of the embedded corpus")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--b2", type=float, default=0.99, help="Adam beta2 (nanoGPT's char-level setting)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parity-steps", type=int, default=300, help="phase 1 steps (dropout 0); 0 skips it")
    ap.add_argument("--dropout", type=float, default=0.2, help="phase 2 dropout")
    ap.add_argument("--dropout-steps", type=int, default=5000, help="phase 2 steps; 0 skips it")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="further ode-lm config overrides, e.g. data.cache_dir=/tmp/cache")
    ap.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                    help="skip phase 1's float32 run of ode-lm (the bf16-noise yardstick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager PyTorch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="docs/results/gpt2_parity_gpu.json")
    args = ap.parse_args()
    if args.parity_steps < 0 or args.dropout_steps < 0 or args.eval_every < 1 or args.eval_batches < 1:
        raise ConfigError("compare_gpt2_torch: --parity-steps and --dropout-steps must be >= 0, "
                          "--eval-every and --eval-batches >= 1")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default on NVIDIA GPUs
    corpus = load_corpus(ode_lm_config(args, 0.0, 1).data)
    print(f"data: {corpus.describe()}", flush=True)
    results = {}
    if args.parity_steps:
        parity = results["phase1_parity"] = run_phase(args, corpus, 0.0, args.parity_steps, 0, device)
        if args.dtype == "bfloat16" and args.noise_floor:
            parity["ode-lm float32"] = float32_losses(args, corpus, args.parity_steps)
        parity["summary"] = summarise_parity(parity)
    if args.dropout_steps:
        dropout = results["phase2_dropout"] = run_phase(args, corpus, args.dropout, args.dropout_steps,
                                                        args.eval_every, device)
        dropout["summary"] = summarise_dropout(dropout)
    if args.parity_steps:
        report_parity(results["phase1_parity"])
    if args.dropout_steps:
        report_dropout(results["phase2_dropout"])
    info = {**machine(), "torch": torch.__version__, "torch_device": str(device),
            "torch_device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    write_json(args.out, {"benchmark": "gpt2_parity", "machine": info, "args": vars(args), **results})


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad override, corpus or path: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
