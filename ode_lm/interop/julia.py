"""The juliacall bridge to ``julia/``: the same model solved with OrdinaryDiffEq and
differentiated with SciMLSensitivity, compared against diffrax.

juliacall is imported only inside :func:`load_julia`, never by ``import ode_lm``. Before it
is imported we require an existing Julia executable (``PYTHON_JULIAPKG_EXE``, or the alias
``PYTHON_JULIACALL_EXE``, or ``julia`` on ``PATH``) and put juliapkg in offline mode, so that
nothing is downloaded unless the user sets ``ODE_LM_JULIA_ALLOW_DOWNLOADS=1``.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ode_lm.errors import UserError
from ode_lm.interop.settings import CrossCheckSettings

ALLOW_DOWNLOADS_ENV = "ODE_LM_JULIA_ALLOW_DOWNLOADS"
PROJECT_ENV = "ODE_LM_JULIA_PROJECT"  # where julia/ is, when not in this source checkout
EXE_ENVS = ("PYTHON_JULIAPKG_EXE", "PYTHON_JULIACALL_EXE")  # juliapkg reads the first
# Solvers the Julia project maps to OrdinaryDiffEq (reversible Heun has no counterpart there).
JULIA_SOLVERS = ("euler", "heun", "midpoint", "rk4", "tsit5", "dopri5")
# Discretise-then-optimise: matches diffrax's exact discrete gradient on the same grid.
DISCRETE_SENSEALGS = ("ReverseDiffAdjoint",)
# Optimise-then-discretise: continuous adjoints, compared on tight adaptive solves.
CONTINUOUS_SENSEALGS = ("BacksolveAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint")

INSTALL_HELP = ("install Julia >= 1.10 (https://julialang.org/downloads, or `curl -fsSL "
                "https://install.julialang.org | sh`) and put `julia` on PATH, or point "
                "PYTHON_JULIAPKG_EXE (alias PYTHON_JULIACALL_EXE) at a julia executable")


class JuliaUnavailable(UserError):
    """No usable Julia, juliacall or instantiated ``julia/`` project."""


def find_julia() -> str:
    """The Julia executable to use; raise :class:`JuliaUnavailable` when there is none."""
    for env in EXE_ENVS:
        path = os.environ.get(env)
        if path:
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise JuliaUnavailable(f"{env}={path} is not an executable file; {INSTALL_HELP}")
            return path
    found = shutil.which("julia")
    if found is None:
        raise JuliaUnavailable(f"the julia backend needs Julia, and none was found: {INSTALL_HELP}")
    return found


def julia_project() -> Path:
    project = Path(os.environ.get(PROJECT_ENV) or Path(__file__).resolve().parents[2] / "julia")
    if not (project / "Project.toml").is_file():
        raise JuliaUnavailable(f"no Julia project at {project}: use a source checkout of ode-lm "
                               f"(it has julia/) or set {PROJECT_ENV} to its julia/ directory")
    return project


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@functools.cache  # a failure raises and is not cached
def load_julia():
    """juliacall's ``Main`` with ``julia/`` activated and ``ODELMCrossCheck`` loaded."""
    exe = find_julia()
    project = julia_project()
    os.environ["PYTHON_JULIAPKG_EXE"] = exe  # juliapkg must never fetch a Julia of its own
    allow = os.environ.get(ALLOW_DOWNLOADS_ENV) == "1"
    if not allow:
        os.environ["PYTHON_JULIAPKG_OFFLINE"] = "yes"
    try:
        from juliacall import Main as jl  # noqa: PLC0415 (deliberately lazy)
    except ImportError:
        raise JuliaUnavailable("the julia backend needs juliacall: pip install 'ode-lm[julia]'") from None
    except Exception as e:  # juliapkg could not set up PythonCall offline
        raise JuliaUnavailable(f"juliacall could not start Julia at {exe}: {_first_line(e)}. Run once with "
                               f"{ALLOW_DOWNLOADS_ENV}=1 to let juliapkg install its packages") from None
    jl.seval(f'import Pkg; Pkg.activate(raw"{project}"; io=devnull)')
    if allow:
        jl.seval("Pkg.instantiate()")
    try:
        jl.seval("using ODELMCrossCheck")
    except Exception as e:
        raise JuliaUnavailable(
            f"cannot load the Julia project {project}: {_first_line(e)}. Instantiate it once with "
            f"`julia --project={project} -e 'using Pkg; Pkg.instantiate()'` or set "
            f"{ALLOW_DOWNLOADS_ENV}=1") from None
    return jl


def _c_order(flat, shape) -> np.ndarray:
    """A Julia ``vec`` of the reversed-dims array, read back with the Python shape."""
    return np.asarray(flat, np.float64).reshape(shape)


def check_julia(model, ode, tokens, targets, settings: CrossCheckSettings, progress=lambda _: None) -> list:
    """Forward solves and gradients from the Julia project against diffrax (float64)."""
    # JAX comes in here, not at import: finding Julia must stay cheap and JAX-free.
    import jax.numpy as jnp

    from ode_lm.interop.crosscheck import (JaxSolve, adaptive_ode, adaptive_solvers, compare, fixed_ode,
                                           forward_rows, jax_grads)
    from ode_lm.interop.export import export_model, save_export

    jl = load_julia()
    exported = export_model(model)
    fixed = [s for s in settings.solvers if s in JULIA_SOLVERS]
    adaptive = [s for s in adaptive_solvers(settings.solvers) if s in ("tsit5", "dopri5")]
    grad_solver = ode.solver if ode.solver in fixed else "rk4"
    with tempfile.TemporaryDirectory() as tmp:
        path = save_export(exported, Path(tmp) / "params.npz")
        progress("Julia: solves and sensitivities")
        out = jl.ODELMCrossCheck.crosscheck(
            str(path), np.ascontiguousarray(tokens, np.int64), np.ascontiguousarray(targets, np.int64),
            ode.steps, ",".join(fixed), ",".join(adaptive), settings.adaptive_rtol, grad_solver,
            ",".join(DISCRETE_SENSEALGS), ",".join(CONTINUOUS_SENSEALGS))
    results = {str(k): out[k] for k in out.keys()}
    b, s = tokens.shape
    state_shape = (b, s, exported.params["embedding.tokens"].shape[1])
    logits_shape = (b, s, exported.params["embedding.tokens"].shape[0])
    rows = []
    for solver in fixed:
        progress(f"diffrax fixed-step {solver}")
        jx = JaxSolve.run(model, tokens, targets, fixed_ode(ode, solver))
        key = f"fixed/{solver}"
        rows += forward_rows(f"julia {solver} fixed {ode.steps} steps", jx,
                             _c_order(results[f"{key}/state"], state_shape),
                             _c_order(results[f"{key}/logits"], logits_shape),
                             float(results[f"{key}/loss"]), "abs", settings.fixed_tol, "")
    for solver in adaptive:
        progress(f"diffrax adaptive {solver}")
        jx = JaxSolve.run(model, tokens, targets, adaptive_ode(ode, solver, settings))
        key = f"adaptive/{solver}"
        rows += forward_rows(f"julia {solver} adaptive", jx,
                             _c_order(results[f"{key}/state"], state_shape),
                             _c_order(results[f"{key}/logits"], logits_shape),
                             float(results[f"{key}/loss"]), "abs", settings.adaptive_tol, "")
    tok, tgt = jnp.asarray(tokens), jnp.asarray(targets)
    groups = ((DISCRETE_SENSEALGS, fixed_ode(ode, grad_solver, "checkpoint"), settings.julia_discrete_grad_tol,
               f"{grad_solver} fixed"),
              (CONTINUOUS_SENSEALGS, adaptive_ode(ode, "tsit5", settings, "checkpoint"),
               settings.julia_continuous_grad_tol, "tsit5 adaptive"))
    for sensealgs, diffrax_ode, tol, where in groups:
        if not sensealgs:
            continue
        progress(f"diffrax gradients, {where}")
        want = export_model(jax_grads(model, tok, tgt, diffrax_ode)).params
        flat_want = np.concatenate([a.ravel() for a in want.values()])
        for alg in sensealgs:
            flat_got = np.concatenate([_c_order(results[f"grad/{alg}/{name}"], a.shape).ravel()
                                       for name, a in want.items()])
            rows.append(compare(f"julia grad {alg} {where} (all parameters)", flat_got, flat_want, "rel", tol,
                                "vs diffrax checkpoint"))
    return rows
