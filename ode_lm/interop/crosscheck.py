"""Cross-checks of ode-lm's JAX/diffrax model against an independent implementation.

Everything runs in float64. For each solver the diffrax solve and the other backend's solve
start from the same parameters and tokens; we compare the final state ``x(1)``, the logits
and the loss. Fixed-step solves use the same grid, so they agree to round-off; adaptive
solves both run at tight tolerances and agree to about those tolerances. Gradients of the
loss (diffrax, through the exact discrete sensitivities) are compared with fourth-order
central finite differences of the reference loss.

A row's ``max_abs`` is ``max |a - b|``; ``max_rel`` is ``max |a - b| / max |b|`` (relative to
the largest magnitude, so near-zero entries do not dominate). ``measure`` says which of the
two the row's tolerance bounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ode_lm.config import Config, ODEConfig
from ode_lm.errors import UserError
from ode_lm.interop.export import export_model
from ode_lm.interop.reference import FIXED_STEP_SOLVERS, ReferenceModel, solve_adaptive, solve_fixed
from ode_lm.interop.settings import CrossCheckSettings
from ode_lm.models import ODELanguageModel, build_model
from ode_lm.ode import SOLVER_SPECS, cast_floating


@dataclass(frozen=True)
class Row:
    check: str
    max_abs: float
    max_rel: float
    measure: str  # "abs" or "rel"
    tol: float
    note: str = ""

    @property
    def passed(self) -> bool:
        value = self.max_abs if self.measure == "abs" else self.max_rel
        return bool(np.isfinite(value) and value <= self.tol)


def compare(check: str, got, want, measure: str, tol: float, note: str = "") -> Row:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Row(check, np.inf, np.inf, measure, tol, f"shape {got.shape} != {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return Row(check, diff, diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf), measure, tol, note)


def format_table(rows: list[Row]) -> str:
    header = ("check", "max abs", "max rel", "tolerance", "result")
    body = [(r.check, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.measure} <= {r.tol:.0e}",
             ("PASS" if r.passed else "FAIL") + (f"  ({r.note})" if r.note else "")) for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the JAX side


def _forward(model: ODELanguageModel, tokens, targets, ode: ODEConfig):
    x1, stats = model.hidden_final(tokens, ode)
    logits = model.readout(x1, model.embedding)
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
    return x1, logits, loss, stats


jax_forward = eqx.filter_jit(_forward)
jax_grads = eqx.filter_jit(eqx.filter_grad(lambda m, tok, tgt, ode: _forward(m, tok, tgt, ode)[2]))


def float64_model(cfg: Config, settings: CrossCheckSettings, model: ODELanguageModel | None = None
                  ) -> ODELanguageModel:
    """The model to check, in float64 (x64 must be on).

    Without a trained ``model`` one is built from ``cfg`` and every parameter gets Gaussian
    noise of std ``model.init_std``: zero biases and unit norm gains would hide mistakes.
    """
    if not jax.config.jax_enable_x64:
        raise RuntimeError("cross-checks run in float64: enable jax_enable_x64 first")
    if model is not None:
        return cast_floating(model, jnp.float64)
    model = build_model(cfg.model, settings.vocab, jax.random.key(settings.seed), jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(settings.seed + 1)
    noisy = [x + cfg.model.init_std * jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


def random_batch(vocab: int, max_positions: int, settings: CrossCheckSettings) -> tuple[np.ndarray, np.ndarray]:
    if settings.seq > max_positions:
        raise UserError(f"--seq {settings.seq} exceeds the model's max_positions = {max_positions}")
    rng = np.random.default_rng(settings.seed)
    ids = rng.integers(0, vocab, (settings.batch, settings.seq + 1))
    return ids[:, :-1], ids[:, 1:]


def fixed_ode(ode: ODEConfig, solver: str, adjoint: str | None = None) -> ODEConfig:
    return _compared_ode(ode, solver=solver, adaptive=False, adjoint=adjoint or ode.adjoint)


def adaptive_ode(ode: ODEConfig, solver: str, settings: CrossCheckSettings, adjoint: str | None = None
                 ) -> ODEConfig:
    return _compared_ode(ode, solver=solver, adaptive=True, rtol=settings.adaptive_rtol,
                         atol=settings.adaptive_rtol, max_steps=settings.adaptive_max_steps,
                         adjoint=adjoint or ode.adjoint)


def _compared_ode(ode: ODEConfig, **values) -> ODEConfig:
    """``ode`` with ``values``; the options that only choose memory or loop form for the trained
    solve, or apply to training solves only, go back to their defaults (the numbers are the same)."""
    return dataclasses.replace(ode, reversible=values["adjoint"] == "reversible", checkpoint_saves="states",
                               unroll="auto", grid_jitter=0.0, kinetic_weight=0.0, jacobian_weight=0.0, **values)


def adaptive_solvers(solvers) -> list[str]:
    """Adaptive checks at tight tolerances are cheap only for high-order solvers."""
    return [s for s in solvers if SOLVER_SPECS[s].order >= 4]


@dataclass
class JaxSolve:
    x1: np.ndarray
    logits: np.ndarray
    loss: float
    nfe: int

    @classmethod
    def run(cls, model, tokens, targets, ode: ODEConfig) -> "JaxSolve":
        x1, logits, loss, stats = jax_forward(model, jnp.asarray(tokens), jnp.asarray(targets), ode)
        if bool(stats.failed):
            raise RuntimeError(f"the diffrax {ode.solver} solve failed (max_steps = {ode.max_steps})")
        return cls(np.asarray(x1), np.asarray(logits), float(loss), int(stats.nfe))


# ----------------------------------------------------------------------- the reference side


def reference_forward(ref: ReferenceModel, tokens, targets, solve: Callable) -> tuple[np.ndarray, np.ndarray, float, int]:
    x1, nfe = solve(ref.field, ref.embed(tokens))
    logits = ref.readout(x1)
    return x1, logits, ref.loss(logits, targets), nfe


def forward_rows(label: str, jx: JaxSolve, x1, logits, loss, measure: str, tol: float, note: str) -> list[Row]:
    return [compare(f"{label} state x(1)", jx.x1, x1, measure, tol, note),
            compare(f"{label} logits", jx.logits, logits, measure, tol),
            compare(f"{label} loss", jx.loss, loss, measure, tol)]


def central_difference(ref: ReferenceModel, name: str, index: tuple[int, ...], loss: Callable[[], float],
                       eps: float) -> float:
    """d loss / d p[name][index] by the fourth-order central difference

        (8 (L(p + h) - L(p - h)) - (L(p + 2h) - L(p - 2h))) / (12 h)

    whose truncation error is O(h^4): with h = 1e-4 both it and the round-off (~1e-16 L / h)
    stay far below the 1e-6 relative tolerance, which a second-order stencil cannot promise.
    """
    array = ref.p[name]
    saved = array[index]
    values = {}
    try:
        for k in (-2, -1, 1, 2):
            array[index] = saved + k * eps
            values[k] = loss()
    finally:
        array[index] = saved
    return (8 * (values[1] - values[-1]) - (values[2] - values[-2])) / (12 * eps)


def check_reference(model: ODELanguageModel, ode: ODEConfig, tokens, targets,
                    settings: CrossCheckSettings, progress: Callable[[str], None] = lambda _: None) -> list[Row]:
    """Every comparison of the diffrax model against the float64 NumPy reference."""
    ref = ReferenceModel(export_model(model))
    rows: list[Row] = []
    for solver in settings.solvers:
        if solver not in FIXED_STEP_SOLVERS:
            continue
        progress(f"fixed-step {solver}")
        jx = JaxSolve.run(model, tokens, targets, fixed_ode(ode, solver))
        x1, logits, loss, nfe = reference_forward(
            ref, tokens, targets, lambda f, x0: solve_fixed(f, x0, solver, ode.steps))
        rows += forward_rows(f"{solver} fixed {ode.steps} steps", jx, x1, logits, loss, "abs",
                             settings.fixed_tol, f"nfe {jx.nfe} vs {nfe}")
    for solver in adaptive_solvers(settings.solvers):
        progress(f"adaptive {solver}")
        jx = JaxSolve.run(model, tokens, targets, adaptive_ode(ode, solver, settings))
        x1, logits, loss, nfe = reference_forward(
            ref, tokens, targets, lambda f, x0: solve_adaptive(f, x0, settings.adaptive_method,
                                                              settings.adaptive_rtol, settings.adaptive_rtol))
        rows += forward_rows(f"{solver} adaptive vs {settings.adaptive_method}", jx, x1, logits, loss,
                             "abs", settings.adaptive_tol, f"nfe {jx.nfe} vs {nfe}")
    rows += check_gradients(model, ref, ode, tokens, targets, settings, progress)
    return rows


def gradient_solver(ode: ODEConfig, settings: CrossCheckSettings) -> str:
    """The config's solver when the reference has it on a fixed grid, else rk4."""
    candidates = [s for s in settings.solvers if s in FIXED_STEP_SOLVERS]
    return ode.solver if ode.solver in candidates else (candidates[0] if candidates else "rk4")


def check_gradients(model, ref: ReferenceModel, ode: ODEConfig, tokens, targets,
                    settings: CrossCheckSettings, progress=lambda _: None) -> list[Row]:
    """diffrax gradients (exact discrete adjoints) vs central differences of the reference loss.

    For each parameter array named in ``settings.grad_params`` the entry with the largest
    diffrax gradient is perturbed, so the relative difference is not dominated by round-off.
    """
    solver = gradient_solver(ode, settings)
    loss = lambda: reference_forward(ref, tokens, targets,
                                     lambda f, x0: solve_fixed(f, x0, solver, ode.steps))[2]
    unknown = [n for n in settings.grad_params if n not in ref.p]
    if unknown:
        raise UserError(f"--grad-params: no parameter named {', '.join(unknown)}; "
                        f"the model has {', '.join(sorted(ref.p))}")
    rows = []
    for adjoint in settings.grad_adjoints:
        progress(f"gradients ({adjoint})")
        grads = export_model(jax_grads(model, jnp.asarray(tokens), jnp.asarray(targets),
                                       fixed_ode(ode, solver, adjoint))).params
        for name in settings.grad_params:
            index = np.unravel_index(int(np.argmax(np.abs(grads[name]))), grads[name].shape)
            fd = central_difference(ref, name, index, loss, settings.fd_eps)
            label = f"grad {adjoint} {solver} {name}[{','.join(map(str, index))}]"
            rows.append(compare(label, grads[name][index], fd, "rel", settings.grad_tol,
                                "vs central difference"))
    return rows
