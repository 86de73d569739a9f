"""The reversible sensitivity: exact gradients of the reversible scheme, exact reconstruction,
the base method's order, O(1) memory in the steps, training, and its config."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.config import REVERSIBLE_SOLVERS, ODEConfig, config_from_dict
from ode_lm.errors import ConfigError
from ode_lm.ode import SOLVER_SPECS, VectorField, integrate, integrate_reversible, reconstruct
from ode_lm.train import train
from ode_lm.train.logging import read_metrics
from tests.test_ode import Oscillator, reference_solution, tiny_model


def rel(a, b):
    num = math.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b)))
    return num / math.sqrt(sum(float(jnp.sum(y ** 2)) for y in b))


def lm_grads(model, ode, gradient, seq=8):
    """Gradients of a next-token loss through the reversible scheme, by ``gradient``."""
    tokens = jax.random.randint(jax.random.key(2), (2, seq), 0, 32)
    targets = jnp.roll(tokens, -1, axis=1)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(m):
        x1, _ = integrate_reversible(m.field, m.embedding(tokens), ode, gradient=gradient)
        logits = m.readout(x1, m.embedding).astype(jnp.float32)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
    return jax.tree.leaves(grad(model))


@pytest.mark.parametrize("dtype, solver, tol", [(jnp.float64, "rk4", 1e-8), (jnp.float32, "euler", 1e-4)])
def test_gradient_equals_direct_backprop_through_the_scheme(dtype, solver, tol):
    with jax.enable_x64(dtype == jnp.float64):
        model = tiny_model(dtype)
        ode = ODEConfig(solver=solver, steps=16, adjoint="reversible")
        g_rev, g_direct = lm_grads(model, ode, "reversible"), lm_grads(model, ode, "direct")
        assert rel(g_rev, g_direct) <= tol


def test_adaptive_gradient_equals_direct_and_reuses_the_accepted_steps():
    with jax.enable_x64(True):
        x0 = jnp.array([1.0, 0.5])
        ode = ODEConfig(solver="dopri5", steps=2, adaptive=True, rtol=1e-6, atol=1e-6,
                        max_steps=512, adjoint="reversible")

        def grads(gradient):
            def loss(field_x0):
                x1, stats = integrate_reversible(*field_x0, ode, gradient=gradient)
                return jnp.sum(x1 ** 2), stats
            g, stats = eqx.filter_grad(loss, has_aux=True)((Oscillator(jnp.asarray(3.0)), x0))
            return jax.tree.leaves(g), stats

        g_rev, stats = grads("reversible")
        assert not bool(stats.failed) and int(stats.steps) > 10
        assert rel(g_rev, grads("direct")[0]) <= 1e-8


def test_forward_then_backward_reconstructs_the_initial_state():
    with jax.enable_x64(True):
        model = tiny_model(jnp.float64)
        x0 = model.embedding(jax.random.randint(jax.random.key(4), (2, 8), 0, 32))
        ode = ODEConfig(solver="rk4", steps=16, adjoint="reversible")
        y0, z0 = jax.jit(reconstruct, static_argnums=2)(model.field, x0, ode)
        assert float(jnp.abs(y0 - x0).max()) <= 1e-10
        assert float(jnp.abs(z0 - x0).max()) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "dopri5"])
def test_reversible_scheme_keeps_the_base_order(solver):
    order = SOLVER_SPECS[solver].order
    with jax.enable_x64(True):
        field, x0 = Oscillator(jnp.asarray(3.0)), jnp.array([1.0, 0.5])
        exact = reference_solution(field, x0)
        errors = [float(np.abs(np.asarray(integrate(field, x0, ODEConfig(
            solver=solver, steps=n, adjoint="reversible"))[0]) - exact).max()) for n in (16, 32)]
        assert 2 ** order * 0.7 <= errors[0] / errors[1] <= 2 ** order * 1.6, errors


def test_nfe_counts_both_base_steps():
    calls = []

    class Counting(VectorField):
        def __call__(self, t, x):
            jax.debug.callback(lambda: calls.append(1))
            return -x

    for solver in REVERSIBLE_SOLVERS:
        calls.clear()
        _, stats = integrate(Counting(), jnp.ones(3), ODEConfig(solver=solver, steps=5, adjoint="reversible"))
        jax.effects_barrier()
        assert int(stats.nfe) == len(calls), solver
        assert int(stats.steps) == 5


class Tanh(VectorField):
    weight: jax.Array

    def __call__(self, t, x):
        return jnp.tanh(x @ self.weight + t)


def test_memory_does_not_grow_with_steps():
    field = Tanh(0.3 * jax.random.normal(jax.random.key(0), (64, 64)))
    x0 = jax.random.normal(jax.random.key(1), (128, 64))

    def temp_bytes(adjoint, steps):
        ode = ODEConfig(solver="heun", steps=steps, adjoint=adjoint)

        def loss(field):
            return jnp.sum(integrate(field, x0, ode)[0] ** 2)
        return jax.jit(jax.grad(loss)).lower(field).compile().memory_analysis().temp_size_in_bytes

    rev = [temp_bytes("reversible", n) for n in (4, 32)]
    assert rev[1] <= 1.2 * rev[0], rev
    assert temp_bytes("direct", 32) >= 2 * rev[1]  # storing 32 states does cost memory


def test_training_with_reversible_lowers_the_loss(tiny):
    cfg = tiny(**{"ode.reversible": True, "train.eval_every": 30})
    assert cfg.ode.adjoint == "reversible"
    result = train(cfg, say=lambda m: None)
    rows = read_metrics(result.run_dir, "train")
    losses = [r["loss"] for r in rows if "lr" not in r]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert rows[-1]["nfe"] == 2 * 2  # two Euler steps of one evaluation, per solver step


def test_config_alias_coupling_and_errors():
    alias = config_from_dict({"ode": {"reversible": True}})
    assert alias.ode.adjoint == "reversible" and 0 < alias.ode.reversible_coupling < 1
    assert config_from_dict({"ode": {"adjoint": "reversible"}}).ode.reversible
    assert config_from_dict({"ode": {"reversible": True, "adjoint": "reversible"}}) == alias
    assert alias.replace(**{"ode.adjoint": "direct"}).ode.adjoint == "direct"
    assert config_from_dict({}).replace(**{"ode.reversible": True}) == alias
    with pytest.raises(ConfigError, match='reversible = true.*adjoint = "backsolve"'):
        config_from_dict({"ode": {"reversible": True, "adjoint": "backsolve"}})
    with pytest.raises(ConfigError, match="reversible_heun.*euler, heun, midpoint, rk4, tsit5, dopri5"):
        config_from_dict({"ode": {"adjoint": "reversible", "solver": "reversible_heun"}})
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="reversible_coupling"):
            config_from_dict({"ode": {"reversible_coupling": bad}})
    with pytest.raises(ConfigError, match='ode.reversible = true selects adjoint = "reversible"'):
        ODEConfig(reversible=True)  # made in code: the alias and adjoint must agree
