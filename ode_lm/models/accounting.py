"""Parameters and FLOPs per component: what ``ode-lm info`` prints and benchmarks divide by.

FLOPs count multiply-adds as 2 (a ``[m, k] @ [k, n]`` product is ``2 m n k``) and ignore
elementwise work (norms, activations, softmax), the usual model-FLOP convention. Per token
of a forward pass::

    forward = NFE * (field per token + per-evaluation work / tokens per batch) + embed + head
    block   = 2 d^2 (3 + 1 + 2 r)  +  2 * 2 T d        # qkv, proj, fc1, fc2; QK^T and AV
    ssm     = 2 d (G + 2N) + 2 d^2 + 6 d N             # in/out projections; scan (see below)
    head    = 2 d V
    embed   = 2 d V when V <= ONE_HOT_MAX_VOCAB (a one-hot product), else 0 (a gather)

with ``T = data.seq_len`` (attention over the full window, not halved for causality),
``r = mlp_ratio``, ``G = d`` (``model.ssm_form = "channel"``) or ``G = model.ssm_heads``
(``"head"``: one step ``Delta`` per head). The scan's 6 FLOPs per (channel, state) are the
decay argument ``Delta A``, the drive ``(Delta u) B``, the update ``a h + b`` and the
readout ``C . h`` (5 in form ``head``, whose decay is per head): the recurrence's, whichever
``model.ssm_scan`` evaluates it (the chunked form ``head`` spends more, in matrix products).
Per-evaluation work does not scale with tokens: the modulation MLP, the SSM's parameter
MLP, or the hypernetwork's weight generation (``2 n_in n_out H`` per matrix, plus the dense
form's six time embeddings, biases and norms). NFE comes
from the solver table's rule (``SOLVER_SPECS``, the one training counts by) at ``ode.steps`` (for adaptive solves, the initial step
count: a lower bound); the discrete ``standard`` family has ``NFE = model.layers``. Decoding's
caches have one slot per evaluation of its own grid loop (``grid_scheme(solver).slots``).
A training step is counted as 3x the forward pass (backward = 2x forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ode_lm.config import Config, ModelConfig, ODEConfig
from ode_lm.models.base import ONE_HOT_MAX_VOCAB, resolve_decode_weights
from ode_lm.nn import BlockGates
from ode_lm.ode import SOLVER_SPECS, checkpoint_saves, grid_scheme

# Attribute name on a model's path -> component; the deepest match on a leaf's path wins.
COMPONENTS = {"embedding": "embeddings", "layers": "block", "block": "block", "modulation": "modulation",
              "constant": "modulation", "hypernetwork": "hypernetwork", "ssm": "ssm", "readout": "head"}
ORDER = ("embeddings", "block", "modulation", "hypernetwork", "ssm", "head")


def _is_param(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray))


def parameter_counts(model) -> dict[str, int]:
    """Parameters per component (``ORDER``), for a model or its ``eqx.filter_eval_shape``."""
    counts: dict[str, int] = {}
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, _is_param))[0]
    for path, leaf in leaves:
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        labels = [COMPONENTS[n] for n in names if n in COMPONENTS]
        if not labels:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} belongs to no component of {ORDER}")
        counts[labels[-1]] = counts.get(labels[-1], 0) + int(np.prod(leaf.shape))
    return {c: counts[c] for c in ORDER if c in counts}


def parameter_bytes(model) -> int:
    leaves = jax.tree.leaves(eqx.filter(model, _is_param))
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def block_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    d, r = m.dim, m.mlp_ratio
    return 2 * d * d * (3 + 1 + 2 * r) + 2 * 2 * seq_len * d


def ssm_groups(m: ModelConfig) -> int:
    """How many steps ``Delta`` (and ``A`` rows) a token has: one per channel or per head."""
    return m.dim if m.ssm_form == "channel" else m.ssm_heads


def ssm_flops_per_token(m: ModelConfig) -> int:
    d, n = m.dim, m.ssm_state_size
    scan = 6 if m.ssm_form == "channel" else 5
    return 2 * d * (ssm_groups(m) + 2 * n) + 2 * d * d + scan * d * n


def per_evaluation_flops(m: ModelConfig) -> int:
    """Token-independent work per evaluation of the field: what turns ``t`` into weights."""
    d, e = m.dim, m.time_embed_dim
    gates = sum(BlockGates.sizes(d, m.mlp_ratio))
    modulation = 2 * (e * m.modulation_hidden + m.modulation_hidden * gates)
    if m.family == "standard":
        return 0
    if m.family == "hypernetwork":
        h, hidden = m.hyper_hidden, m.mlp_ratio * d
        matrices = [(d, 3 * d), (d, d), (d, hidden), (hidden, d)]
        if m.hyper_form == "dense":  # six time embeddings; W(t), b(t) and the norms' gains/shifts
            embeddings = 6 * 2 * (e * h + h * h)
            biases = sum(2 * h * b for _, b in matrices) if m.bias else 0
            return embeddings + sum(2 * a * b * h for a, b in matrices) + biases + 2 * 2 * h * d * (1 + m.bias)
        vectors = 2 * 2 * d + 3 * d + d + hidden + d
        return 2 * e * h + sum(2 * a * b * h for a, b in matrices) + 2 * h * vectors
    if m.family == "time_indexed_ssm":
        z_size = 2 * ssm_groups(m) + d + 2 * m.ssm_state_size  # alpha, delta (G each), D, beta, gamma
        ssm_mlp = 2 * (e * m.modulation_hidden + m.modulation_hidden * z_size)
        return modulation + ssm_mlp
    return modulation  # time_indexed, constant


def nfe(m: ModelConfig, ode: ODEConfig) -> int:
    """Evaluations of one forward pass: the solver table's rule at ``ode.steps`` (twice the base
    steps under the ``reversible`` sensitivity), or the discrete model's layers."""
    if m.family == "standard":
        return m.layers
    spec = SOLVER_SPECS[ode.solver]
    return spec.reversible_nfe(ode.steps) if ode.adjoint == "reversible" else spec.nfe(ode.steps)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token; ``forward`` and ``train_step`` are what MFU divides by."""

    field: float  # one evaluation of the field, per token, including the per-evaluation share
    nfe: int
    embed: float
    head: float
    tokens_per_batch: int

    @property
    def forward(self) -> float:
        return self.nfe * self.field + self.embed + self.head

    @property
    def train_step(self) -> float:
        return 3 * self.forward

    def per_batch(self, per_token: float) -> float:
        return per_token * self.tokens_per_batch


def flops_per_token(cfg: Config, vocab: int) -> FlopCount:
    m, seq = cfg.model, cfg.data.seq_len
    tokens = cfg.train.batch_size * seq
    field = block_flops_per_token(m, seq) + per_evaluation_flops(m) / tokens
    if m.family == "time_indexed_ssm":
        field += ssm_flops_per_token(m)
    embed = 2 * m.dim * vocab if vocab <= ONE_HOT_MAX_VOCAB else 0
    return FlopCount(field=field, nfe=nfe(m, cfg.ode), embed=embed, head=2 * m.dim * vocab,
                     tokens_per_batch=tokens)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def published_form(m: ModelConfig) -> str:
    """Which published model the family runs as configured (``ode-lm info``, docs/families.md)."""
    block = ("GPT-2's sequential layers (x += attn(LN1 x); x += mlp(LN2 x))" if m.sequential
             else "parallel blocks (x += attn(LN1 x) + mlp(LN2 x))")
    form = {"standard": block if m.family == "standard" else "",
            "hypernetwork": ("Tong et al.'s dense hypernetwork (every matrix a dense map of a time embedding)"
                             if m.hyper_form == "dense" else "rank-one updates of a base block (not Tong et al.'s)"),
            }.get(m.family, "ODE vector field f = attn(LN x) + mlp(LN x)")
    masks = "" if m.family == "standard" else f", masks {m.dropout_masks.replace('_', ' ')}"
    return (f"{form}; biases {'on' if m.bias else 'off'}; dropout embd {m.embd_dropout:g}, attn "
            f"{m.attn_dropout:g}, resid {m.resid_dropout:g}{masks}")


def describe(cfg: Config, vocab: int, model) -> str:
    """The ``ode-lm info`` report for ``cfg`` and its model (arrays or shapes)."""
    m, ode = cfg.model, cfg.ode
    counts = parameter_counts(model)
    total = sum(counts.values())
    flops = flops_per_token(cfg, vocab)
    if m.family == "standard":
        depth = f"{m.layers} discrete layers ([ode] ignored)"
    else:
        steps = f"adaptive from {ode.steps} steps" if ode.adaptive else f"{ode.steps} steps"
        depth = f"{ode.solver}, {steps}" + (" (NFE shown is the initial step count's)" if ode.adaptive else "")
    lines = [f"model: {m.family}, dim {m.dim}, {m.heads} heads, mlp_ratio {m.mlp_ratio}, vocab {vocab}; "
             f"depth: {depth}; NFE {flops.nfe}", f"form: {published_form(m)}", "",
             f"{'component':<14}{'parameters':>14}{'share':>8}"]
    lines += [f"{name:<14}{n:>14,}{n / total:>8.1%}" for name, n in counts.items()]
    lines += [f"{'total':<14}{total:>14,}", ""]
    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    lines += [f"FLOPs per token (seq_len {seq}, batch {batch}; matmuls only, 2 per multiply-add):",
              f"  {'one layer' if m.family == 'standard' else 'field, one evaluation':<29}{_si(flops.field)}FLOP",
              f"  x NFE {flops.nfe:<23}{_si(flops.nfe * flops.field)}FLOP",
              f"  embedding (one-hot product)  {_si(flops.embed)}FLOP",
              f"  head                         {_si(flops.head)}FLOP",
              f"  forward                      {_si(flops.forward)}FLOP per token, "
              f"{_si(flops.per_batch(flops.forward))}FLOP per batch",
              f"  training step (3x forward)   {_si(flops.train_step)}FLOP per token, "
              f"{_si(flops.per_batch(flops.train_step))}FLOP per step", ""]
    dtypes = sorted({str(jnp.dtype(x.dtype)) for x in jax.tree.leaves(eqx.filter(model, _is_param))})
    size = parameter_bytes(model)
    lines.append(f"parameter memory: {size / 2**20:.2f} MiB ({', '.join(dtypes)}; train.dtype = "
                 f"{cfg.train.dtype}); AdamW moments add {2 * size / 2**20:.2f} MiB")
    return "\n".join(lines)


# ---- memory of a training step, before anything is compiled -------------------------------

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs, by part; a lower bound of what XLA allocates (tested against
    its memory analysis), so a config refused by it cannot fit."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def largest(self) -> str:
        return max(self.parts, key=self.parts.get)


def _evaluation_bytes(cfg: Config, batch: int, length: int, compute: int, *, scores: bool = True) -> int:
    """Activations one evaluation of the block keeps for its backward pass (a lower bound):
    per token its input, the two standardised inputs, q, k, v, the attention and projection
    outputs, the MLP's two hidden layers (before and after the GELU) and its output; the
    attention scores and probabilities when XLA materialises them (not cuDNN's fused kernel)."""
    m = cfg.model
    stored = batch * length * m.dim * (8 + 2 * m.mlp_ratio) * compute
    fused = m.attention == "cudnn" or (m.attention == "auto" and cfg.train.dtype == "bfloat16"
                                       and jax.default_backend() == "gpu")
    if scores and not fused:
        stored += 2 * batch * m.heads * length * length * compute
    if m.family == "time_indexed_ssm" and m.ssm_scan == "associative":
        stored += batch * length * m.dim * m.ssm_state_size * 4  # one level of the scan
    return stored


def train_memory(cfg: Config, vocab: int, parameters: int, devices: int = 1,
                 state_shards: int = 1) -> MemoryEstimate:
    """What one training step needs per device: parameters, gradients and AdamW's two moments
    (replicated, or split over ``state_shards`` devices by ``train.fsdp``), and the
    activations of ``train.batch_size / devices`` sequences."""
    m, ode = cfg.model, cfg.ode
    p = 8 if cfg.train.dtype == "float64" else 4
    compute = DTYPE_BYTES[cfg.train.dtype]
    b, t = max(1, cfg.train.batch_size // devices), cfg.data.seq_len
    state = b * t * m.dim * p
    evaluation = _evaluation_bytes(cfg, b, t, compute)
    spec = SOLVER_SPECS[ode.solver]
    if m.family == "standard":
        solve = m.layers * evaluation
    elif ode.adjoint == "direct" and not ode.adaptive:
        solve = nfe(m, ode) * evaluation
    elif checkpoint_saves(ode) == "matmuls":  # every evaluation's products (q, k, v, fc1, ...)
        solve = (ode.steps + 1) * state + nfe(m, ode) * b * t * m.dim * (4 + m.mlp_ratio) * compute
    else:
        # checkpoint: every step's state; while one step is recomputed, its stages' states and
        # one evaluation's internals. Adaptive, backsolve, reversible: a few states at a time.
        kept = 2 if ode.adaptive or ode.adjoint in ("backsolve", "reversible") else ode.steps + 1
        solve = (kept + spec.evals_per_step) * state + evaluation
    shard = parameters * p // state_shards
    return MemoryEstimate({"parameters": shard, "gradients": shard, "optimizer": 2 * shard, "activations": solve,
                           "logits": 2 * b * t * vocab * 4})


# Families whose field's block does not change with t (``CachedField.block_is_constant``).
CONSTANT_BLOCK_FAMILIES = ("time_indexed", "constant", "time_indexed_ssm")


def generation_memory(cfg: Config, vocab: int, parameters: int, samples: int, length: int,
                      prompt: int, cache: bool) -> MemoryEstimate:
    """What generation needs: the parameters, every evaluation's keys and values over
    ``length`` positions (``samples`` rows) and folded block (``DecodeBlock``: ``W_in``,
    ``W_out`` and their biases; the cached path), and the prompt's forward pass."""
    m = cfg.model
    compute = DTYPE_BYTES[cfg.train.dtype]
    weight = 8 if cfg.train.dtype == "float64" else 4  # the parameters' dtype
    # Cached decoding solves with the plain solver (ode.grid_scheme), one slot per evaluation.
    slots = m.layers if m.family == "standard" else grid_scheme(cfg.ode.solver).slots(cfg.ode.steps)
    kv = 2 * slots * samples * length * m.dim * compute if cache else 0
    hidden = m.mlp_ratio * m.dim
    matrices, vectors = 2 * m.dim * (2 * m.dim + hidden), 5 * m.dim + hidden  # of one DecodeBlock
    if m.family in CONSTANT_BLOCK_FAMILIES and resolve_decode_weights(cfg.generate.decode_weights) == "shared":
        matrices, vectors = matrices / slots, 2 * vectors  # + DecodeGates: 3 d + hidden, d, d
    folded = int(slots * (matrices + vectors) * weight) if cache else 0
    width = prompt if cache else length
    forward = samples * width * m.dim * (4 + m.mlp_ratio) * compute + samples * width * vocab * 4
    return MemoryEstimate({"parameters": parameters * weight, "key/value cache": kv,
                           "folded blocks": folded, "activations": forward})
