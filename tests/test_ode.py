"""The solver maths: Euler is the residual stack, orders of convergence, NFE, gradients."""

import contextlib
import dataclasses
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
    and keeping everything, per step of the scan (scanned explicitly: ``unroll = "auto"``
    writes the solve out on a GPU)."""
    cfg = ModelConfig(dim=64, heads=4, max_positions=64, dropout=0.0)
    params, static = eqx.partition(build_model(cfg, 32, jax.random.key(0)), eqx.is_array)
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 32)

    def temp_bytes(**ode):
        def loss(p):
            logits, _ = eqx.combine(p, static)(tokens, ODEConfig(solver="euler", steps=8, unroll="scan", **ode))
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
    from ode_lm.nn import SAVES

    q = jax.random.normal(jax.random.key(0), (2, 128, 4, 64), jnp.bfloat16)

    def loss(policy):
        def f(q):
            out = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
            return jnp.sin(out.astype(jnp.float32)).sum()
        return jax.checkpoint(f, policy=SAVES[policy])

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
            logits, _ = eqx.combine(p, static)(tokens, ODEConfig(solver="euler", steps=3, unroll="scan",
                                                                   checkpoint_saves=saves))
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


def masked_and_plain(field, x0, ode, hi, ns):
    """``(value, nfe, gradients)`` of a loss of ``x(1)`` for the plain ``n``-step solve and for
    the masked ``hi``-step solve taking ``n`` steps (``ode.steps_range``), for each ``n``."""
    from ode_lm.ode import Grid, fixed_grid, sensitivity

    params, static = eqx.partition((field, x0), eqx.is_inexact_array)

    @eqx.filter_jit
    def value_and_grad(params, ode, taken):
        def loss(p):
            f, x = eqx.combine(p, static)
            grid = None if taken is None else Grid(fixed_grid(hi, jnp.float64, taken=taken), taken)
            x1, stats = sensitivity(ode).solve(f, x, ode, grid)
            return jnp.sum(jnp.sin(x1)), stats.nfe
        (value, nfe), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, nfe, jax.tree.leaves(grads)

    for n in ns:
        yield n, (value_and_grad(params, dataclasses.replace(ode, steps=n), None),
                  value_and_grad(params, dataclasses.replace(ode, steps=hi), jnp.asarray(n)))


def assert_masked_equals_plain(field, x0, ode, hi, ns):
    for n, (want, got) in masked_and_plain(field, x0, ode, hi, ns):
        assert int(got[1]) == int(want[1]) == SOLVER_SPECS[ode.solver].nfe(n)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(got[2], want[2]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{ode} n={n}")


@pytest.mark.parametrize("ode", [ODEConfig(solver="rk4"), ODEConfig(solver="reversible_heun"),
                                 ODEConfig(solver="heun", adjoint="direct", unroll="unroll")])
def test_steps_range_masked_solve_equals_the_plain_solve(ode):
    """``ode.steps_range``: a masked solve of ``hi`` steps that takes ``n`` of them is the
    ``n``-step solve, in value and gradient (float64), scanned or written out, for solvers
    with a carried state (rk4's first-same-as-last stage, reversible Heun's second state)."""
    with jax.enable_x64(True):
        assert_masked_equals_plain(Oscillator(jnp.asarray(3.0)), jnp.array([1.0, 0.5]), ode, 6, (1, 2, 5))


@pytest.mark.slow
def test_steps_range_masked_solve_of_the_model_equals_the_plain_solve():
    with jax.enable_x64(True):
        model = tiny_model(jnp.float64)
        x0 = model.embedding(jax.random.randint(jax.random.key(4), (1, 4), 0, 32))
        assert_masked_equals_plain(model.field, x0, ODEConfig(solver="rk4", checkpoint_saves="matmuls"), 4, (1, 3))


def test_steps_range_draws_step_counts_per_batch_in_one_compiled_train_step():
    """Training draws the number of steps per batch from ``[lo, hi]`` (its NFE shows it) with
    one compiled step; evaluation keeps the ``ode.steps`` grid; jitter composes."""
    import optax

    from ode_lm.train.steps import TrainStep

    model = tiny_model()
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, 32)
    ode = ODEConfig(solver="euler", steps=3, steps_range=(2, 6), grid_jitter=0.5)
    np.testing.assert_array_equal(model(tokens, ode)[0], model(tokens, ODEConfig(solver="euler", steps=3))[0])
    opt = optax.sgd(0.0)
    step = TrainStep(opt, ode)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    nfes = {int(step(model, state, tokens, tokens, jax.random.key(k))[2]["nfe"]) for k in range(6)}
    assert step.traces == 1
    assert len(nfes) >= 3 and nfes <= set(range(2, 7)), nfes  # euler: one evaluation per step


@pytest.mark.parametrize("override, needle", [
    ({"ode.steps_range": [4, 2]}, "1 <= lo <= hi"),
    ({"ode.steps_range": [0, 3]}, "1 <= lo <= hi"),
    ({"ode.steps_range": [3]}, "[lo, hi]"),
    ({"ode.steps_range": [2.5, 4]}, "a list of integers"),
    ({"ode.steps_range": [2, 4], "ode.adaptive": True, "ode.solver": "rk4"}, "needs fixed steps"),
    ({"ode.steps_range": [2, 4], "ode.adjoint": "backsolve"}, "adjoint = \"checkpoint\" or \"direct\""),
    ({"ode.steps_range": [2, 4], "model.family": "standard"}, "applies to ODE families"),
])
def test_steps_range_config_errors(override, needle):
    from ode_lm.config import Config
    from ode_lm.errors import ConfigError

    assert Config().replace(**{"ode.steps_range": [2, 4]}).ode.steps_range == (2, 4)
    with pytest.raises(ConfigError, match="steps_range") as err:
        Config().replace(**override)
    assert needle in str(err.value)


def test_solver_table_traits_come_from_the_tableaus():
    """Order, stages, FSAL and adaptivity as diffrax's public API gives them, and the NFE rule
    the README's table states (evaluations per step, + one before the first for FSAL)."""
    traits = {name: (s.order, s.evals_per_step, s.cost.initial, s.adaptive) for name, s in SOLVER_SPECS.items()}
    assert traits == {"euler": (1, 1, 0, False), "heun": (2, 2, 0, True), "midpoint": (2, 2, 0, True),
                      "rk4": (4, 4, 1, True), "tsit5": (5, 6, 1, True), "dopri5": (5, 6, 1, True),
                      "reversible_heun": (2, 1, 1, True)}
    assert SOLVER_SPECS["tsit5"].nfe(3) == 19 and SOLVER_SPECS["rk4"].reversible_nfe(3) == 30


def test_sensitivity_objects_are_built_from_the_config_keys():
    from ode_lm.errors import ConfigError
    from ode_lm.nn import SAVES
    from ode_lm.ode import Backsolve, Checkpoint, Direct, Reversible, sensitivity

    assert sensitivity(ODEConfig(adjoint="direct", unroll="unroll")) == Direct(unroll=True)
    checkpoint = sensitivity(ODEConfig(checkpoint_saves="matmuls", unroll="scan"), SAVES)
    assert checkpoint == Checkpoint(SAVES["matmuls"], unroll=False)
    assert sensitivity(ODEConfig(adjoint="reversible", reversible=True, reversible_coupling=0.5)) == Reversible(0.5)
    assert sensitivity(ODEConfig(adjoint="backsolve")) == Backsolve()
    with pytest.raises((ValueError, ConfigError), match="reversible"):  # refused by the config or here
        sensitivity(ODEConfig(adjoint="direct", reversible=True))


def test_checkpoint_saves_auto_keeps_the_products_only_where_a_gpu_solve_is_unrolled():
    from ode_lm.ode import checkpoint_saves

    auto = ODEConfig(solver="euler", steps=12)  # checkpoint_saves = "auto", unroll = "auto"
    assert checkpoint_saves(auto, "gpu") == "matmuls" and checkpoint_saves(auto, "cpu") == "states"
    scanned = (ODEConfig(solver="euler", steps=17), ODEConfig(solver="euler", steps=12, unroll="scan"))
    other = (ODEConfig(solver="euler", steps=12, adjoint="direct"),
             ODEConfig(solver="tsit5", adaptive=True), ODEConfig(solver="heun", adjoint="backsolve"))
    assert {checkpoint_saves(ode, "gpu") for ode in scanned + other} == {"states"}
    assert checkpoint_saves(dataclasses.replace(auto, checkpoint_saves="states"), "gpu") == "states"
    assert checkpoint_saves(dataclasses.replace(auto, checkpoint_saves="matmuls"), "cpu") == "matmuls"
