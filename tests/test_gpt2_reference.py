"""Family ``standard`` against an independent GPT-2 forward pass written here in NumPy.

The reference follows the GPT-2 paper and its released model (pre-norm blocks as in
nanoGPT), float64 throughout::

    x_0     = wte[ids] + wpe[:T]
    a       = x + attn(LN_1(x))                  # sequential block (GPT-2)
    x'      = a + mlp(LN_2(a))
    logits  = LN_f(x_L) wte^T                    # tied head

with causal multi-head attention ``softmax(q k^T / sqrt(d_head)) v`` over heads cut as
contiguous slices of ``q | k | v``, ``mlp(h) = gelu_tanh(h W_fc + b_fc) W_proj + b_proj`` and
LayerNorm ``(x - mean) / sqrt(var + 1e-5) * g + b`` (biased variance). ``parallel=True`` is
the form ``x' = x + attn(LN_1(x)) + mlp(LN_2(x))``. Weights are copied from a fresh ode-lm
model whose biases and LayerNorm gains/shifts are set to random non-zero values first.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.config import ODEConfig, config_from_dict
from ode_lm.models import build_model, count_parameters

VOCAB, DIM, HEADS, LAYERS, SEQ, BATCH = 48, 32, 2, 3, 8, 2


# ---------------------------------------------------------------- the reference (NumPy)

def layer_norm(x, gain, shift, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * gain
    return y if shift is None else y + shift


def linear(x, weight, bias):
    y = x @ weight  # GPT-2's Conv1D layout: weight [in, out]
    return y if bias is None else y + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def causal_self_attention(x, p, heads):
    b, t, c = x.shape
    q, k, v = np.split(linear(x, p["c_attn.w"], p["c_attn.b"]), 3, axis=-1)
    q, k, v = (z.reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3) for z in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(c // heads)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    y = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
    return linear(y, p["attn.c_proj.w"], p["attn.c_proj.b"])


def mlp(x, p):
    return linear(gelu_tanh(linear(x, p["c_fc.w"], p["c_fc.b"])), p["mlp.c_proj.w"], p["mlp.c_proj.b"])


def gpt2_logits(params, ids, heads, parallel=False):
    x = params["wte"][ids] + params["wpe"][: ids.shape[1]]
    for p in params["h"]:
        if parallel:
            x = x + causal_self_attention(layer_norm(x, p["ln_1.g"], p["ln_1.b"]), p, heads) \
                  + mlp(layer_norm(x, p["ln_2.g"], p["ln_2.b"]), p)
        else:
            x = x + causal_self_attention(layer_norm(x, p["ln_1.g"], p["ln_1.b"]), p, heads)
            x = x + mlp(layer_norm(x, p["ln_2.g"], p["ln_2.b"]), p)
    x = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    head = params["wte"].T if params["lm_head"] is None else params["lm_head"]
    return x @ head


# ---------------------------------------------------------------- ode-lm side

def as_numpy(a):
    return None if a is None else np.asarray(a, np.float64)


def exported(model) -> dict:
    """The GPT-2 parameters of an ode-lm ``standard`` model (read by attribute, no maths)."""
    def block(layer):
        return {"ln_1.g": as_numpy(layer.ln_attn.weight), "ln_1.b": as_numpy(layer.ln_attn.bias),
                "c_attn.w": as_numpy(layer.attn.qkv.weight), "c_attn.b": as_numpy(layer.attn.qkv.bias),
                "attn.c_proj.w": as_numpy(layer.attn.proj.weight), "attn.c_proj.b": as_numpy(layer.attn.proj.bias),
                "ln_2.g": as_numpy(layer.ln_mlp.weight), "ln_2.b": as_numpy(layer.ln_mlp.bias),
                "c_fc.w": as_numpy(layer.mlp.fc1.weight), "c_fc.b": as_numpy(layer.mlp.fc1.bias),
                "mlp.c_proj.w": as_numpy(layer.mlp.fc2.weight), "mlp.c_proj.b": as_numpy(layer.mlp.fc2.bias)}
    return {"wte": as_numpy(model.embedding.tokens), "wpe": as_numpy(model.embedding.positions),
            "h": [block(layer) for layer in model.layers],
            "ln_f.g": as_numpy(model.readout.norm.weight), "ln_f.b": as_numpy(model.readout.norm.bias),
            "lm_head": as_numpy(model.readout.head)}


def randomise_vectors(model, seed):
    """Every 1-D parameter (bias, LayerNorm gain or shift) set to random non-zero values:
    gains ``1 + 0.3 z``, the rest ``0.3 z`` (fresh models have ones and zeros there)."""
    rng = np.random.default_rng(seed)

    def change(path, leaf):
        if not (isinstance(leaf, jax.Array) and leaf.ndim == 1):
            return leaf
        z = 0.3 * rng.standard_normal(leaf.shape)
        is_gain = getattr(path[-1], "name", None) == "weight"
        return jnp.asarray(1.0 + z if is_gain else z, leaf.dtype)

    return jax.tree_util.tree_map_with_path(change, model)


def standard_model(block=None, bias=None, tied=True, dropout=0.0, layers=LAYERS):
    model_cfg = {"family": "standard", "dim": DIM, "heads": HEADS, "layers": layers, "max_positions": 16,
                 "dropout": dropout, "init_std": 0.25, "tie_embeddings": tied}
    if block is not None:
        model_cfg["block"] = block
    if bias is not None:
        model_cfg["bias"] = bias
    cfg = config_from_dict({"model": model_cfg, "data": {"seq_len": SEQ}, "train": {"dtype": "float64"}},
                           "test_gpt2_reference")
    model = build_model(cfg.model, VOCAB, jax.random.key(7), jnp.float64)
    return randomise_vectors(model, 8)


def token_ids():
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ))


@eqx.filter_jit
def forward(model, ids):
    return model(ids, ODEConfig(), key=None)


def ode_lm_logits(model, ids):
    logits, stats = forward(model, jnp.asarray(ids, jnp.int32))
    assert int(stats.nfe) == len(model.layers)
    return np.asarray(logits)


def gpt2_parameter_count(bias: bool, tied: bool) -> int:
    """GPT-2's count: per layer 12 d^2 matrix entries + 13 d vectors (2 d of them LN gains)."""
    d = DIM
    per_layer = 12 * d * d + (13 * d if bias else 2 * d)
    return (VOCAB + 16) * d + LAYERS * per_layer + (2 * d if bias else d) + (0 if tied else d * VOCAB)


# ---------------------------------------------------------------- tests

FORMS = [
    # (block knob, bias knob, reference parallel?, bias expected)
    pytest.param("parallel", None, True, True, id="parallel-bias"),
    pytest.param(None, None, False, True, id="default-is-sequential"),
    pytest.param("sequential", True, False, True, id="sequential-bias"),
    pytest.param("sequential", False, False, False, id="sequential-nobias"),
    pytest.param("parallel", False, True, False, id="parallel-nobias"),
]


@pytest.mark.parametrize("block, bias, parallel, has_bias", FORMS)
def test_standard_logits_equal_gpt2_reference(block, bias, parallel, has_bias):
    with jax.enable_x64(True):
        model = standard_model(block, bias, dropout=0.2)  # key=None: dropout off
        ids = token_ids()
        got = ode_lm_logits(model, ids)
    assert count_parameters(model) == gpt2_parameter_count(has_bias, tied=True)
    want = gpt2_logits(exported(model), ids, HEADS, parallel=parallel)
    assert got.dtype == np.float64 and got.shape == (BATCH, SEQ, VOCAB)
    assert np.abs(got - want).max() <= 1e-10 * max(1.0, np.abs(want).max())


def test_untied_head_equals_gpt2_reference():
    with jax.enable_x64(True):
        model = standard_model("parallel", tied=False, layers=2)
        ids = token_ids()
        got = ode_lm_logits(model, ids)
    params = exported(model)
    assert params["lm_head"].shape == (DIM, VOCAB)
    assert np.abs(got - gpt2_logits(params, ids, HEADS, parallel=True)).max() <= 1e-10


def test_reference_tells_the_forms_and_biases_apart():
    """The comparison above is sensitive: the block forms, and biases against none, give
    logits far apart on the same weights, and the first position sees only itself."""
    with jax.enable_x64(True):
        params = exported(standard_model("parallel"))
    ids = token_ids()
    sequential = gpt2_logits(params, ids, HEADS)
    assert np.abs(sequential - gpt2_logits(params, ids, HEADS, parallel=True)).max() > 1e-2
    no_bias = {**params, "h": [{k: (None if k.endswith(".b") else v) for k, v in p.items()}
                               for p in params["h"]], "ln_f.b": None}
    assert np.abs(sequential - gpt2_logits(no_bias, ids, HEADS)).max() > 1e-2
    changed = ids.copy()
    changed[:, 3] = (changed[:, 3] + 1) % VOCAB
    moved = np.abs(gpt2_logits(params, changed, HEADS) - sequential).max(axis=(0, 2))
    assert moved[:3].max() == 0.0 and moved[3:].min() > 0.0


def test_residual_projections_start_at_gpt2_scaled_std():
    """GPT-2 (and nanoGPT) draw the two residual projections of every layer (attention output,
    MLP output) with std / sqrt(2 * layers); every other matrix keeps std."""
    layers, std = 4, 0.02
    cfg = config_from_dict({"model": {"family": "standard", "dim": 64, "heads": 2, "layers": layers,
                                      "max_positions": 64, "init_std": std}, "data": {"seq_len": 64}},
                           "test_gpt2_reference")
    model = build_model(cfg.model, 256, jax.random.key(3))

    def measured(get):
        return float(np.std(np.concatenate([np.asarray(get(layer)).ravel() for layer in model.layers])))

    residual = std / np.sqrt(2 * layers)
    for get in (lambda b: b.attn.proj.weight, lambda b: b.mlp.fc2.weight):
        assert abs(measured(get) / residual - 1) < 0.03  # 16k draws each: ~0.6% sampling error
    for get in (lambda b: b.attn.qkv.weight, lambda b: b.mlp.fc1.weight):
        assert abs(measured(get) / std - 1) < 0.03
    assert abs(float(np.std(np.asarray(model.embedding.tokens))) / std - 1) < 0.03
