"""Cross-checks: the export format, the float64 reference backend against diffrax, the Julia
bridge's behaviour without Julia, and the Julia sources' syntax."""

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ode_lm.config import ModelConfig, ODEConfig, config_from_dict
from ode_lm.interop import export as export_mod
from ode_lm.interop import reference as reference_mod
from ode_lm.interop.export import export_model, julia_view, load_export, save_export
from ode_lm.interop.reference import FIXED_STEP_SOLVERS, ReferenceModel, solve_fixed
from ode_lm.interop.settings import CrossCheckSettings
from ode_lm.models import build_model

from tests.conftest import REPO, run_cli

TINY = {"dim": 16, "heads": 2, "mlp_ratio": 2, "max_positions": 16, "dropout": 0.0,
        "time_embed_dim": 8, "modulation_hidden": 8, "init_std": 0.1}
SETTINGS = CrossCheckSettings(seq=8, batch=2, vocab=19, solvers=(*FIXED_STEP_SOLVERS, "tsit5"),
                              grad_adjoints=("checkpoint",),
                              grad_params=("embedding.tokens", "block.attn.qkv.weight", "block.ln_mlp.bias",
                                           "block.mlp.fc2.weight", "modulation.hidden.weight",
                                           "modulation.out.bias", "readout.norm.weight"))
STEPS = 3


def tiny_cfg(**model):
    return config_from_dict({"model": {**TINY, **model}, "ode": {"steps": STEPS},
                             "data": {"seq_len": 8}}, "test")


def x64_model(cfg=None):
    from ode_lm.interop.crosscheck import float64_model

    return float64_model(cfg or tiny_cfg(), SETTINGS)


# ------------------------------------------------------------------------------ export format


def test_export_names_shapes_and_dtype(tmp_path):
    model = build_model(ModelConfig(**TINY, tie_embeddings=False), 19, jax.random.key(0))
    exported = export_model(model)
    d, h = 16, 32
    shapes = {"embedding.tokens": (19, d), "embedding.positions": (16, d),
              "block.ln_attn.weight": (d,), "block.ln_attn.bias": (d,),
              "block.attn.qkv.weight": (d, 3 * d), "block.attn.qkv.bias": (3 * d,),
              "block.attn.proj.weight": (d, d), "block.attn.proj.bias": (d,),
              "block.ln_mlp.weight": (d,), "block.ln_mlp.bias": (d,),
              "block.mlp.fc1.weight": (d, h), "block.mlp.fc1.bias": (h,),
              "block.mlp.fc2.weight": (h, d), "block.mlp.fc2.bias": (d,),
              "modulation.hidden.weight": (8, 8), "modulation.hidden.bias": (8,),
              "modulation.out.weight": (8, 3 * d + d + h + d), "modulation.out.bias": (3 * d + d + h + d,),
              "readout.norm.weight": (d,), "readout.norm.bias": (d,), "readout.head": (d, 19)}
    assert {n: a.shape for n, a in exported.params.items()} == shapes
    assert all(a.dtype == np.float64 for a in exported.params.values())
    np.testing.assert_array_equal(exported.params["block.attn.qkv.weight"], np.asarray(model.field.block.attn.qkv.weight))
    path = save_export(exported, tmp_path / "m.npz")
    back = load_export(path)
    assert (back.heads, back.mlp_ratio, back.time_embed_dim, back.layer_norm_eps) == (2, 2, 8, 1e-5)
    assert not back.tied
    for name, a in exported.params.items():
        np.testing.assert_array_equal(back.params[name], a)


def test_export_file_read_by_the_column_major_rule_round_trips(tmp_path):
    """What Julia does (reshape the raw buffer to the reversed shape, column-major, then
    reverse the axes) recovers every array exactly; skipping the axis reversal would not."""
    model = build_model(ModelConfig(**TINY), 19, jax.random.key(0))
    exported = export_model(model)
    path = save_export(exported, tmp_path / "m.npz")
    view = julia_view(path)
    assert set(view) == set(exported.params) | set(exported.config_arrays())
    for name, a in exported.params.items():
        np.testing.assert_array_equal(view[name], a)
    w = exported.params["block.attn.qkv.weight"]  # (16, 48): a wrong rule cannot pass
    naive = np.frombuffer(w.tobytes(), np.float64).reshape(w.shape, order="F")
    assert not np.array_equal(naive, w)
    import zipfile
    with zipfile.ZipFile(path) as z, z.open("block.attn.qkv.weight.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else \
            np.lib.format.read_array_header_2_0(f)
    assert (shape, fortran, dtype.str) == ((16, 48), False, "<f8")


def test_a_bad_export_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(export_mod.ExportError, match="not a readable ode-lm export"):
        load_export(bad)
    np.savez(tmp_path / "partial.npz", x=np.zeros(2))
    with pytest.raises(export_mod.ExportError, match="missing config.format_version"):
        load_export(tmp_path / "partial.npz")


# --------------------------------------------------------------------- reference vs diffrax


@pytest.fixture(scope="module")
def reference_rows():
    from ode_lm.interop.crosscheck import check_reference, random_batch

    with jax.enable_x64(True):
        model = x64_model()
        tokens, targets = random_batch(SETTINGS.vocab, 16, SETTINGS)
        rows = check_reference(model, tiny_cfg().ode, tokens, targets, SETTINGS)
        x0 = np.asarray(model.embedding(jnp.asarray(tokens)))
    return {r.check: r for r in rows}, model, tokens, targets, x0


def test_reference_matches_diffrax_on_every_fixed_step_solver(reference_rows):
    rows = reference_rows[0]
    for solver in FIXED_STEP_SOLVERS:
        for what in ("state x(1)", "logits", "loss"):
            row = rows[f"{solver} fixed {STEPS} steps {what}"]
            assert row.passed and row.max_abs <= 1e-10, row


def test_reference_matches_diffrax_adaptive(reference_rows):
    rows = reference_rows[0]
    for what in ("state x(1)", "logits", "loss"):
        row = rows[f"tsit5 adaptive vs DOP853 {what}"]
        assert row.passed and row.max_abs <= 1e-6, row


def test_gradients_match_central_differences(reference_rows):
    grads = [r for name, r in reference_rows[0].items() if name.startswith("grad ")]
    assert len(grads) == len(SETTINGS.grad_params)
    for row in grads:
        assert row.passed and row.max_rel <= 1e-6, row


def test_the_dynamics_are_not_trivial(reference_rows):
    """The state moves, and solvers differ by far more than the tolerances: a reference that
    solved with another method, or not at all, could not pass."""
    _, model, tokens, _, x0 = reference_rows
    with jax.enable_x64(True):
        x1 = {s: np.asarray(model.hidden_final(jnp.asarray(tokens), ODEConfig(solver=s, steps=STEPS))[0])
              for s in ("euler", "rk4")}
    assert np.abs(x1["rk4"] - x0).max() > 0.1
    assert np.abs(x1["rk4"] - x1["euler"]).max() > 1e-3


def test_export_reproduces_the_models_logits(reference_rows, tmp_path):
    """Python -> export file -> reference backend gives the JAX model's logits."""
    from ode_lm.interop.crosscheck import fixed_ode, jax_forward

    _, model, tokens, targets, _ = reference_rows
    with jax.enable_x64(True):  # the fixture's rk4 solve: compiled already
        _, logits, _, _ = jax_forward(model, jnp.asarray(tokens), jnp.asarray(targets),
                                      fixed_ode(tiny_cfg().ode, "rk4"))
    ref = ReferenceModel(load_export(save_export(export_model(model), tmp_path / "m.npz")))
    x1, _ = solve_fixed(ref.field, ref.embed(tokens), "rk4", STEPS)
    np.testing.assert_allclose(ref.readout(x1), np.asarray(logits), rtol=0, atol=1e-10)
    assert np.abs(np.asarray(logits)).max() > 0.5  # a real signal, not zeros


@pytest.mark.parametrize("mistake", ["exact_gelu", "gate_after_bias", "no_time"])
def test_crosscheck_catches_a_wrong_implementation(reference_rows, monkeypatch, mistake):
    """Negative controls: a plausible slip in the reference makes rows FAIL."""
    from ode_lm.interop.crosscheck import check_reference

    _, model, tokens, targets, _ = reference_rows
    if mistake == "exact_gelu":
        erf = np.vectorize(math.erf)
        monkeypatch.setattr(reference_mod, "gelu_tanh", lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))))
    elif mistake == "gate_after_bias":
        def linear(self, name, x, gate=None):
            y = x @ self.p[f"{name}.weight"] + self.p[f"{name}.bias"]
            return y if gate is None else y * gate
        monkeypatch.setattr(ReferenceModel, "linear", linear)
    else:
        original = ReferenceModel.gates
        monkeypatch.setattr(ReferenceModel, "gates", lambda self, t: original(self, 0.0))
    settings = dataclasses.replace(SETTINGS, solvers=("euler",), grad_params=("block.mlp.fc1.weight",))
    with jax.enable_x64(True):
        rows = check_reference(model, tiny_cfg().ode, tokens, targets, settings)
    assert not all(r.passed for r in rows if "fixed" in r.check)


# --------------------------------------------------------------------------- command line


def test_cli_crosscheck_reference_passes(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\ndim = 16\nheads = 2\nmlp_ratio = 2\nmax_positions = 16\ntime_embed_dim = 8\n'
                   'modulation_hidden = 8\n[ode]\nsteps = 2\n[data]\nseq_len = 8\n')
    # Gradient rows are covered in-process above; here they are off to keep the test quick.
    r = run_cli("crosscheck", str(cfg), "model.init_std=0.1", "--solvers", "euler,midpoint", "--seq", "6",
                "--grad-adjoints", "")
    assert r.returncode == 0, r.stderr + r.stdout
    passed = [line for line in r.stdout.splitlines() if " PASS" in line]
    assert len(passed) == 6 and all(line.startswith(("euler fixed 2 steps", "midpoint fixed 2 steps"))
                                    for line in passed)
    assert "FAIL" not in r.stdout and "6/6 checks passed" in r.stdout


@pytest.mark.slow
def test_cli_crosscheck_of_a_trained_run(tiny):
    from ode_lm.train import train

    result = train(tiny(**{"train.steps": 10}))
    r = run_cli("crosscheck", str(result.run_dir), "--solvers", "euler,rk4,tsit5", "--grad-adjoints", "checkpoint")
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert "checking" in r.stderr and "step_00000010.ckpt" in r.stderr


def test_cli_crosscheck_rejects_bad_flags():
    r = run_cli("crosscheck", "configs/quickstart.toml", "--solvers", "euler,rk5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "rk5" in r.stderr and "tsit5" in r.stderr


# -------------------------------------------------------------------------- Julia bridge


def _no_julia_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIAPKG_EXE", "PYTHON_JULIAPKG_OFFLINE",
                        "ODE_LM_JULIA_ALLOW_DOWNLOADS", "JULIA_DEPOT_PATH")}
    env.update(PATH=str(tmp_path / "bin"), HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), **extra)
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


GUARDED = """
import socket, sys
attempts = []
def refuse(self, *a, **k):
    attempts.append(a)
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
from ode_lm.errors import UserError
from ode_lm.interop.julia import load_julia
try:
    load_julia()
    print("LOADED")
except UserError as e:
    print("ERROR:", e)
import os
print("juliacall imported:", "juliacall" in sys.modules)
print("jax imported:", "jax" in sys.modules)
print("offline:", os.environ.get("PYTHON_JULIAPKG_OFFLINE"))
print("network attempts:", len(attempts))
"""


def test_julia_bridge_without_julia_says_how_to_get_one(tmp_path):
    r = subprocess.run([sys.executable, "-c", GUARDED], env=_no_julia_env(tmp_path), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert "ERROR: the julia backend needs Julia, and none was found" in out, r.stderr
    assert "PYTHON_JULIACALL_EXE" in out and "julialang.org" in out
    assert "juliacall imported: False" in out and "network attempts: 0" in out
    assert "jax imported: False" in out  # finding Julia is cheap: no JAX either
    assert list((tmp_path / "home").iterdir()) == []  # nothing downloaded or installed


def test_julia_bridge_goes_offline_before_juliacall(tmp_path):
    """With a Julia executable present, juliapkg is put offline before juliacall is tried."""
    fake = tmp_path / "bin" / "julia"
    env = _no_julia_env(tmp_path)
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = subprocess.run([sys.executable, "-c", GUARDED], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert "offline: yes" in r.stdout and "network attempts: 0" in r.stdout, r.stdout + r.stderr
    assert "LOADED" not in r.stdout


def test_julia_exe_env_var_must_point_at_an_executable(tmp_path):
    env = _no_julia_env(tmp_path, PYTHON_JULIACALL_EXE=str(tmp_path / "nope"))
    r = subprocess.run([sys.executable, "-c", GUARDED], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert f"PYTHON_JULIACALL_EXE={tmp_path / 'nope'} is not an executable file" in r.stdout, r.stderr


def test_cli_julia_backend_without_julia_exits_2_in_one_line(tmp_path):
    env = _no_julia_env(tmp_path)
    r = subprocess.run([sys.executable, "-m", "ode_lm.cli", "crosscheck", "configs/quickstart.toml",
                        "--backend", "julia"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("ode-lm: error: the julia backend needs Julia") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_import_ode_lm_does_not_import_juliacall():
    code = ("import sys, ode_lm, ode_lm.interop, ode_lm.interop.crosscheck, ode_lm.cli; "
            "ode_lm.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('juliacall', 'juliapkg')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


class FakeJulia:
    """Stands in for juliacall's ``Main``: answers ``ODELMCrossCheck.crosscheck`` with the NumPy
    reference, laid out as the Julia code lays its results out (``vec`` of the features-first
    arrays), so the bridge's decoding is tested without Julia."""

    def __init__(self, model, transposed_state=True):
        self.ODELMCrossCheck, self.model, self.transposed_state = self, model, transposed_state

    def crosscheck(self, path, tokens, targets, steps, fixed, adaptive, tol, grad_solver, discrete, continuous):
        from ode_lm.interop.crosscheck import fixed_ode, jax_grads

        ref, out = ReferenceModel(load_export(path)), {}
        for name in fixed.split(","):
            x1, _ = solve_fixed(ref.field, ref.embed(tokens), name, steps)
            logits = ref.readout(x1)
            b, s, v = logits.shape
            # Julia's X[d, s, b] and L[v, s + S b], flattened column-major by vec().
            out[f"fixed/{name}/state"] = (x1.transpose(2, 1, 0) if self.transposed_state else x1).ravel(order="F")
            out[f"fixed/{name}/logits"] = logits.reshape(b * s, v).T.ravel(order="F")
            out[f"fixed/{name}/loss"] = ref.loss(logits, targets)
        assert adaptive == "" and continuous == ""
        grads = export_model(jax_grads(self.model, jnp.asarray(tokens), jnp.asarray(targets),
                                       fixed_ode(tiny_cfg().ode, grad_solver, "checkpoint"))).params
        for alg in discrete.split(","):
            out.update({f"grad/{alg}/{n}": g.ravel() for n, g in grads.items()})  # Julia's c_order()
        return out


@pytest.mark.parametrize("transposed_state", [True, False])
def test_julia_bridge_decodes_the_julia_layout(reference_rows, monkeypatch, transposed_state):
    from ode_lm.interop import julia as julia_mod

    _, model, tokens, targets, _ = reference_rows
    monkeypatch.setattr(julia_mod, "load_julia", lambda: FakeJulia(model, transposed_state))
    monkeypatch.setattr(julia_mod, "CONTINUOUS_SENSEALGS", ())
    settings = dataclasses.replace(SETTINGS, solvers=("euler", "midpoint"))
    with jax.enable_x64(True):
        rows = julia_mod.check_julia(model, tiny_cfg().ode, tokens, targets, settings)
    assert [r.check for r in rows] == [f"julia {s} fixed {STEPS} steps {w}" for s in ("euler", "midpoint")
                                       for w in ("state x(1)", "logits", "loss")] + \
        ["julia grad ReverseDiffAdjoint euler fixed (all parameters)"]
    states = [r for r in rows if r.check.endswith("state x(1)")]
    if transposed_state:
        assert all(r.passed for r in rows), rows
    else:  # a layout slip on the Julia side is caught, not averaged away
        assert not any(r.passed for r in states)


@pytest.mark.julia
@pytest.mark.skipif(shutil.which("julia") is None and not os.environ.get("PYTHON_JULIAPKG_EXE")
                    and not os.environ.get("PYTHON_JULIACALL_EXE"),
                    reason="no Julia installed (put julia on PATH or set PYTHON_JULIAPKG_EXE)")
def test_julia_backend_agrees_with_diffrax(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\ndim = 16\nheads = 2\nmlp_ratio = 2\nmax_positions = 16\ntime_embed_dim = 8\n'
                   'modulation_hidden = 8\ninit_std = 0.1\n[ode]\nsteps = 3\nsolver = "rk4"\n[data]\nseq_len = 8\n')
    r = run_cli("crosscheck", str(cfg), "--backend", "julia", "--seq", "6", timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ReverseDiffAdjoint" in r.stdout and "QuadratureAdjoint" in r.stdout


# ------------------------------------------------------------------------ Julia sources


def _syntax_errors(source: bytes) -> list[str]:
    import tree_sitter_julia
    from tree_sitter import Language, Parser

    tree = Parser(Language(tree_sitter_julia.language())).parse(source)
    bad, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            bad.append(f"{node.type} at line {node.start_point[0] + 1}")
        stack.extend(node.children)
    return bad


JULIA_FILES = sorted((REPO / "julia").rglob("*.jl"))


def test_there_are_julia_sources():
    assert REPO / "julia" / "src" / "ODELMCrossCheck.jl" in JULIA_FILES


@pytest.mark.parametrize("path", JULIA_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_julia_sources_parse(path):
    assert _syntax_errors(path.read_bytes()) == []


@pytest.mark.parametrize("snippet", [b"function f(x)\n    return (x,\nend\n",
                                     b"module M\nf(x) = x +\nend\n",
                                     b"for i in 1:3\n    println(i)\n"])
def test_julia_syntax_check_catches_broken_code(snippet):
    assert _syntax_errors(snippet)


def test_julia_project_declares_the_sciml_stack():
    project = tomllib.loads((REPO / "julia" / "Project.toml").read_text())
    assert project["name"] == "ODELMCrossCheck"
    # Registry UUIDs, checked against each package's own Project.toml in the General registry.
    assert project["deps"] == {
        "ComponentArrays": "b0b7db55-cfe3-40fc-9ded-d10e2dbeff66",
        "DiffEqFlux": "aae7a2af-3d4f-5e19-a356-7da93b79d9d0",
        "LinearAlgebra": "37e2e46d-f89d-539d-b4ee-838fcccc9c8e",
        "Lux": "b2108857-7c20-44ae-9111-449ecde12c47",
        "NPZ": "15e1cf62-19b3-5cfa-8e77-841668bca605",
        "OrdinaryDiffEq": "1dea7af3-3e70-54e6-95c3-0bf5283fa5ed",
        "SciMLSensitivity": "1ed8b502-d754-442c-8d5d-10ac956f44a1",
        "Statistics": "10745b16-79ce-11e8-11f9-7d13ad32a3b2",
        "Zygote": "e88e6eb3-aa80-5325-afca-941959d7151f",
    }
    assert set(project["compat"]) == set(project["deps"]) | {"julia"}
    source = (REPO / "julia" / "src" / "ODELMCrossCheck.jl").read_text()
    for used in ("OrdinaryDiffEq", "SciMLSensitivity", "Zygote", "NPZ"):
        assert f"using {used}" in source
