"""The ``reversible`` sensitivity: exact gradients in memory that does not grow with steps.

Any explicit Runge--Kutta method is made algebraically reversible (McCallum & Foster, 2024,
"Efficient, accurate and stable gradients for neural ODEs") by carrying a second state
``z`` beside the solution ``y``. Write ``Psi(a, b, x)`` for the increment of one step of the
base method from time ``a`` to time ``b`` (``b < a`` steps backwards), so that
``x + Psi(a, b, x)`` approximates ``x(b)``. With ``y_0 = z_0 = x(0)`` and coupling
``0 < lambda <= 1`` (``ode.reversible_coupling``), step ``n`` over ``[t_n, t_{n+1}]`` is::

    y_{n+1} = lambda y_n + (1 - lambda) z_n + Psi(t_n, t_{n+1}, z_n)
    z_{n+1} = z_n - Psi(t_{n+1}, t_n, y_{n+1})

and the solve returns ``y_N``. Both lines are explicit in the unknown, so the step inverts
exactly (up to rounding)::

    z_n = z_{n+1} + Psi(t_{n+1}, t_n, y_{n+1})
    y_n = (y_{n+1} - (1 - lambda) z_n - Psi(t_n, t_{n+1}, z_n)) / lambda

The scheme converges with the base method's order; ``lambda < 1`` damps the parasitic
mode of ``y - z`` (``lambda = 1`` is undamped), at the price of amplifying rounding by
``1/lambda`` per step when inverting.

Backward pass. Only ``y_N, z_N`` and the accepted times ``t_1 .. t_N`` are kept (a buffer
of ``max_steps`` scalars). Walking ``n = N-1 .. 0`` it reconstructs ``(y_n, z_n)`` with the
inverse above, and because the inverse evaluates exactly the two increments of the forward
step, their vector-Jacobian products come from the same calls (no third evaluation). With
``Psi_b = Psi(t_{n+1}, t_n, .)`` at ``y_{n+1}`` and ``Psi_f = Psi(t_n, t_{n+1}, .)`` at
``z_n``, the cotangents ``(ybar, zbar)`` of ``(y_{n+1}, z_{n+1})`` become::

    a        = ybar_{n+1} - (d Psi_b / dy)^T zbar_{n+1}      # y_{n+1} also feeds z_{n+1}
    theta   += (d Psi_f / dtheta)^T a - (d Psi_b / dtheta)^T zbar_{n+1}
    ybar_n   = lambda a
    zbar_n   = zbar_{n+1} + (1 - lambda) a + (d Psi_f / dz)^T a

and finally ``xbar(0) = ybar_0 + zbar_0``. This is the gradient of the discrete forward
computation, the same one ``direct`` backpropagation through the scheme gives. With
adaptive steps the step sizes are treated as constants, as diffrax's controllers do.
Each step costs two base steps forwards and two base-step VJPs backwards.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ode_lm.config import REVERSIBLE_SOLVERS, ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.solvers import SOLVER_SPECS
from ode_lm.ode.stepping import T0, TERM, SolveStats, diffeqsolve, step_control


def increment(solver: diffrax.AbstractSolver, terms, t0, t1, y, args):
    """``Psi(t0, t1, y)``: one fresh step of ``solver`` (no first-same-as-last reuse), minus ``y``.

    Returns the increment, the base method's error estimate and its result code.
    """
    state = solver.init(terms, t0, t1, y, args)
    y1, error, _, _, result = solver.step(terms, t0, t1, y, args, state, False)
    return y1 - y, error, result


class ReversibleRungeKutta(diffrax.AbstractAdaptiveSolver):
    """An explicit Runge--Kutta ``solver`` made algebraically reversible (module docstring).

    Its solver state is ``z``; its error estimate is the base method's estimate for the
    increment ``Psi(t_n, t_{n+1}, z_n)`` that enters ``y_{n+1}``.
    """

    solver: diffrax.AbstractSolver
    coupling: float = eqx.field(static=True)
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = diffrax.LocalLinearInterpolation

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return y0  # z_0 = y_0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        z0, lam = solver_state, self.coupling
        psi_f, y_error, result_f = increment(self.solver, terms, t0, t1, z0, args)
        y1 = lam * y0 + (1 - lam) * z0 + psi_f
        psi_b, _, result_b = increment(self.solver, terms, t1, t0, y1, args)
        z1 = z0 - psi_b
        result = diffrax.RESULTS.where(result_f == diffrax.RESULTS.successful, result_b, result_f)
        return y1, y_error, dict(y0=y0, y1=y1), z1, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


def reversible_solver(ode: ODEConfig, coupling: float | None = None) -> ReversibleRungeKutta:
    """``ode.solver`` made reversible with ``coupling`` (default ``ode.reversible_coupling``)."""
    if ode.solver not in REVERSIBLE_SOLVERS:
        raise ValueError(f"the reversible sensitivity wraps an explicit Runge-Kutta solver; "
                         f"{ode.solver!r} is not one; use one of {', '.join(REVERSIBLE_SOLVERS)}")
    lam = ode.reversible_coupling if coupling is None else coupling
    return ReversibleRungeKutta(SOLVER_SPECS[ode.solver].make(), lam)


def _solve(solver: ReversibleRungeKutta, field: VectorField, x0, ode: ODEConfig,
           adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint()):
    """The forward solve; also returns ``z_N`` and the accepted times ``t_1 .. t_N`` (inf-padded)."""
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(t1=True),
                                  diffrax.SubSaveAt(steps=True, fn=lambda t, y, args: None)],
                            solver_state=True)
    sol = diffeqsolve(solver, field, x0, ode, saveat, adjoint)
    steps = sol.stats["num_steps"]
    stats = SolveStats(SOLVER_SPECS[ode.solver].reversible_nfe(steps), steps, sol.result != diffrax.RESULTS.successful)
    return sol.ys[0][-1], sol.solver_state, sol.ts[1], sol.stats["num_accepted_steps"], stats


@eqx.filter_custom_vjp
def _solve_reversible(field_x0, solver, ode):
    y1, _, _, _, stats = _solve(solver, *field_x0, ode)
    return y1, stats


@_solve_reversible.def_fwd
def _solve_reversible_fwd(perturbed, field_x0, solver, ode):
    y1, z1, times, accepted, stats = _solve(solver, *field_x0, ode)
    return (y1, stats), (y1, z1, times, accepted)


def _walk_back(solver: ReversibleRungeKutta, field: VectorField, y_end, z_end, times, accepted, ybar_end):
    """Steps ``N-1 .. 0`` backwards: reconstruct ``(y_n, z_n)`` and pull cotangents through.

    Returns ``(y_0, z_0, ybar_0, zbar_0, thetabar)``; ``thetabar`` has the structure of
    ``field`` with ``None`` at leaves that are not floating-point arrays.
    """
    params, static = eqx.partition(field, eqx.is_inexact_array)
    base, lam = solver.solver, solver.coupling

    def psi(p, t0, t1, x):
        return increment(base, TERM, t0, t1, x, eqx.combine(p, static))[0]

    def back_step(i, carry):
        y1, z1, ybar, zbar, pbar = carry
        n = accepted - 1 - i
        t1 = times[n]
        t0 = jnp.where(n > 0, times[jnp.maximum(n - 1, 0)], jnp.asarray(T0, times.dtype))
        psi_b, vjp_b = jax.vjp(lambda p, x: psi(p, t1, t0, x), params, y1)
        z0 = z1 + psi_b
        psi_f, vjp_f = jax.vjp(lambda p, x: psi(p, t0, t1, x), params, z0)
        y0 = (y1 - (1 - lam) * z0 - psi_f) / lam
        pbar_b, ybar_b = vjp_b(zbar)
        a = ybar - ybar_b
        pbar_f, zbar_f = vjp_f(a)
        pbar = jax.tree.map(lambda acc, f, b: acc + f - b, pbar, pbar_f, pbar_b)
        return y0, z0, lam * a, zbar + (1 - lam) * a + zbar_f, pbar

    carry = (y_end, z_end, ybar_end, jnp.zeros_like(z_end), jax.tree.map(jnp.zeros_like, params))
    return jax.lax.fori_loop(0, accepted, back_step, carry)


@_solve_reversible.def_bwd
def _solve_reversible_bwd(residuals, grad_obj, perturbed, field_x0, solver, ode):
    y_end, z_end, times, accepted = residuals
    ybar_end = grad_obj[0] if grad_obj[0] is not None else jnp.zeros_like(y_end)
    _, _, ybar0, zbar0, pbar = _walk_back(solver, field_x0[0], y_end, z_end, times, accepted, ybar_end)
    return pbar, ybar0 + zbar0  # y_0 = z_0 = x(0)


def reconstruct(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig
                ) -> tuple[Float[Array, "*state"], Float[Array, "*state"]]:
    """Solve forwards, then walk back as the backward pass does: ``(y_0, z_0)``, both ~ ``x0``.

    Their distance from ``x0`` is the reconstruction error that enters reversible gradients.
    """
    solver = reversible_solver(ode)
    y_end, z_end, times, accepted, _ = _solve(solver, field, x0, ode)
    y0, z0, _, _, _ = _walk_back(solver, field, y_end, z_end, times, accepted, jnp.zeros_like(y_end))
    return y0, z0


def integrate_reversible(field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig, *,
                         gradient: Literal["reversible", "direct"] = "reversible",
                         coupling: float | None = None) -> tuple[Float[Array, "*state"], SolveStats]:
    """Solve with the reversible scheme (coupling ``coupling``, default
    ``ode.reversible_coupling``); ``x(1)`` and stats as :func:`ode_lm.ode.integrate` (this is
    its ``reversible`` sensitivity).

    ``gradient="reversible"`` backpropagates by reconstructing states (O(1) memory in the
    steps); ``"direct"`` backpropagates through the same scheme storing the state after every
    step (the ``direct`` sensitivity's way), the reference the reversible gradient must equal.
    """
    solver = reversible_solver(ode, coupling)
    if gradient == "reversible":
        return _solve_reversible((field, x0), solver, ode)
    if gradient == "direct":
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=step_control(ode).max_steps)
        y1, _, _, _, stats = _solve(solver, field, x0, ode, adjoint)
        return y1, stats
    raise ValueError(f"unknown gradient {gradient!r}; choose reversible or direct")
