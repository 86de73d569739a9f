"""The solver maths: Euler is the residual stack, orders of convergence, NFE, gradients."""

import contextlib
import io
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from ode_lm.config import ADAPTIVE_SOLVERS, CHECKPOINT_SAVES, SOLVERS, ModelConfig, ODEConfig
from ode_lm.models import build_model
from ode_lm.ode import SOLVER_SPECS, VectorField, integrate


class Oscillator(VectorField):
    """dx/dt = A(t) x with a smooth time-dependent rotation plus decay: a smooth test field."""

    scale: jax.Array

    def __call__(self, t, x):
        w = self.scale * (1.0 + 0.5 * jnp.sin(2.0 * t))
        return jnp.stack([-0.3 * x[0] + w * x[1], -w * x[0] - 0.3 * x[1] + jnp.cos(t)])


def reference_solution(field, x0):
    from scipy.integrate import solve_ivp

    def f(t, x):
        return np.asarray(field(jnp.asarray(t), jnp.asarray(x)))
    with jax.enable_x64(True):
        sol = solve_ivp(f, (0.0, 1.0), np.asarray(x0, np.float64), method="DOP853", rtol=1e-13, atol=1e-13)
    return sol.y[:, -1]


def tiny_model(dtype=jnp.float32):
    cfg = ModelConfig(dim=16, heads=2, mlp_ratio=2, max_positions=16, dropout=0.0,
                      time_embed_dim=8, modulation_hidden=8, init_std=0.3)
    return build_model(cfg, 32, jax.random.key(0), dtype)


def test_euler_is_the_explicit_residual_stack():
    model = tiny_model()
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    for n in (1, 3, 6):
        x1, stats = model.hidden_final(tokens, ODEConfig(solver="euler", steps=n))
        x = model.embedding(tokens)
        for i in range(n):  # x_{i+1} = x_i + (1/N) f(i/N, x_i): a weight-shared N-layer stack
            x = x + (1.0 / n) * model.field(jnp.asarray(i / n, jnp.float32), x)
        assert float(jnp.abs(x1 - x).max()) <= 1e-5
        assert int(stats.nfe) == n


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4),
                                           ("reversible_heun", 2), ("tsit5", 5), ("dopri5", 5)])
def test_convergence_order(solver, order):
    with jax.enable_x64(True):
        field = Oscillator(jnp.asarray(3.0))
        x0 = jnp.array([1.0, 0.5])
        exact = reference_solution(field, x0)
        steps = (8, 16) if order == 4 else (16, 32)
        errors = [float(np.abs(np.asarray(integrate(field, x0, ODEConfig(solver=solver, steps=n))[0]) - exact).max())
                  for n in steps]
        ratio = errors[0] / errors[1]
        # Halving dt divides the global error by ~2^order (2x, 4x, 16x, 32x).
        assert 2 ** order * 0.7 <= ratio <= 2 ** order * 1.6, (solver, errors, ratio)


def test_nfe_counts_the_real_evaluations():
    calls = []

    class Counting(VectorField):
        def __call__(self, t, x):
            jax.debug.callback(lambda: calls.append(1))
            return -x

    for solver in SOLVERS:
        calls.clear()
        _, stats = integrate(Counting(), jnp.ones(3), ODEConfig(solver=solver, steps=5))
        jax.effects_barrier()
        assert int(stats.nfe) == len(calls) == SOLVER_SPECS[solver].nfe(5), solver


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_adaptive_solves_meet_their_tolerance(solver):
    with jax.enable_x64(True):
        field = Oscillator(jnp.asarray(3.0))
        x0 = jnp.array([1.0, 0.5])
        exact = reference_solution(field, x0)
        tol = 1e-7 if SOLVER_SPECS[solver].order >= 4 else 1e-5
        x1, stats = integrate(field, x0, ODEConfig(solver=solver, steps=4, adaptive=True, rtol=tol,
                                                   atol=tol, max_steps=4096))
        assert not bool(stats.failed)
        assert float(np.abs(np.asarray(x1) - exact).max()) < 200 * tol
        loose, _ = integrate(field, x0, ODEConfig(solver=solver, steps=4, adaptive=True, rtol=1e-3,
                                                  atol=1e-3, max_steps=4096))
        assert int(stats.steps) > int(_.steps), "tighter tolerances must take more steps"


def test_rk4_error_estimate_is_genuine():
    """The embedded estimate tracks the true local error: O(h^4) and nonzero."""
    with jax.enable_x64(True):
        field = Oscillator(jnp.asarray(3.0))
        x0 = jnp.array([1.0, 0.5])
        steps = [int(integrate(field, x0, ODEConfig(solver="rk4", steps=2, adaptive=True, rtol=tol,
                                                    atol=tol, max_steps=10_000))[1].steps)
                 for tol in (1e-4, 1e-8)]
        # Error per step ~ h^4 => steps grow like tol^(-1/4): 10^4 tighter -> ~10x more steps.
        assert 4 <= steps[1] / steps[0] <= 25, steps


def test_adaptive_solve_that_runs_out_of_steps_reports_failure():
    _, stats = integrate(Oscillator(jnp.asarray(3.0)), jnp.array([1.0, 0.5]),
                         ODEConfig(solver="tsit5", adaptive=True, rtol=1e-9, atol=1e-9, max_steps=3))
    assert bool(stats.failed)


def test_gradients_agree_across_sensitivities():
    with jax.enable_x64(True):
        model = tiny_model(jnp.float64)
        tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 32)
        targets = jnp.roll(tokens, -1, axis=1)

        def grads(ode):
            def loss(m):
                logits, _ = m(tokens, ode)
                return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
            return jax.tree.leaves(eqx.filter_jit(eqx.filter_grad(loss))(model))

        def rel(a, b):
            num = math.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b)))
            return num / math.sqrt(sum(float(jnp.sum(y ** 2)) for y in b))

        fixed = dict(solver="rk4", steps=6)
        # checkpoint and direct differentiate the same discrete computation: identical.
        g_direct = grads(ODEConfig(**fixed, adjoint="direct"))
        for saves in CHECKPOINT_SAVES:
            g = grads(ODEConfig(**fixed, adjoint="checkpoint", checkpoint_saves=saves))
            assert rel(g, g_direct) <= 1e-10, saves
        # backsolve solves the continuous adjoint: it agrees once the solve is accurate.
        tight = dict(solver="dopri5", steps=4, adaptive=True, rtol=1e-10, atol=1e-10, max_steps=4096)
        g_direct = grads(ODEConfig(**tight, adjoint="direct"))
        for adjoint in ("checkpoint", "backsolve"):
            assert rel(grads(ODEConfig(**tight, adjoint=adjoint)), g_direct) <= 1e-4, adjoint


def test_unrolled_fixed_steps_compute_what_the_scan_computes():
    """``ode.unroll`` writes the steps out instead of scanning one: the same values and
    gradients with and without rematerialisation, and no scan left in the program."""
    with jax.enable_x64(True):
        model = tiny_model(jnp.float64)
        tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 32)

        def value_and_grads(ode):
            loss = lambda m: jnp.mean(m(tokens, ode)[0] ** 2)
            value, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model)
            return [value, *jax.tree.leaves(grads)]

        for policy in ({"adjoint": "direct"}, {"checkpoint_saves": "matmuls"}):
            scanned, unrolled = (value_and_grads(ODEConfig(solver="euler", steps=3, unroll=u, **policy))
                                 for u in (False, True))
            for a, b in zip(scanned, unrolled):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=str(policy))

    # A scan's program does not grow with the number of steps; the unrolled one does.
    field, x0 = Oscillator(jnp.asarray(3.0)), jnp.array([1.0, 0.5])
    def program_size(steps, **ode):
        solve = lambda x: integrate(field, x, ODEConfig(solver="heun", steps=steps, **ode))[0]  # noqa: E731
        return len(jax.jit(solve).lower(x0).as_text())
    assert program_size(16) < 1.05 * program_size(4)  # (only constants such as dt differ)
    assert program_size(16, unroll=True) > 2 * program_size(4, unroll=True)


def test_checkpoint_saves_trades_memory_for_recomputation():
    """Keeping the matrix products' outputs costs memory between keeping only the states
    and keeping everything, per step of the scan."""
    cfg = ModelConfig(dim=64, heads=4, max_positions=64, dropout=0.0)
    params, static = eqx.partition(build_model(cfg, 32, jax.random.key(0)), eqx.is_array)
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 32)

    def temp_bytes(**ode):
        def loss(p):
            logits, _ = eqx.combine(p, static)(tokens, ODEConfig(solver="euler", steps=8, **ode))
            return jnp.mean(logits ** 2)
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    states, matmuls = (temp_bytes(adjoint="checkpoint", checkpoint_saves=s) for s in CHECKPOINT_SAVES)
    direct = temp_bytes(adjoint="direct")
    # The products' outputs: 9 x dim floats per token per step (qkv, proj, fc1 at ratio 4,
    # fc2) = 4.7 MB over 8 steps; XLA reuses some working buffers, so ask for half of it.
    saved = 8 * 9 * 64 * (4 * 64) * 4
    assert states + saved / 2 <= matmuls < direct / 2, (states, matmuls, direct)



def saved_residuals(f, *args) -> list[str]:
    """What reverse mode keeps of ``f``'s forward pass, one line each (JAX's public
    ``print_saved_residuals``): e.g. ``bf16[3,2,12,16] output of scan from ...``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return out.getvalue().splitlines()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
def test_checkpoint_saves_matmuls_keeps_the_fused_attention_output():
    """With ``matmuls`` the backward pass reads cuDNN attention's saved output instead of
    running its forward kernel again."""
    from ode_lm.ode.fixed import MEMORY_POLICIES

    q = jax.random.normal(jax.random.key(0), (2, 128, 4, 64), jnp.bfloat16)

    def loss(policy):
        def f(q):
            out = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
            return jnp.sin(out.astype(jnp.float32)).sum()
        return jax.checkpoint(f, policy=MEMORY_POLICIES[policy])

    def kept_outputs(policy):  # computed values kept (not the argument itself)
        return [r for r in saved_residuals(loss(policy), q) if "bf16[2,128,4,64] output of" in r]

    assert kept_outputs("states") == []
    assert kept_outputs("matmuls"), saved_residuals(loss("matmuls"), q)


def test_checkpoint_saves_matmuls_keeps_the_standardised_input_not_the_state():
    """Mixed precision: under ``matmuls`` each step keeps the block's bf16 standardised input
    and its per-token statistics, not the float32 state it was computed from."""
    params, static = eqx.partition(tiny_model().in_dtype(jnp.bfloat16), eqx.is_array)
    tokens = jnp.zeros((2, 12), jnp.int32)

    def stacked(saves):  # residuals stacked over the 3 steps of the solve's scan
        def loss(p):
            logits, _ = eqx.combine(p, static)(tokens, ODEConfig(solver="euler", steps=3, checkpoint_saves=saves))
            return logits.astype(jnp.float32).mean()
        return [r.split(" ")[0] for r in saved_residuals(loss, params) if " output of scan " in r]

    state, standardized, statistics = "f32[3,2,12,16]", "bf16[3,2,12,16]", "f32[3,2,12,1]"
    assert state in stacked("states")
    kept = stacked("matmuls")
    assert state not in kept and standardized in kept and statistics in kept, kept


def test_causality():
    model = tiny_model()
    tokens = jax.random.randint(jax.random.key(3), (1, 12), 0, 32)
    base, _ = model(tokens, ODEConfig(solver="rk4", steps=3))
    for k in (0, 5, 11):
        changed, _ = model(tokens.at[0, k].set((tokens[0, k] + 1) % 32), ODEConfig(solver="rk4", steps=3))
        assert float(jnp.abs(changed[0, :k] - base[0, :k]).max(initial=0.0)) == 0.0
        assert float(jnp.abs(changed[0, k:] - base[0, k:]).max()) > 0.0
