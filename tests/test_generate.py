"""Generation: the cached ODE solve equals full recomputation, compiles once, samples right."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.cli import main
from ode_lm.config import FAMILIES, SOLVERS, ModelConfig, ODEConfig
from ode_lm.errors import UserError
from ode_lm.generate import TRACES, Sampling, TextStream, generate, greedy_logits, sample
from ode_lm.generate.sampling import top_k_filter, top_p_filter
from ode_lm.models import build_model
from ode_lm.ode import VectorField, grid_scheme, integrate
from ode_lm.data import ByteTokenizer

VOCAB, PROMPT, DECODED = 32, 8, 64
FIXED_STEP_SOLVERS = SOLVERS  # every solver runs on a fixed grid; all must cache exactly


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(dim=16, heads=2, mlp_ratio=2, max_positions=PROMPT + DECODED, dropout=0.0,
                      time_embed_dim=8, modulation_hidden=8, init_std=0.3)
    return build_model(cfg, VOCAB, jax.random.key(0))


def tokens(n=PROMPT, seed=1):
    return jax.random.randint(jax.random.key(seed), (2, n), 0, VOCAB)


def greedy_decode(model, prompt, cache):
    return greedy_logits(model, prompt, cache, DECODED)


class Field(VectorField):
    def __call__(self, t, x):
        return jnp.sin(3.0 * t) * x - 0.5 * x**2 + jnp.cos(x)


@pytest.mark.parametrize("solver", FIXED_STEP_SOLVERS)
def test_grid_loop_reproduces_integrate(solver):
    ode = ODEConfig(solver=solver, steps=5)
    x0 = jnp.linspace(-1.0, 1.0, 7)
    expected, _ = jax.jit(integrate, static_argnums=2)(Field(), x0, ode)
    scheme = grid_scheme(solver)
    solve = jax.jit(lambda x: scheme.solve(lambda slot, t, x, n: (Field()(t, x), n + 1),
                                           jnp.linspace(0.0, 1.0, 6), x, 0))
    got, calls = solve(x0)
    assert float(jnp.abs(got - expected).max()) <= 1e-5
    assert int(calls) == scheme.slots(5)


def assert_cached_equals_full_recompute(model, solver, decode_weights="auto"):
    ode = ODEConfig(solver=solver, steps=2)
    prompt = tokens()
    new, cached = greedy_decode(model, prompt, model.init_cache(prompt, ode, PROMPT + DECODED, decode_weights))
    # One causal forward pass over the whole sequence gives, at every position, the logits
    # a full recomputation of that prefix gives.
    full, _ = eqx.filter_jit(model)(jnp.concatenate([prompt, new], axis=1), ode)
    assert float(jnp.abs(cached - full).max()) <= 1e-4
    # Greedy recomputation would pick the same tokens: argmax of the full logits.
    np.testing.assert_array_equal(jnp.argmax(full[:, PROMPT - 1:-1], axis=-1), new)


@pytest.mark.parametrize("solver", FIXED_STEP_SOLVERS)
def test_cached_decoding_equals_full_recompute(model, solver):
    assert_cached_equals_full_recompute(model, solver)


@pytest.mark.parametrize("family", ["time_indexed", "time_indexed_ssm", "hypernetwork"])
@pytest.mark.parametrize("decode_weights", ["per_evaluation", "shared"])
def test_cached_decoding_is_exact_with_either_decode_weights(family, decode_weights):
    """Gates folded into each evaluation's weights, or one copy of the weights with the gates
    on the products' outputs (the hypernetwork's block changes with t: always its own)."""
    model = family_model(family)
    cache = model.init_cache(tokens(), ODEConfig(solver="heun", steps=2), PROMPT + DECODED, decode_weights)
    shares = decode_weights == "shared" and family != "hypernetwork"
    assert cache.blocks.w_in.ndim == (2 if shares else 3)  # one copy, or one per evaluation
    assert_cached_equals_full_recompute(model, "heun", decode_weights)


def family_model(family, **kw):
    cfg = ModelConfig(family=family, dim=16, heads=2, mlp_ratio=2, layers=3, max_positions=PROMPT + DECODED,
                      dropout=0.0, time_embed_dim=8, modulation_hidden=8, hyper_hidden=8, ssm_state_size=4,
                      init_std=0.3, **kw)
    return build_model(cfg, VOCAB, jax.random.key(0))


@pytest.mark.parametrize("family, form", [("hypernetwork", {"hyper_form": "rank_one"}),
                                          ("standard", {"block": "parallel"})])
def test_cached_decoding_equals_full_recompute_in_the_other_forms(family, form):
    """The rank-one hypernetwork and the parallel discrete model decode exactly too."""
    assert_cached_equals_full_recompute(family_model(family, **form), "rk4")


# The default run checks every family under a multi-stage solver; -m slow runs the product.
@pytest.mark.parametrize("family, solver", [
    pytest.param(f, s, marks=[] if s == "rk4" else pytest.mark.slow)
    for f in FAMILIES if f != "time_indexed" for s in FIXED_STEP_SOLVERS])
def test_cached_decoding_equals_full_recompute_every_family(family, solver):
    assert_cached_equals_full_recompute(family_model(family), solver)


def test_cached_decoding_equals_full_recompute_ssm_head_form():
    """Form 'head': the cache carries the recurrent state; the full pass runs the chunked
    (matrix-product) scan with chunks that do not divide the sequence."""
    assert_cached_equals_full_recompute(family_model("time_indexed_ssm", ssm_form="head", ssm_heads=2,
                                                     ssm_scan="chunked", ssm_chunk=7), "euler")


def test_cache_is_exact_only_with_the_right_slots(model):
    """A cache filled by another solver's evaluations gives other logits."""
    prompt = tokens()
    ode = ODEConfig(solver="heun", steps=2)
    new, _ = greedy_decode(model, prompt, model.init_cache(prompt, ode, PROMPT + DECODED))
    wrong = model.init_cache(prompt, ODEConfig(solver="midpoint", steps=2), PROMPT + DECODED)
    full, _ = eqx.filter_jit(model)(jnp.concatenate([prompt, new], axis=1), ode)
    assert float(jnp.abs(greedy_decode(model, prompt, wrong)[1] - full).max()) > 1e-3


def test_generate_cached_equals_recompute_and_compiles_once(model):
    ode = ODEConfig(solver="midpoint", steps=2)
    kw = dict(max_new_tokens=DECODED, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2)
    before = TRACES.copy()
    streamed = []
    cached = generate(model, np.arange(5), ode, seed=3, on_token=streamed.append, **kw)
    np.testing.assert_array_equal(np.stack(streamed, 1), cached)
    np.testing.assert_array_equal(cached, generate(model, np.arange(5), ode, seed=3, cache=False, **kw))
    np.testing.assert_array_equal(cached, generate(model, np.arange(5), ode, seed=3, **kw))  # device loop
    generate(model, np.arange(5), ode, seed=4, on_token=lambda t: None, **kw)
    generate(model, np.arange(5), ode, seed=4, **kw)
    grown = {k: TRACES[k] - before[k] for k in ("prefill", "decode", "decode_many", "recompute")}
    # One compile for a whole generation (the position is traced), none for a new seed.
    assert grown == {"prefill": 1, "decode": 1, "decode_many": 1, "recompute": 1}, grown


@pytest.mark.parametrize("sampling", [dict(greedy=True), dict(temperature=1.0, top_k=10, top_p=0.9,
                                                               repetition_penalty=1.2)])
def test_chunked_device_decoding_gives_the_per_token_tokens(model, sampling):
    """Streaming in device-side chunks (a short last chunk included) picks exactly the tokens
    of one call per token, for a fixed seed (one loop for everything: the test above)."""
    ode = ODEConfig(steps=1)
    kw = dict(max_new_tokens=20, seed=7, num_samples=2, **sampling)
    per_token = []
    expected = generate(model, np.arange(6), ode, chunk=1, on_token=per_token.append, **kw)
    np.testing.assert_array_equal(np.stack(per_token, 1), expected)
    streamed = []
    np.testing.assert_array_equal(generate(model, np.arange(6), ode, chunk=8, on_token=streamed.append, **kw),
                                  expected)  # chunks of 8, 8 and 3 after the prefill's token
    np.testing.assert_array_equal(np.stack(streamed, 1), expected)


def test_several_prompts_decode_as_one_batch(model):
    """A [prompts, length] array: each prompt's rows are what it gives alone (greedy)."""
    ode = ODEConfig(steps=1)
    prompts = np.asarray(tokens(6))
    both = generate(model, prompts, ode, greedy=True, max_new_tokens=12, num_samples=2)
    assert both.shape == (4, 12)
    for i, prompt in enumerate(prompts):
        alone = generate(model, prompt, ode, greedy=True, max_new_tokens=12)
        np.testing.assert_array_equal(both[2 * i: 2 * i + 2], np.tile(alone, (2, 1)))


@pytest.mark.parametrize("rtol, bound", [pytest.param(1e-3, 0.5, marks=pytest.mark.slow), (1e-6, 1e-3)])
def test_adaptive_frozen_grid_deviation_follows_the_tolerance(model, rtol, bound):
    """Adaptive decoding reuses the prompt's grid: off full recompute by about the solver error.

    Measured here (tiny model): 0.15 at rtol 1e-3, 2.5e-4 at rtol 1e-6.
    """
    prompt = tokens()
    ode = ODEConfig(solver="tsit5", adaptive=True, steps=2, rtol=rtol, atol=rtol)
    new, cached = greedy_decode(model, prompt, model.init_cache(prompt, ode, PROMPT + DECODED))
    # Reference: an adaptive solve of the whole sequence, on the grid it picks itself.
    full, _ = eqx.filter_jit(model)(jnp.concatenate([prompt, new], axis=1), ode)
    assert float(jnp.abs(cached[:, PROMPT:] - full[:, PROMPT:]).max()) <= bound


def test_sliding_window_matches_recompute(model):
    ode = ODEConfig(steps=2)
    prompt = np.arange(60) % VOCAB  # the context fills after 12 new tokens, then every 10
    kw = dict(max_new_tokens=40, window=10, temperature=1.0, seed=5)
    cached = generate(model, prompt, ode, **kw)
    assert cached.shape == (1, 40)
    np.testing.assert_array_equal(cached, generate(model, prompt, ode, cache=False, **kw))


def test_seed_reproduces_and_samples_differ(model):
    ode = ODEConfig(steps=2)
    a = generate(model, np.arange(5), ode, max_new_tokens=16, temperature=1.0, seed=0, num_samples=3)
    b = generate(model, np.arange(5), ode, max_new_tokens=16, temperature=1.0, seed=0, num_samples=3)
    assert a.shape == (3, 16)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(row) for row in a}) > 1  # independent samples in one batch


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert np.isfinite(np.asarray(top_k_filter(logits, 2))).tolist() == [[True, True, False, False, False]]
    # top-p keeps the smallest set of most likely tokens reaching p: 0.5 + 0.2 >= 0.6.
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.6))).sum() == 2
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.7001))).sum() == 3
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.01))).sum() == 1
    seen = jnp.array([[True, False, False, False, False]])
    greedy = Sampling(1.0, 0, 1.0, 1.0, True)
    assert int(sample(logits, seen, jax.random.key(0), greedy)[0]) == 0
    # A penalty of 4 turns 0.5 into exp(log 0.5 * 4) = 0.0625 < 0.2: token 1 wins.
    assert int(sample(logits, seen, jax.random.key(0), greedy._replace(repetition_penalty=4.0))[0]) == 1
    # Temperature: empirical frequencies follow softmax(logits / T).
    s = Sampling(2.0, 0, 1.0, 1.0, False)
    draws = jax.vmap(lambda k: sample(logits, ~seen | seen, k, s)[0])(jax.random.split(jax.random.key(1), 20000))
    freq = np.bincount(np.asarray(draws), minlength=5) / 20000
    np.testing.assert_allclose(freq, jax.nn.softmax(logits[0] / 2.0), atol=0.015)


def test_stream_holds_back_split_utf8():
    stream = TextStream(ByteTokenizer())
    out = [stream.push(b) for b in "aé€".encode()]
    assert out == ["a", "", "é", "", "", "€"]
    stream.push(0xC3)
    assert stream.flush() == "\ufffd"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompt_ids=[]), "prompt is empty"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=PROMPT + DECODED), "max_positions"),
    (dict(prompt_ids=[VOCAB]), "token ids"),
    (dict(window=PROMPT + DECODED), "window"),
    (dict(prompt_ids=[[1, 2], [3]]), "prompts of one length"),
    (dict(prompt_ids=np.zeros((2, 2, 2), int)), "prompts of one length"),
])
def test_bad_input_is_a_user_error(model, kwargs, needle):
    kwargs = {"prompt_ids": [1, 2], **kwargs}
    with pytest.raises(UserError, match=needle):
        generate(model, kwargs.pop("prompt_ids"), ODEConfig(), **kwargs)


@pytest.mark.parametrize("args, needle", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--prompt", "x"], "no such run directory"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, args, needle):
    assert main(["generate", str(tmp_path / "missing"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
