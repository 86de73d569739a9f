"""The SSM's scans: chunked == sequential (both forms), Mamba-2's head form against a plain
loop, stability over long sequences, memory that does not grow with the sequence."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.config import ConfigError, config_from_dict
from ode_lm.nn import SelectiveSSM
from ode_lm.nn.ssm import ssd_scan

DIM, STATE, HEADS = 8, 4, 2


def random_ssm(form, scan, chunk=8, dtype=jnp.float32, dim=DIM, state=STATE, key=0, **kwargs):
    ssm = SelectiveSSM(dim, state, 8, 16, key=jax.random.key(key), std=0.5, dtype=dtype, scan=scan,
                       form=form, heads=HEADS, chunk=chunk, **kwargs)
    # Perturb every parameter so the test does not lean on the initialisation.
    leaves, tree = jax.tree.flatten(ssm)
    keys = jax.random.split(jax.random.key(key + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@eqx.filter_jit
def output_and_gradients(ssm, x, cotangent, t):
    """``g(x, t)`` and the gradients of ``<cotangent, g>`` in the parameters and in ``x``."""
    y, pullback = jax.vjp(lambda m, x: m(x, t), ssm, x)
    return y, pullback(cotangent)


def max_relative_error(a, b):
    return max(float(jnp.abs(u - v).max() / jnp.maximum(jnp.abs(v).max(), 1e-30))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# (seq, chunk): a chunk that divides the sequence and one that does not; the slow run adds
# seq 1, a chunk longer than the sequence and the associative scan.
CASES = [(24, 8), (24, 7)]
SLOW_CASES = [(1, 8), (5, 8), (24, "associative")]


def check_scans_equal_sequential(form, dtype, tol, cases, **kwargs):
    with jax.enable_x64(dtype == jnp.float64):
        reference = random_ssm(form, "sequential", dtype=dtype)
        t = jnp.asarray(0.4, dtype)
        for seq, chunk in cases:
            k1, k2 = jax.random.split(jax.random.key(seq))
            x = jax.random.normal(k1, (2, seq, DIM), dtype)
            cotangent = jax.random.normal(k2, x.shape, dtype)
            expected = output_and_gradients(reference, x, cotangent, t)
            scan = random_ssm(form, "associative", dtype=dtype) if chunk == "associative" else \
                random_ssm(form, "chunked", chunk, dtype=dtype, **kwargs)
            got = output_and_gradients(scan, x, cotangent, t)
            assert float(jnp.abs(expected[0]).max()) > 1e-2
            assert max_relative_error(got, expected) <= tol, (seq, chunk)


@pytest.mark.parametrize("form", ["channel", "head"])
def test_chunked_scan_equals_the_sequential_recurrence_in_float32(form):
    """Outputs and gradients (parameters and inputs) within 1e-5 of the recurrence's."""
    check_scans_equal_sequential(form, jnp.float32, 1e-5, CASES)


@pytest.mark.parametrize("carry", ["matmul", pytest.param("scan", marks=pytest.mark.slow)])
def test_head_form_state_passing_by_product_or_scan_equals_the_sequential_recurrence(carry):
    """Form 'head', ``model.ssm_carry``: chunk starting states by one masked product over
    chunks or by a loop; float64 outputs and gradients within 1e-12 of the recurrence over
    seven chunks, the last one padded."""
    check_scans_equal_sequential("head", jnp.float64, 1e-12, [(40, 6)], carry=carry)


def test_head_form_products_in_bf16_stay_within_bf16_rounding():
    """``model.ssm_products = compute``: products fed bf16 inputs move the scan's outputs and
    gradients by about bf16 rounding (2^-8 relative), no more."""
    ssm = random_ssm("head", "chunked", 7)
    f = SelectiveSSM.factors(ssm, jax.random.normal(jax.random.key(5), (2, 24, DIM)), jnp.asarray(0.4))
    cotangent = jax.random.normal(jax.random.key(6), f.u.shape)

    @jax.jit
    def wide_and_low(f):  # one compilation for both
        def scan_and_gradients(products):
            y, pullback = jax.vjp(lambda f: ssd_scan(f, 7, "matmul", products), f)
            return y, pullback(cotangent)
        return scan_and_gradients(None), scan_and_gradients(jnp.bfloat16)

    wide, low = wide_and_low(f)
    assert low[0].dtype == jnp.float32
    assert 1e-5 < max_relative_error(low, wide) <= 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("form", ["channel", "head"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)])
def test_chunked_and_associative_scans_equal_the_sequential_recurrence(form, dtype, tol):
    check_scans_equal_sequential(form, dtype, tol, (CASES if dtype == jnp.float64 else []) + SLOW_CASES)


@pytest.mark.slow
def test_chunked_scan_of_one_position_is_one_step():
    """seq 1: the chunked scan (chunk 8 > seq) is one step of the recurrence from h_0 = 0."""
    for form in ("channel", "head"):
        ssm = random_ssm(form, "chunked")
        x = jax.random.normal(jax.random.key(9), (3, 1, DIM))
        _, expected = eqx.filter_jit(SelectiveSSM.step)(ssm, ssm.init_state(3), x[:, 0], jnp.asarray(0.2))
        got = eqx.filter_jit(lambda m, x: m(x, jnp.asarray(0.2)))(ssm, x)
        np.testing.assert_allclose(got[:, 0], expected, rtol=1e-6, atol=1e-6 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("carry", ["matmul", "scan"])
def test_head_form_chunks_equal_a_plain_loop_of_mamba2_recurrence(carry):
    """Form 'head': ``h_k[c,n] = exp(Delta_k[h] A[h]) h_{k-1}[c,n] + Delta_k[h] u_k[c] B_k[n]``,
    ``y_k[c] = C_k . h_k[c]``, written here as a float64 NumPy loop over positions."""
    with jax.enable_x64(True):
        ssm = random_ssm("head", "chunked", dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(4), (2, 19, DIM), jnp.float64)
        f = eqx.filter_jit(SelectiveSSM.factors)(ssm, x, jnp.asarray(0.7, jnp.float64))
        got = np.asarray(jax.jit(ssd_scan, static_argnums=(1, 2))(f, 6, carry))
    delta, a, u, b, c = (np.asarray(v) for v in (f.delta, f.a, f.u, f.b, f.c))
    assert a.shape == (HEADS, 1) and (a < 0).all() and delta.shape == (2, 19, HEADS)
    p = DIM // HEADS
    y = np.zeros_like(u)
    for batch in range(2):
        h = np.zeros((DIM, STATE))
        for k in range(19):
            for head in range(HEADS):
                rows = slice(head * p, (head + 1) * p)
                h[rows] = (np.exp(delta[batch, k, head] * a[head, 0]) * h[rows]
                           + delta[batch, k, head] * np.outer(u[batch, k, rows], b[batch, k]))
            y[batch, k] = h @ c[batch, k]
    np.testing.assert_allclose(got, y, rtol=1e-12, atol=1e-12 * np.abs(y).max())


@pytest.mark.parametrize("form", ["channel", "head"])
def test_chunked_scan_stays_bounded_over_4096_steps(form):
    """64 chunks of random input: finite, and the last thousand steps peak about as high as
    the first thousand (no growth carried from chunk to chunk)."""
    x = jax.random.normal(jax.random.key(6), (2, 4096, DIM))
    y = eqx.filter_jit(lambda m, x: m(x, jnp.asarray(0.5)))(random_ssm(form, "chunked", 64), x)
    peaks = jnp.abs(y).max(axis=(0, 2))
    assert bool(jnp.isfinite(peaks).all())
    assert float(peaks[-1000:].max()) <= 2.0 * float(peaks[:1000].max())


def step_temp_bytes(form, scan, seq, batch=2, dim=64, state=64, chunk=16):
    """Temporary bytes of the compiled forward + backward pass (XLA's memory analysis), and
    the bytes of one ``batch x seq x dim x state`` float32 tensor."""
    ssm = SelectiveSSM(dim, state, 8, 16, key=jax.random.key(0), std=0.1, scan=scan, form=form, heads=2,
                       chunk=chunk)
    x = jax.ShapeDtypeStruct((batch, seq, dim), jnp.float32)
    loss = jax.jit(jax.grad(lambda m, x: jnp.sum(m(x, jnp.asarray(0.3)) ** 2)))
    return loss.lower(ssm, x).compile().memory_analysis().temp_size_in_bytes, batch * seq * dim * state * 4


@pytest.mark.slow  # four compiled backward passes; scripts/bench_families.py records the same per step
def test_chunked_scan_memory_does_not_scale_with_seq_times_state():
    """The chunked scan's temporaries (the sequential and associative scans' exceed one
    ``batch x seq x dim x state`` tensor) stay below that tensor and grow by a small fraction
    of it, whether the sequence grows (form 'channel': states exist one chunk at a time, plus one per chunk boundary)
    or the state (form 'head': only the chunk-boundary states have a state axis)."""
    for form, small, large in (("channel", dict(seq=128), dict(seq=1024)),
                               ("head", dict(seq=512, state=16, chunk=64), dict(seq=512, state=64, chunk=64))):
        (temp_small, full_small), (temp_large, full_large) = (step_temp_bytes(form, "chunked", **kw)
                                                              for kw in (small, large))
        assert temp_large < full_large, form
        assert temp_large - temp_small < 0.25 * (full_large - full_small), (form, temp_small, temp_large)


def test_ssm_heads_must_divide_dim():
    with pytest.raises(ConfigError, match="ssm_heads = 3 does not divide dim = 16"):
        config_from_dict({"model": {"family": "time_indexed_ssm", "dim": 16, "heads": 2, "ssm_form": "head",
                                    "ssm_heads": 3}}, source="test")


def test_head_form_parameter_count():
    """``W_delta`` is ``dim x H`` and ``alpha, delta, a_log`` have one entry per head."""
    from ode_lm.config import ModelConfig
    from ode_lm.models import build_model
    from ode_lm.models.accounting import parameter_counts

    d, n, h, e, hidden = DIM, STATE, HEADS, 8, 16
    cfg = ModelConfig(family="time_indexed_ssm", dim=d, heads=2, ssm_state_size=n, ssm_form="head", ssm_heads=h,
                      time_embed_dim=e, modulation_hidden=hidden, max_positions=16)
    model = eqx.filter_eval_shape(build_model, cfg, 32, jax.random.key(0))
    assert parameter_counts(model)["ssm"] == (2 * d + d * (h + 2 * n) + d * d + d + h + e * hidden + hidden
                                              + hidden * (2 * h + d + 2 * n) + 2 * h + d + 2 * n)


def test_field_standardises_once_for_block_and_ssm():
    """``time_indexed_ssm``'s ``f(t, x)`` shares one standardisation of ``x`` between the block
    and the SSM: float64 outputs and gradients within 1e-12 of ``block(x) + ssm(x, t)``
    with each standardising on its own."""
    from ode_lm.config import ModelConfig
    from ode_lm.models import build_model

    with jax.enable_x64(True):
        cfg = ModelConfig(family="time_indexed_ssm", dim=DIM, heads=2, ssm_state_size=STATE, ssm_form="head",
                          ssm_heads=HEADS, ssm_chunk=5, max_positions=16, dropout=0.0)
        field = build_model(cfg, 32, jax.random.key(0), jnp.float64).field
        x = jax.random.normal(jax.random.key(1), (2, 12, DIM), jnp.float64)
        cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
        t = jnp.asarray(0.3, jnp.float64)

        def separately(field, x):
            block, gates = field.block_at(t)
            return block(x, gates) + field.ssm(x, t)

        @eqx.filter_jit
        def both(field, x):  # one compilation for both
            def value_and_pullback(fn):
                y, pullback = jax.vjp(fn, field, x)
                return y, pullback(cotangent)
            return value_and_pullback(separately), value_and_pullback(lambda field, x: field(t, x))

        expected, got = both(field, x)
        assert float(jnp.abs(expected[0]).max()) > 1e-2
        assert max_relative_error(got, expected) <= 1e-12
