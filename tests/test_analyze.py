"""Continuous depth: the training options (time_max_frequency, grid jitter, regularisers) and
``ode-lm analyze`` (spectrum, Lyapunov exponents, refinement orders, the CLI)."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from ode_lm.analyze import check_out_dir, lyapunov, observed_order, solve_errors, spectrum_at, trajectory
from ode_lm.cli import main
from ode_lm.config import ModelConfig, ODEConfig, config_from_dict
from ode_lm.errors import ConfigError, UserError
from ode_lm.models import build_model
from ode_lm.nn import sinusoidal
from ode_lm.ode import Augmented, VectorField, integrate, jittered_grid
from ode_lm.ode.regularise import augment
from ode_lm.train import train
from ode_lm.train.steps import TrainStep
from tests.conftest import tiny_config


class Linear(VectorField):
    a: jax.Array

    def __call__(self, t, x):
        return x @ self.a.T


class TimeScaled(VectorField):
    """``dx/dt = cos(t) x``: ``x(1) = exp(sin 1) x(0)``."""

    def __call__(self, t, x):
        return jnp.cos(t) * x


def normal_matrix(rng) -> np.ndarray:
    """``U diag(2, 0.5, -1, [-0.4 +- 1.5i]) U^T`` with ``U`` orthogonal: normal, not symmetric."""
    block = np.zeros((5, 5))
    block[:3, :3] = np.diag([2.0, 0.5, -1.0])
    block[3:, 3:] = [[-0.4, 1.5], [-1.5, -0.4]]
    u, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    return u @ block @ u.T


def test_spectrum_of_a_linear_field_is_its_matrix_eigenvalues():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))  # not normal: complex pairs, 2-norm above spectral radius
    with jax.enable_x64(True):
        s = spectrum_at(Linear(jnp.asarray(a)), jnp.float64(0.3), jnp.asarray(rng.standard_normal(6)), 6, 0)
    want = np.linalg.eigvals(a)
    got = s["eigenvalues"]
    assert len(got) == 6
    for w in want:
        assert np.min(np.abs(got - w)) <= 1e-6
    assert s["spectral_radius"] == pytest.approx(np.abs(want).max(), abs=1e-6)
    assert s["norm"] == pytest.approx(np.linalg.norm(a, 2), abs=1e-6)


def test_lyapunov_exponents_of_a_normal_linear_field_are_the_real_parts():
    rng = np.random.default_rng(1)
    a = normal_matrix(rng)
    with jax.enable_x64(True):
        field, x0 = Linear(jnp.asarray(a)), jnp.asarray(rng.standard_normal(5))
        ts, xs = trajectory(field, x0, 64)
        np.testing.assert_allclose(xs[-1], scipy.linalg.expm(a) @ x0, atol=1e-7)
        exponents = lyapunov(field, ts, xs, 3, seed=0)
    np.testing.assert_allclose(exponents, [2.0, 0.5, -0.4], atol=1e-6)


def test_refinement_orders_of_euler_and_rk4_on_a_known_solution():
    with jax.enable_x64(True):
        x0 = jnp.asarray([1.0, -0.5])
        exact = np.exp(np.sin(1.0)) * np.asarray(x0)
        steps = [16, 32, 64]
        euler = observed_order(steps, solve_errors(TimeScaled(), x0, exact, "euler", steps), floor=1e-13)
        rk4 = observed_order(steps, solve_errors(TimeScaled(), x0, exact, "rk4", steps), floor=1e-13)
    assert euler == pytest.approx(1.0, abs=0.1)
    assert rk4 == pytest.approx(4.0, abs=0.2)


def test_time_max_frequency_bounds_the_features():
    ts = jnp.linspace(0.0, 1.0, 101)
    for w in (2.0, 100.0):
        rate = jax.vmap(jax.jacfwd(lambda t: sinusoidal(t, 16, w)))(ts)  # d feature / dt
        assert float(jnp.abs(rate).max()) <= w * (1 + 1e-6)
        assert float(jnp.abs(rate).max()) >= 0.9 * w  # the highest frequency is w itself
    model = build_model(ModelConfig(dim=16, heads=2, time_embed_dim=8, time_max_frequency=2.0), 32,
                        jax.random.key(0))
    assert model.field.time_max_frequency == 2.0


def test_jittered_grids_are_sorted_sum_to_one_and_differ_between_steps():
    grids = [jittered_grid(jax.random.key(i), 6, 1.0) for i in range(3)]
    for g in grids:
        h = np.diff(np.asarray(g))
        assert g[0] == 0.0 and g[-1] == 1.0 and (h > 0).all()
        assert h.sum() == pytest.approx(1.0, abs=1e-6)
        centres = np.arange(1, 6) / 6
        assert np.abs(np.asarray(g[1:-1]) - centres).max() <= 0.5 / 6  # one time per cell
    assert not np.allclose(grids[0], grids[1])
    np.testing.assert_allclose(jittered_grid(jax.random.key(0), 6, 0.0), np.linspace(0, 1, 7), atol=1e-7)


def tiny_model():
    return build_model(ModelConfig(dim=16, heads=2, mlp_ratio=2, time_embed_dim=8, modulation_hidden=8,
                                   dropout=0.0, max_positions=16), 32, jax.random.key(0))


def test_jitter_changes_training_solves_only_and_the_step_compiles_once():
    model, tokens = tiny_model(), jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
    ode = ODEConfig(steps=3, grid_jitter=1.0)
    fixed = model(tokens, ODEConfig(steps=3))[0]
    np.testing.assert_array_equal(model(tokens, ode)[0], fixed)  # evaluation: the configured grid
    a, b = (model(tokens, ode, key=jax.random.key(k))[0] for k in (0, 1))
    assert not np.allclose(a, b) and not np.allclose(a, fixed)
    same = model(tokens, ODEConfig(steps=3), key=jax.random.key(0))[0]  # no jitter: key changes nothing
    np.testing.assert_array_equal(same, fixed)
    # One compiled train step for every jittered grid, with the regularisers as metrics.
    opt = optax.adam(1e-3)
    step = TrainStep(opt, ODEConfig(steps=3, grid_jitter=1.0, kinetic_weight=0.1))
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    for k in range(3):
        _, _, metrics = step(model, state, tokens, tokens, jax.random.key(k))
    assert step.traces == 1
    assert float(metrics["kinetic"]) > 0 and "jacobian" not in metrics


def test_regularisers_equal_hand_computed_integrals():
    model, tokens = tiny_model(), jax.random.randint(jax.random.key(2), (1, 4), 0, 32)
    field, x0 = model.field, model.embedding(tokens)
    f = lambda t, x: field(jnp.float32(t), x)  # noqa: E731
    # Euler on 2 steps: the quadratures are left Riemann sums at t = 0 and 1/2.
    x_half = x0 + 0.5 * f(0.0, x0)
    tokens_n = x0.size // x0.shape[-1]
    kinetic = 0.5 * (jnp.sum(f(0.0, x0) ** 2) + jnp.sum(f(0.5, x_half) ** 2)) / tokens_n
    _, stats = integrate(field, x0, ODEConfig(steps=2, kinetic_weight=1.0), key=jax.random.key(0))
    assert float(stats.kinetic) == pytest.approx(float(kinetic), rel=1e-5)
    assert stats.jacobian is None
    # Jacobian term with a given probe: 1/2 sum_n ||eps^T J(t_n)||^2 / tokens, J dense (tiny state).
    probe = jax.random.normal(jax.random.key(3), x0.shape)
    jac = [jax.jacrev(lambda x: f(t, x))(x).reshape(x0.size, x0.size) for t, x in ((0.0, x0), (0.5, x_half))]
    want = 0.5 * sum(float(jnp.sum((probe.ravel() @ j) ** 2)) for j in jac) / tokens_n
    (x1, k, jterm), _ = integrate(Augmented(field, probe), augment(x0), ODEConfig(steps=2))
    assert float(jterm) == pytest.approx(want, rel=1e-4)
    assert float(k) == pytest.approx(float(kinetic), rel=1e-5)
    np.testing.assert_allclose(x1, integrate(field, x0, ODEConfig(steps=2))[0], rtol=1e-6)


@pytest.mark.slow
def test_hutchinson_jacobian_term_averages_to_the_frobenius_integral():
    model, tokens = tiny_model(), jax.random.randint(jax.random.key(2), (1, 4), 0, 32)
    field, x0 = model.field, model.embedding(tokens)
    f = lambda t, x: field(jnp.float32(t), x)  # noqa: E731
    x_half = x0 + 0.5 * f(0.0, x0)
    jac = [jax.jacrev(lambda x: f(t, x))(x).reshape(x0.size, x0.size) for t, x in ((0.0, x0), (0.5, x_half))]
    frob = 0.5 * sum(float(jnp.sum(j ** 2)) for j in jac) / (x0.size // x0.shape[-1])
    ode = ODEConfig(steps=2, jacobian_weight=1.0)
    draws = jax.vmap(lambda k: integrate(field, x0, ode, key=k)[1].jacobian)(jax.random.split(jax.random.key(4), 256))
    assert float(draws.mean()) == pytest.approx(frob, rel=0.1)


def test_training_options_reject_unsupported_solves(tmp_path):
    for values, needle in [({"ode": {"grid_jitter": 0.5, "adjoint": "backsolve"}}, "adjoint = \"checkpoint\" or"),
                           ({"ode": {"kinetic_weight": 0.1, "adaptive": True, "solver": "rk4"}}, "fixed steps"),
                           ({"ode": {"jacobian_weight": 0.1}, "model": {"family": "standard"}}, "ODE families")]:
        with pytest.raises(ConfigError, match=needle):
            config_from_dict(values, "test")


@pytest.mark.slow
def test_regularised_training_logs_its_terms(tmp_path):
    cfg = tiny_config(tmp_path, **{"ode.kinetic_weight": 0.1, "ode.jacobian_weight": 0.1, "ode.grid_jitter": 1.0,
                                   "train.steps": 5, "log.every": 5, "train.eval_every": 5, "checkpoint.every": 5})
    result = train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("kind") == "train" and "kinetic" in r]
    assert logged and logged[-1]["kinetic"] > 0 and logged[-1]["jacobian"] > 0


def test_analyze_out_dir_is_validated_and_a_run_needs_a_checkpoint(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="non-empty directory that is not an ode-lm output"):
        check_out_dir(busy)
    assert (busy / "keep.txt").read_text() == "mine"
    (tmp_path / "empty_run").mkdir()
    assert main(["analyze", str(tmp_path / "empty_run"), "--out", str(tmp_path / "out")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_cli_on_a_tiny_run_writes_every_part(tmp_path):
    result = train(tiny_config(tmp_path))
    out = tmp_path / "analysis"
    assert main(["analyze", str(result.run_dir), "--out", str(out), "--batches", "1"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    for part in ("refinement", "jacobian_spectrum", "lyapunov", "energy", "gates"):
        assert data[part], part
    assert {r["solver"] for r in data["refinement"]["rows"]} == {"euler", "rk4", "tsit5"}
    for png in ("refinement", "jacobian_spectrum", "lyapunov", "energy", "gates"):
        assert (out / f"{png}.png").stat().st_size > 0
    assert "discretisation gap" in (out / "report.md").read_text()
    # A previous analysis may be overwritten; the same seed gives the same numbers.
    assert main(["analyze", str(result.run_dir), "--out", str(out), "--batches", "1"]) == 0
    assert json.loads((out / "analysis.json").read_text())["lyapunov"] == data["lyapunov"]


def write_gap_ablation(directory, analysis: str):
    from tests.test_ablate import write_tiny_base

    write_tiny_base(directory)
    path = directory / "gap.toml"
    path.write_text(f'base = "tiny.toml"\n{analysis}\n[grid]\n"ode.steps" = [2]\n')
    return path


def test_ablation_analysis_table_is_validated(tmp_path):
    from ode_lm.ablate import load_ablation

    assert load_ablation(write_gap_ablation(tmp_path, "[analysis]\nrefinement = true")).refinement
    assert not load_ablation(write_gap_ablation(tmp_path, "")).refinement
    for bad, needle in [("[analysis]\nrefinement = 1", "expected true or false"),
                        ("[analysis]\nrefinment = true", "allowed keys are refinement")]:
        with pytest.raises(ConfigError, match=needle):
            load_ablation(write_gap_ablation(tmp_path, bad))


@pytest.mark.slow
def test_ablation_with_refinement_reports_the_gap(tmp_path):
    from ode_lm.ablate import load_ablation, run_ablation, write_report

    spec = load_ablation(write_gap_ablation(tmp_path, "[analysis]\nrefinement = true"), out=tmp_path / "out")
    rows = run_ablation(spec, progress=False, say=lambda m: None)
    (row,) = rows.values()
    assert row["status"] == "ok" and row["trained_grid_loss"] == pytest.approx(row["val_loss"], rel=1e-4)
    gap = 100 * (row["trained_grid_loss"] - row["converged_loss"]) / row["converged_loss"]
    assert row["discretisation_gap_pct"] == pytest.approx(gap)
    assert "discretisation gap" in write_report(spec, rows).read_text()
