"""The baselines are the published models: GPT-2's dropout and init, Tong et al.'s dense
hypernetwork, and dropout masks that are shared or renewed exactly where the config says.

(The GPT-2 forward itself is checked against an independent NumPy GPT-2 in
test_gpt2_reference.py.)
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.config import ConfigError, ModelConfig, ODEConfig, config_from_dict, load_config
from ode_lm.models import build_model, count_parameters
from ode_lm.nn import Dropout, DropoutRates
from ode_lm.nn.dropout import ATTENTION, keep_mask

VOCAB = 32
SMALL = dict(dim=16, heads=2, mlp_ratio=2, max_positions=16, time_embed_dim=8, modulation_hidden=8,
             hyper_hidden=4, layers=3, init_std=0.3, dropout=0.0)


def small(family, dtype=jnp.float32, **kw):
    return build_model(ModelConfig(family=family, **{**SMALL, **kw}), VOCAB, jax.random.key(0), dtype)


def tokens(seq=10):
    return jax.random.randint(jax.random.key(1), (2, seq), 0, VOCAB)


# ---- config: one shorthand, three rates --------------------------------------------------

def test_dropout_shorthand_sets_the_three_rates_and_explicit_rates_win(tmp_path):
    m = config_from_dict({"model": {"dropout": 0.2}}).model
    assert (m.embd_dropout, m.attn_dropout, m.resid_dropout) == (0.2, 0.2, 0.2)
    m = config_from_dict({"model": {"dropout": 0.2, "attn_dropout": 0.0}}).model
    assert (m.embd_dropout, m.attn_dropout, m.resid_dropout) == (0.2, 0.0, 0.2)
    assert ModelConfig(dropout=0.0).resid_dropout == 0.0  # made in code, too
    # A resolved config (a run's config.toml) re-derives the rates from an overriding shorthand.
    resolved = tmp_path / "config.toml"
    resolved.write_text(config_from_dict({"model": {"dropout": 0.1}}).to_toml())
    m = load_config(resolved, ["model.dropout=0.3"]).model
    assert (m.embd_dropout, m.attn_dropout, m.resid_dropout) == (0.3, 0.3, 0.3)
    m = load_config(resolved, ["model.dropout=0.3", "model.embd_dropout=0.0"]).model
    assert (m.embd_dropout, m.attn_dropout) == (0.0, 0.3)
    again = config_from_dict({"model": {"dropout": 0.1}}).replace(**{"model.dropout": 0.4}).model
    assert again.attn_dropout == 0.4


def test_a_config_stored_before_the_published_forms_loads_as_the_model_it_trained():
    from ode_lm.config import config_from_toml

    old = config_from_dict({"model": {"family": "standard"}}).to_toml()
    for key in ("block", "hyper_form", "attn_dropout", "embd_dropout", "resid_dropout", "dropout_masks", "bias"):
        old = "\n".join(line for line in old.splitlines() if not line.startswith(f"{key} ="))
    m = config_from_toml(old, "old checkpoint").model
    assert (m.block, m.attn_dropout, m.resid_dropout, m.sequential) == ("parallel", 0.0, 0.1, False)
    hyper = config_from_toml(old.replace('family = "standard"', 'family = "hypernetwork"'), "old").model
    assert (hyper.block, hyper.hyper_form) == ("auto", "rank_one")
    new = config_from_toml(config_from_dict({"model": {"family": "standard"}}).to_toml(), "new").model
    assert (new.block, new.attn_dropout, new.sequential) == ("auto", 0.1, True)


def test_block_form_and_mask_rules_are_checked():
    assert config_from_dict({"model": {"family": "standard"}}).model.sequential
    assert not config_from_dict({"model": {"family": "time_indexed"}}).model.sequential
    assert not config_from_dict({"model": {"family": "standard", "block": "parallel"}}).model.sequential
    with pytest.raises(ConfigError, match="parallel block as its vector field"):
        config_from_dict({"model": {"family": "time_indexed", "block": "sequential"}})
    with pytest.raises(ConfigError, match='dropout_masks = "per_step"'):
        config_from_dict({"model": {"dropout_masks": "per_step"}, "ode": {"solver": "heun", "adaptive": True}})
    with pytest.raises(ConfigError, match='dropout_masks = "per_step"'):
        config_from_dict({"model": {"dropout_masks": "per_step"}, "ode": {"adjoint": "backsolve"}})


# ---- GPT-2's init and biases --------------------------------------------------------------

def test_residual_projections_start_at_init_std_over_sqrt_two_layers():
    cfg = ModelConfig(family="standard", dim=256, heads=4, layers=6, max_positions=8)
    model = build_model(cfg, VOCAB, jax.random.key(0))
    want = cfg.init_std / math.sqrt(2 * cfg.layers)
    proj = np.concatenate([np.ravel(b.attn.proj.weight) for b in model.layers])
    fc2 = np.concatenate([np.ravel(b.mlp.fc2.weight) for b in model.layers])
    qkv = np.concatenate([np.ravel(b.attn.qkv.weight) for b in model.layers])
    assert abs(proj.std() / want - 1) < 0.01 and abs(fc2.std() / want - 1) < 0.01
    assert abs(qkv.std() / cfg.init_std - 1) < 0.01  # the other matrices keep init_std


def test_bias_false_removes_every_linear_and_layer_norm_bias():
    with_bias, without = small("standard"), small("standard", bias=False)
    d, r, layers = SMALL["dim"], SMALL["mlp_ratio"], SMALL["layers"]
    biases = layers * (3 * d + d + r * d + d + 2 * d) + d  # four Linears, two norms per layer; final norm
    assert count_parameters(with_bias) - count_parameters(without) == biases
    norm = without.layers[0].ln_attn
    x = jax.random.normal(jax.random.key(2), (3, d))
    np.testing.assert_allclose(norm(x), norm.standardize(x) * norm.weight, atol=1e-6)
    logits, _ = without(tokens(), None)
    assert bool(jnp.isfinite(logits).all())


# ---- where dropout acts -------------------------------------------------------------------

def test_attention_dropout_masks_the_probabilities_and_nothing_else():
    with jax.enable_x64(True):
        block = small("standard", jnp.float64).layers[0]
        block = eqx.tree_at(lambda b: (b.attn.qkv.bias, b.attn.proj.bias),  # nonzero biases too
                            block, (jnp.linspace(-1, 1, 3 * SMALL["dim"]), jnp.linspace(1, -1, SMALL["dim"])))
        x = jax.random.normal(jax.random.key(3), (2, 6, SMALL["dim"]), jnp.float64)
        drop = Dropout(jax.random.key(4), DropoutRates(attn=0.5))
        # The MLP branch and the embeddings do not see an attention-only dropout...
        np.testing.assert_array_equal(block.mlp_branch(x, dropout=drop), block.mlp_branch(x))
        np.testing.assert_array_equal(drop.embedding(x), x)
        # ... and the attention branch is the textbook formula with the probabilities masked.
        attn, heads, hd = block.attn, 2, SMALL["dim"] // 2
        h = block.ln_attn(x)
        q, k, v = jnp.split(h @ attn.qkv.weight + attn.qkv.bias, 3, axis=-1)
        split = lambda a: a.reshape(2, 6, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
        scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((6, 6), bool)), scores, -jnp.inf), axis=-1)
        mask = keep_mask(jax.random.fold_in(drop.key, ATTENTION), 0.5, probs.shape, probs.dtype)
        out = (probs * mask) @ split(v)
        want = out.transpose(0, 2, 1, 3).reshape(2, 6, -1) @ attn.proj.weight + attn.proj.bias
        np.testing.assert_allclose(block.attention_branch(x, dropout=drop), want, atol=1e-12)
        assert float(jnp.abs(want - block.attention_branch(x)).max()) > 1e-3


def test_standard_draws_independent_masks_per_layer():
    model = small("standard", resid_dropout=0.5)
    key = jax.random.key(5)
    drop = Dropout(key, model.dropout)
    ones = jnp.ones((2, 10, SMALL["dim"]))
    assert float(jnp.abs(drop.at(0).mlp_out(ones) - drop.at(1).mlp_out(ones)).max()) > 0
    got, _ = model.hidden_final(tokens(), key=key)
    x = model.embedding(tokens())
    for n, block in enumerate(model.layers):
        x = x + block.attention_branch(x, dropout=drop.at(n))
        x = x + block.mlp_branch(x, dropout=drop.at(n))
    np.testing.assert_allclose(got, x, atol=1e-5)


@pytest.mark.parametrize("masks", ["per_solve", "per_step"])
def test_ode_masks_are_fixed_over_a_solve_or_renewed_per_step(masks):
    model = small("time_indexed", resid_dropout=0.5, embd_dropout=0.3, dropout_masks=masks)
    key, steps = jax.random.key(6), 3
    got, _ = model.hidden_final(tokens(), ODEConfig(solver="euler", steps=steps), key=key)
    drop = Dropout(key, model.dropout, per_step=masks == "per_step")
    x = drop.embedding(model.embedding(tokens()))
    for n in range(steps):
        field = eqx.tree_at(lambda f: f.dropout, model.field, drop.at(n) if masks == "per_step" else drop,
                            is_leaf=lambda v: v is None)
        x = x + field(jnp.asarray(n / steps), x) / steps
    np.testing.assert_allclose(got, x, atol=1e-5)
    other = small("time_indexed", resid_dropout=0.5, embd_dropout=0.3,
                  dropout_masks="per_step" if masks == "per_solve" else "per_solve")
    assert float(jnp.abs(other.hidden_final(tokens(), ODEConfig(solver="euler", steps=steps), key=key)[0]
                         - got).max()) > 1e-3


def test_no_dropout_without_a_key():
    model = small("time_indexed", dropout=0.5)
    forward = eqx.filter_jit(lambda m, key: m(tokens(), ODEConfig(steps=2), key=key)[0])
    a, b, c = forward(model, None), forward(model, None), forward(model, jax.random.key(0))
    assert float(jnp.abs(a - b).max()) == 0.0 and float(jnp.abs(a - c).max()) > 1e-3


# ---- Tong et al.'s dense hypernetwork -----------------------------------------------------

def dense_parameters(d, r, s, e, bias=True):
    """The docstring's formula: six time embeddings, dense maps with their bias, norms."""
    embedding = s * e + e + e * e + e
    shapes = [(d, 3 * d), (d, d), (d, r * d), (r * d, d)]
    return (6 * embedding + sum((e + 1) * a * b + bias * e * b for a, b in shapes)
            + 2 * (1 + bias) * e * d)


def test_dense_hypernetwork_has_the_published_parameter_count():
    from ode_lm.models.accounting import parameter_counts

    cfg = load_config("configs/hypernetwork.toml").model
    shapes = eqx.filter_eval_shape(build_model, cfg, 256, jax.random.key(0))
    counts = parameter_counts(shapes)
    assert counts["hypernetwork"] == dense_parameters(cfg.dim, cfg.mlp_ratio, cfg.time_embed_dim, cfg.hyper_hidden)
    assert "block" not in counts and 51.0e6 < sum(counts.values()) < 52.0e6  # the study's 51.5M
    no_bias = eqx.filter_eval_shape(build_model, ModelConfig(**{**SMALL, "family": "hypernetwork", "bias": False}),
                                    VOCAB, jax.random.key(0))
    assert parameter_counts(no_bias)["hypernetwork"] == dense_parameters(16, 2, 8, 4, bias=False)


def test_dense_hypernetwork_generates_w_of_t_by_hand():
    from ode_lm.nn import sinusoidal

    field = small("hypernetwork").field
    hyper, t = field.hypernetwork, 0.37
    # Perturb the zero-initialised parts so every term is exercised.
    leaves, tree = jax.tree.flatten(hyper)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    hyper = jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    field = eqx.tree_at(lambda f: f.hypernetwork, field, hyper)
    phi = np.asarray(sinusoidal(t, SMALL["time_embed_dim"]), np.float64)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731

    def e(emb):
        l1, l2 = emb.l1, emb.l2
        return silu(phi @ np.asarray(l1.weight) + np.asarray(l1.bias)) @ np.asarray(l2.weight) + np.asarray(l2.bias)

    block, _ = eqx.filter_jit(field.block_at)(jnp.asarray(t))
    generated = [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2]
    for lin, gen in zip(hyper.linears, generated):
        et = e(lin.embed)
        w = np.asarray(lin.base) + np.einsum("k,kio->io", et, np.asarray(lin.maps))
        np.testing.assert_allclose(gen.weight, w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gen.bias, et @ np.asarray(lin.bias_map), rtol=1e-5, atol=1e-5)
    for norm, ln in zip(hyper.norms, [block.ln_attn, block.ln_mlp]):
        et = e(norm.embed)
        np.testing.assert_allclose(ln.weight, 1 + et @ np.asarray(norm.gain_map), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ln.bias, et @ np.asarray(norm.shift_map), rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(8), (2, 8, SMALL["dim"]))
    np.testing.assert_allclose(eqx.filter_jit(field)(jnp.asarray(t), x), eqx.filter_jit(block)(x), atol=1e-5)


def _hypernetwork_grads(model, configs):
    toks = tokens(8)
    targets = jnp.roll(toks, -1, axis=1)

    @eqx.filter_jit
    def all_grads(m):
        def loss(m, ode):
            logits, _ = m(toks, ode)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
        return [jax.tree.leaves(eqx.filter_grad(loss)(m, ode)) for ode in configs]

    return all_grads(model)


def _rel(a, b):
    return math.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b))) / math.sqrt(
        sum(float(jnp.sum(y ** 2)) for y in b))


def test_dense_hypernetwork_gradients_agree_between_checkpoint_and_direct():
    with jax.enable_x64(True):
        model = small("hypernetwork", jnp.float64, init_std=0.3)
        fixed = dict(solver="heun", steps=2)
        direct, *checkpoints = _hypernetwork_grads(model, [
            ODEConfig(**fixed, adjoint="direct"), ODEConfig(**fixed, adjoint="checkpoint"),
            ODEConfig(**fixed, adjoint="checkpoint", checkpoint_saves="matmuls")])
        for g in checkpoints:
            assert _rel(g, direct) <= 1e-10


@pytest.mark.slow
def test_dense_hypernetwork_backsolve_and_reversible_gradients_agree_with_direct():
    with jax.enable_x64(True):
        model = small("hypernetwork", jnp.float64, init_std=0.3)
        tight = dict(solver="dopri5", steps=4, adaptive=True, rtol=1e-10, atol=1e-10, max_steps=4096)
        direct, backsolve, reversible = _hypernetwork_grads(model, [
            ODEConfig(**tight, adjoint="direct"), ODEConfig(**tight, adjoint="backsolve"),
            ODEConfig(**tight, adjoint="reversible")])
        assert _rel(backsolve, direct) <= 1e-4
        assert _rel(reversible, direct) <= 1e-4
