"""Model families: causality, the SSM scan, t-dependence, parameter counts, training."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.config import ADJOINTS, FAMILIES, ModelConfig, ODEConfig
from ode_lm.models import build_model, count_parameters
from ode_lm.nn import SelectiveSSM, sinusoidal

VOCAB = 32
SMALL = dict(dim=16, heads=2, mlp_ratio=2, max_positions=16, dropout=0.0, time_embed_dim=8,
             modulation_hidden=8, hyper_hidden=4, ssm_state_size=4, layers=3, init_std=0.3)


def small_model(family, dtype=jnp.float32, **kw):
    return build_model(ModelConfig(family=family, **{**SMALL, **kw}), VOCAB, jax.random.key(0), dtype)


@eqx.filter_jit
def forward(model, tokens, ode):
    return model(tokens, ode)


@eqx.filter_jit
def call(module, *args):
    return module(*args)


# time_indexed is also checked in test_ode, and constant shares its code: slow run only.
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow if f in ("time_indexed", "constant")
                                                 else []) for f in FAMILIES])
def test_causality(family):
    model = small_model(family)
    ode = ODEConfig(solver="heun", steps=2)
    tokens = jax.random.randint(jax.random.key(3), (1, 12), 0, VOCAB)
    base, stats = forward(model, tokens, ode)
    assert int(stats.nfe) == (3 if family == "standard" else 4)
    for k in (0, 5, 11):
        changed, _ = forward(model, tokens.at[0, k].set((tokens[0, k] + 1) % VOCAB), ode)
        assert float(jnp.abs(changed[0, :k] - base[0, :k]).max(initial=0.0)) == 0.0, (family, k)
        assert float(jnp.abs(changed[0, k:] - base[0, k:]).max()) > 0.0, (family, k)


def test_standard_is_a_stack_of_distinct_residual_layers():
    model = small_model("standard")
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, VOCAB)
    # [ode] is ignored: any solver gives the same result.
    x_euler, stats = model.hidden_final(tokens, ODEConfig(solver="euler", steps=7))
    x_rk4, _ = model.hidden_final(tokens, ODEConfig(solver="rk4", steps=1))
    assert int(stats.nfe) == 3 and float(jnp.abs(x_euler - x_rk4).max()) == 0.0
    x = model.embedding(tokens)
    for n in range(3):  # GPT-2's sequential sub-layers (the default form)
        x = x + model.layers[n].attention_branch(x)
        x = x + model.layers[n].mlp_branch(x)
    assert float(jnp.abs(x_euler - x).max()) <= 1e-5
    parallel = small_model("standard", block="parallel")
    x_par, _ = parallel.hidden_final(tokens)
    x = parallel.embedding(tokens)
    for n in range(3):
        x = x + parallel.layers[n](x)
    assert float(jnp.abs(x_par - x).max()) <= 1e-5
    w = [layer.attn.qkv.weight for layer in model.layers]
    assert len(w) == 3 and float(jnp.abs(w[0] - w[1]).max()) > 0.0


def test_constant_ignores_t_and_time_indexed_does_not():
    x = jax.random.normal(jax.random.key(4), (2, 8, 16))
    t1, t2 = jnp.asarray(0.1), jnp.asarray(0.8)
    constant = small_model("constant").field
    assert float(jnp.abs(call(constant, t1, x) - call(constant, t2, x)).max()) == 0.0
    field = small_model("time_indexed").field
    assert float(jnp.abs(call(field, t1, x) - call(field, t2, x)).max()) > 1e-4


def test_rank_one_hypernetwork_generates_the_weights_by_its_formula():
    field = small_model("hypernetwork", hyper_form="rank_one").field
    hyper, t = field.hypernetwork, jnp.asarray(0.37)
    h = jax.nn.silu(sinusoidal(t, 8) @ hyper.hidden.weight + hyper.hidden.bias)
    block, _ = field.block_at(t)
    for generated, base, basis in ((block.attn.qkv.weight, hyper.block.attn.qkv.weight, hyper.matrices[0]),
                                   (block.mlp.fc2.weight, hyper.block.mlp.fc2.weight, hyper.matrices[3])):
        expected = base + sum(h[j] * jnp.outer(basis.u[:, j], basis.v[:, j]) for j in range(h.shape[0]))
        np.testing.assert_allclose(generated, expected, atol=1e-6)
        assert np.linalg.matrix_rank(np.asarray(generated - base), tol=1e-6) <= h.shape[0]
    x = jax.random.normal(jax.random.key(5), (2, 8, 16))
    np.testing.assert_allclose(call(field, t, x), call(block, x), atol=1e-6)


# ---- the SSM layer ----------------------------------------------------------------------

def random_ssm(dim=16, state=8, key=0, scan="associative"):
    ssm = SelectiveSSM(dim, state, 8, 16, key=jax.random.key(key), std=0.5, scan=scan)
    # Perturb every parameter so the test does not lean on the initialisation.
    leaves, tree = jax.tree.flatten(ssm)
    keys = jax.random.split(jax.random.key(key + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_ssm_parallel_scan_equals_the_sequential_recurrence():
    """``model.ssm_scan`` picks the scan; both compute the same recurrence."""
    associative, recurrent = random_ssm(scan="associative"), random_ssm(scan="sequential")
    x = jax.random.normal(jax.random.key(2), (3, 77, 16))
    for t in (0.0, 0.4, 1.0):
        parallel = call(associative, x, jnp.asarray(t))
        sequential = call(recurrent, x, jnp.asarray(t))
        scale = float(jnp.abs(sequential).max())
        assert scale > 1e-2
        assert float(jnp.abs(parallel - sequential).max()) <= 1e-5 * max(scale, 1.0), t


def test_ssm_decay_is_in_the_unit_interval_for_any_input():
    ssm = random_ssm()
    x = 100.0 * jax.random.normal(jax.random.key(3), (4, 32, 16))
    for t in np.linspace(0.0, 1.0, 5):
        p = eqx.filter_jit(SelectiveSSM.discretise)(ssm, x, jnp.asarray(t))
        assert float(p.decay.min()) >= 0.0 and float(p.decay.max()) < 1.0


def test_ssm_state_stays_bounded_over_4096_steps():
    ssm = random_ssm(dim=8, state=16)
    x = jax.random.normal(jax.random.key(6), (2, 4096, 8))
    t = jnp.asarray(0.5)

    @eqx.filter_jit
    def run(ssm, x):
        def body(state, x_t):
            state, _ = ssm.step(state, x_t, t)
            return state, jnp.abs(state).max()
        return jax.lax.scan(body, ssm.init_state(2), jnp.swapaxes(x, 0, 1))[1]

    peaks = run(ssm, x)
    p = eqx.filter_jit(SelectiveSSM.discretise)(ssm, x, t)
    bound = float(jnp.abs(p.drive).max() / (1.0 - p.decay.max()))
    assert bool(jnp.isfinite(peaks).all())
    assert float(peaks.max()) <= bound
    # Bounded, not growing: the last thousand steps peak no higher than the bound allows
    # and about as high as the first thousand.
    assert float(peaks[-1000:].max()) <= 2.0 * float(peaks[:1000].max())


# ---- parameter counts -------------------------------------------------------------------

def hand_counts(family, d=16, r=2, vocab=VOCAB, positions=16, e=8, hm=8, hh=4, n=4, layers=3, form="dense"):
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * r * d + r * d) + (r * d * d + d)
    modulation = (e * hm + hm) + (hm * (3 + 1 + r + 1) * d + (3 + 1 + r + 1) * d)
    counts = {"embeddings": vocab * d + positions * d, "head": 2 * d}  # tied head: final LN only
    if family == "standard":
        counts["block"] = layers * block
    elif family == "hypernetwork" and form == "dense":
        embedding = e * hh + hh + hh * hh + hh  # per generated module: two layers with biases
        shapes = [(d, 3 * d), (d, d), (d, r * d), (r * d, d)]
        counts["hypernetwork"] = (6 * embedding + sum((hh + 1) * a * b + hh * b for a, b in shapes)
                                  + 2 * 2 * hh * d)
    elif family == "hypernetwork":
        matrices = (d + 3 * d) + (d + d) + (d + r * d) + (r * d + d)
        vectors = 2 * 2 * d + 3 * d + d + r * d + d
        counts["block"] = block
        counts["hypernetwork"] = (e * hh + hh) + hh * matrices + hh * vectors
    else:
        counts["block"] = block
        counts["modulation"] = modulation + (e if family == "constant" else 0)
        if family == "time_indexed_ssm":
            counts["ssm"] = (2 * d + d * (d + 2 * n) + d * d + d + n
                             + e * hm + hm + hm * (3 * d + 2 * n) + 3 * d + 2 * n)
    return counts


@pytest.mark.parametrize("family,form", [(f, "dense") for f in FAMILIES] + [("hypernetwork", "rank_one")])
def test_parameter_counts_match_hand_formulas(family, form):
    from ode_lm.models.accounting import parameter_counts

    expected = hand_counts(family, form=form)
    model = small_model(family, hyper_form=form)
    assert count_parameters(model) == sum(expected.values())
    assert parameter_counts(model) == expected
    shapes = eqx.filter_eval_shape(build_model, ModelConfig(family=family, **SMALL, hyper_form=form), VOCAB,
                                   jax.random.key(0))
    assert parameter_counts(shapes) == expected


# ---- training -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    from ode_lm.data import BatchSampler, load_corpus
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("families"))
    return BatchSampler(load_corpus(cfg.data), cfg.data.seq_len, cfg.train.batch_size, 0)


def train_losses(family, adjoint, sampler, steps=30):
    from ode_lm.config import OptimConfig
    from ode_lm.train.optim import build_optimizer
    from ode_lm.train.steps import TrainStep

    model = build_model(ModelConfig(family=family, **{**SMALL, "init_std": 0.02, "dropout": 0.1,
                                                      "max_positions": 64, "layers": 2}),
                        256, jax.random.key(0))
    optimizer = build_optimizer(OptimConfig(lr=3e-3, warmup_steps=5), steps)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = TrainStep(optimizer, ODEConfig(solver="euler", steps=2, adjoint=adjoint))
    losses = []
    for i in range(steps):
        model, opt_state, metrics = step(model, opt_state, *sampler.train_batch(i), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert step.traces == 1
    return losses


def check_training(family, adjoint, sampler):
    losses = train_losses(family, adjoint, sampler)
    assert np.isfinite(losses).all(), (family, adjoint, losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, (family, adjoint, losses)


# Compiling a train step dominates the cost, so the default run trains the two new ODE
# families (time_indexed and constant share their code; test_train trains time_indexed) ...
ODE_FAMILIES = [f for f in FAMILIES if f != "standard"]
FAST_PAIRS = [("hypernetwork", "direct"), ("time_indexed_ssm", "checkpoint")]  # backsolve: slow run, test_ode


@pytest.mark.parametrize("family, adjoint", FAST_PAIRS)
def test_each_family_trains(family, adjoint, sampler):
    check_training(family, adjoint, sampler)


# ... and the full product in the slow run.
@pytest.mark.slow
@pytest.mark.parametrize("family", ODE_FAMILIES)
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_each_family_trains_with_every_sensitivity(family, adjoint, sampler):
    if (family, adjoint) in FAST_PAIRS:
        pytest.skip("covered by test_each_family_trains")
    check_training(family, adjoint, sampler)


def test_standard_family_trains_and_notes_that_ode_settings_are_ignored(tiny):
    """The trainer end to end; any sensitivity is the same to a discrete model."""
    from ode_lm.train import train
    from ode_lm.train.logging import read_metrics

    said = []
    cfg = tiny(**{"model.family": "standard", "model.layers": 2, "ode.adjoint": "backsolve",
                  "train.eval_batches": 1})
    result = train(cfg, say=said.append)
    assert "family 'standard' is discrete: [ode] settings are ignored" in said
    losses = [r["loss"] for r in read_metrics(result.run_dir, "train") if "lr" not in r]
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert result.evaluation.nfe == 2


@pytest.mark.parametrize("family", ["standard", "hypernetwork", "time_indexed_ssm", "constant"])
def test_float64_export_refuses_families_it_does_not_implement(family):
    from ode_lm.interop.export import ExportError, export_model

    with pytest.raises(ExportError, match="time_indexed family only"):
        export_model(small_model(family))


def test_folded_layer_norm_and_gated_weight_equal_the_plain_formulas():
    """``Linear(x_hat, gate, norm)`` is ``(x_hat * gamma + beta) (W * gate) + b``, and the
    gradients through the custom gate rule equal those of the plain product (float64)."""
    from ode_lm.nn import LayerNorm, Linear

    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 6)
        lin = Linear(8, 12, key=k[0], std=0.5, dtype=jnp.float64)
        lin = eqx.tree_at(lambda m: m.bias, lin, jax.random.normal(k[1], (12,), jnp.float64))
        norm = LayerNorm(8, dtype=jnp.float64)
        norm = eqx.tree_at(lambda n: (n.weight, n.bias), norm,
                           (1 + jax.random.normal(k[2], (8,), jnp.float64), jax.random.normal(k[3], (8,), jnp.float64)))
        x = jax.random.normal(k[4], (3, 5, 8), jnp.float64)
        gate = jax.nn.sigmoid(jax.random.normal(k[5], (12,), jnp.float64))

        def folded(lin, norm, gate):
            return jnp.sum(jnp.sin(lin(norm.standardize(x), gate, norm)))

        def plain(lin, norm, gate):
            return jnp.sum(jnp.sin(norm(x) @ (lin.weight * gate) + lin.bias))

        assert abs(folded(lin, norm, gate) - plain(lin, norm, gate)) < 1e-12
        got, want = (jax.grad(f, argnums=(0, 1, 2))(lin, norm, gate) for f in (folded, plain))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def test_attention_leaving_out_key_and_value_biases_equals_the_plain_formula():
    """``Attention.project`` drops the key bias (softmax ignores a per-query constant) and
    moves the value bias into the output projection (softmax rows sum to one): outputs and
    gradients equal the textbook attention with every bias in place (float64)."""
    from ode_lm.nn import BlockGates, LayerNorm
    from ode_lm.nn.block import Attention

    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 9)
        dim, heads, seq = 8, 2, 6
        attn = Attention(dim, heads, key=k[0], std=0.5, dtype=jnp.float64)
        attn = eqx.tree_at(lambda a: (a.qkv.bias, a.proj.bias), attn,
                           (jax.random.normal(k[1], (3 * dim,), jnp.float64), jax.random.normal(k[2], (dim,), jnp.float64)))
        norm = eqx.tree_at(lambda n: (n.weight, n.bias), LayerNorm(dim, dtype=jnp.float64),
                           (1 + jax.random.normal(k[3], (dim,), jnp.float64), jax.random.normal(k[4], (dim,), jnp.float64)))
        gates = BlockGates(qkv=jax.nn.sigmoid(jax.random.normal(k[5], (3 * dim,), jnp.float64)),
                           proj=jax.nn.sigmoid(jax.random.normal(k[6], (dim,), jnp.float64)))
        x = jax.random.normal(k[7], (2, seq, dim), jnp.float64)
        w = jax.random.normal(k[8], (2, seq, dim), jnp.float64)

        def ours(attn, norm):
            return jnp.sum(attn(norm.standardize(x), gates, norm) * w)

        def plain(attn, norm):
            qkv = norm(x) @ (attn.qkv.weight * gates.qkv) + attn.qkv.bias
            q, k_, v = (z.reshape(2, seq, heads, dim // heads) for z in jnp.split(qkv, 3, -1))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_) / np.sqrt(dim // heads)
            scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
            out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(2, seq, dim)
            return jnp.sum((out @ (attn.proj.weight * gates.proj) + attn.proj.bias) * w)

        np.testing.assert_allclose(ours(attn, norm), plain(attn, norm), rtol=1e-12)
        got, want = (jax.grad(f, argnums=(0, 1))(attn, norm) for f in (ours, plain))
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)


def test_the_folded_decode_block_equals_the_block_chunk_by_chunk():
    """``DecodeBlock`` (gates, norms and biases folded into two merged products, or the gates
    kept on the products' outputs) run on two chunks against its KV cache gives the block's
    ``f(x)`` on the whole sequence: the parallel block, and a sequential layer's two
    sub-layers (float64)."""
    from ode_lm.nn import Block, BlockGates, DecodeBlock

    with jax.enable_x64(True):
        dim, heads, seq, ratio = 8, 2, 6, 3
        block = Block(dim, heads, ratio, key=jax.random.key(0), std=0.5, dtype=jnp.float64)
        leaves, tree = jax.tree.flatten(block)  # every weight, bias and norm parameter random
        keys = jax.random.split(jax.random.key(1), len(leaves) + 5)
        block = jax.tree.unflatten(tree, [jax.random.normal(k, leaf.shape, jnp.float64)
                                          for k, leaf in zip(keys, leaves)])
        gates = BlockGates(*(jax.nn.sigmoid(jax.random.normal(k, (n,), jnp.float64))
                             for k, n in zip(keys[-5:], BlockGates.sizes(dim, ratio))))
        x = jax.random.normal(keys[-1], (2, seq, dim), jnp.float64)

        def chunked(run):
            cache = block.attn.empty_cache(1, 2, seq)
            first, cache = run(x[:, :4], cache, 0)
            rest, _ = run(x[:, 4:], cache, 4)
            return jnp.concatenate([first, rest], 1)

        for fold in (True, False):  # gates in the weights, or on the products' outputs
            folded = DecodeBlock.of(block, gates, fold=fold)
            assert (folded.gates is None) == fold
            np.testing.assert_allclose(chunked(lambda z, c, s: folded(z, c, 0, s)), block(x, gates),
                                       rtol=1e-11, atol=1e-11)
            np.testing.assert_allclose(chunked(lambda z, c, s: folded.attention_branch(z, c, 0, s)),
                                       block.attention_branch(x, gates), rtol=1e-11, atol=1e-11)
            np.testing.assert_allclose(folded.mlp_branch(x), block.mlp_branch(x, gates), rtol=1e-11, atol=1e-11)


def test_standardize_gradient_equals_autodiff_of_the_plain_formula():
    from ode_lm.nn.layers import standardize

    def plain(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (3, 5, 16), jnp.float64) * 3 + 1
        w = jax.random.normal(jax.random.key(1), (3, 5, 16), jnp.float64)
        np.testing.assert_allclose(standardize(x, 1e-5), plain(x), rtol=1e-13, atol=1e-13)
        got = jax.grad(lambda x: (jnp.sin(standardize(x, 1e-5)) * w).sum())(x)
        want = jax.grad(lambda x: (jnp.sin(plain(x)) * w).sum())(x)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
    x16 = jnp.ones((2, 8), jnp.bfloat16).at[:, 0].set(3)
    assert jax.grad(lambda x: standardize(x, 1e-5).astype(jnp.float32).sum())(x16).dtype == jnp.bfloat16


def test_gelu_gradient_equals_autodiff_of_the_tanh_form():
    from ode_lm.nn.layers import gelu

    with jax.enable_x64(True):
        h = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float64)
        np.testing.assert_array_equal(gelu(h), jax.nn.gelu(h, approximate=True))
        got = jax.vmap(jax.grad(gelu))(h)
        want = jax.vmap(jax.grad(lambda x: jax.nn.gelu(x, approximate=True)))(h)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    h16 = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.bfloat16)
    assert jax.grad(lambda h: gelu(h).astype(jnp.float32).sum())(h16).dtype == jnp.bfloat16


@eqx.filter_jit
def _logits_and_grads(models, tokens, ode):
    """Each model's logits and the gradient of ``sum(sin(logits))`` (one compilation for all)."""
    def loss(model):
        logits, _ = model(tokens, ode)
        return jnp.sum(jnp.sin(logits)), logits
    return [eqx.filter_grad(loss, has_aux=True)(model)[::-1] for model in models]


@pytest.mark.parametrize("family", ["time_indexed"] + [pytest.param(f, marks=pytest.mark.slow)
                                                     for f in ("constant", "time_indexed_ssm")])
def test_gates_on_weights_or_on_activations_are_one_model(family):
    """``model.gate_apply``: ``x (W * g) + b`` and ``(x W) * g + b`` (norm gains, the attention's
    value bias and the MLP included) give the same logits and parameter gradients, float64
    within 1e-12; ``auto`` on a few-token input takes the activations path, and it agrees too."""
    with jax.enable_x64(True):
        ode = ODEConfig(steps=2)
        tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, VOCAB)
        kw = dict(ssm_form="head", ssm_heads=2) if family == "time_indexed_ssm" else {}
        models = [small_model(family, jnp.float64, gate_apply=mode, **kw) for mode in ("weights", "activations")]
        (weights, g_weights), (acts, g_acts) = _logits_and_grads(models, tokens, ode)
        scale = float(jnp.abs(weights).max())
        assert float(jnp.abs(acts - weights).max()) <= 1e-12 * scale
        for a, w in zip(jax.tree.leaves(g_acts), jax.tree.leaves(g_weights)):
            assert float(jnp.abs(a - w).max()) <= 1e-12 * max(float(jnp.abs(w).max()), 1e-30)
        short = tokens[:1, :4]  # 4 tokens < dim: auto gates the activations
        auto, _ = forward(small_model(family, jnp.float64, gate_apply="auto", **kw), short, ode)
        np.testing.assert_allclose(auto, weights[:1, :4], rtol=0, atol=1e-12 * scale)
