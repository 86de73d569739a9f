"""Sensitivities: how gradients flow through a solve. One abstract base, four final classes.

Each sensitivity owns its options and has one method, ``solve(field, x0, ode, grid)``,
returning ``(x(1), SolveStats)`` whose gradient is the sensitivity's; ``ode`` gives the
solver, the steps and the tolerances. ``sensitivity(ode)`` builds the one ``ode.adjoint``
names from the config keys users type (``checkpoint_saves``, ``unroll``,
``reversible_coupling``).

With ``L`` the loss, ``x_n`` the state after step ``n`` of ``N`` and ``Phi_n`` that step::

    discrete gradient:    xbar_n = (d Phi_n / d x_n)^T xbar_{n+1},   xbar_N = dL/dx_N
    continuous adjoint:   da/dt = -a^T df/dx,   dthetabar/dt = -a^T df/dtheta,  a(1) = dL/dx(1)

``Checkpoint``, ``Direct`` and ``Reversible`` give the discrete gradient exactly (of the
scheme they solve with); ``Backsolve`` integrates the continuous adjoint backwards.
"""

from __future__ import annotations

import abc
from typing import Mapping

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ode_lm.config import ODEConfig
from ode_lm.ode.field import VectorField
from ode_lm.ode.fixed import Policy, solve_fixed
from ode_lm.ode.reversible import integrate_reversible
from ode_lm.ode.solvers import SOLVER_SPECS
from ode_lm.ode.stepping import SolveStats, diffeqsolve, fixed_grid, solve_dtype, step_control


class Grid(eqx.Module):
    """An explicit fixed-step grid of a training solve: ``times`` (``fixed_grid``) and, for a
    masked solve, the traced number of steps ``taken`` (None: all of them)."""

    times: Float[Array, " steps+1"]
    taken: Int[Array, ""] | None = None


class AbstractSensitivity(eqx.Module):
    """How reverse mode differentiates ``x(1)`` of ``dx/dt = field(t, x)``."""

    @abc.abstractmethod
    def solve(self, field: VectorField, x0: Float[Array, "*state"], ode: ODEConfig, grid: Grid | None = None
              ) -> tuple[Float[Array, "*state"], SolveStats]:
        """``x(1)`` and its stats; ``grid``: fixed steps on these traced times (training solves)."""


def _no_grid(grid: Grid | None, what: str) -> None:
    if grid is not None:
        raise ValueError(f"{what} solves on diffrax's own grid; an explicit grid (grid jitter, steps range, "
                         "regularisers) needs ode.adjoint = 'checkpoint' or 'direct' and fixed steps")


def _diffrax_solve(field, x0, ode: ODEConfig, adjoint: diffrax.AbstractAdjoint
                   ) -> tuple[Float[Array, "*state"], SolveStats]:
    """``ode.solver`` under diffrax ``diffeqsolve`` (fixed or adaptive steps), differentiated by ``adjoint``."""
    spec = SOLVER_SPECS[ode.solver]
    sol = diffeqsolve(spec.make(), field, x0, ode, diffrax.SaveAt(t1=True), adjoint)
    steps = sol.stats["num_steps"]
    return sol.ys[-1], SolveStats(spec.nfe(steps), steps, sol.result != diffrax.RESULTS.successful)


def _backprop(field, x0, ode: ODEConfig, grid: Grid | None, remat: Policy | None, unroll: bool,
              adjoint: diffrax.AbstractAdjoint) -> tuple[Float[Array, "*state"], SolveStats]:
    """Backpropagation through the solver: fixed steps as a scan (``fixed.py``) rematerialised
    under ``remat``, adaptive steps through diffrax's loop under ``adjoint``."""
    if ode.adaptive:
        _no_grid(grid, "an adaptive solve")
        return _diffrax_solve(field, x0, ode, adjoint)
    spec = SOLVER_SPECS[ode.solver]
    if grid is None:
        grid = Grid(fixed_grid(ode.steps, solve_dtype(x0)))
    times = grid.times.astype(solve_dtype(x0))  # float64 times for float64 solves
    x1 = solve_fixed(spec.make(), field, x0, times, remat, unroll, grid.taken)
    steps = jnp.asarray(times.shape[0] - 1 if grid.taken is None else grid.taken)
    return x1, SolveStats(spec.nfe(steps), steps, jnp.asarray(False))


class Checkpoint(AbstractSensitivity):
    """Backpropagate through the solver's operations, recomputing what is not kept.

    Exact gradient of the discrete forward computation. Fixed steps keep the ``N`` states
    plus what ``saves`` (a ``jax.checkpoint`` policy, named by ``ode.checkpoint_saves``)
    marks, and recompute the rest of each step once in the backward pass: memory ``N``
    states (plus the saved values), compute about 4/3 of ``Direct`` with ``states``, less
    with ``matmuls``. ``unroll`` writes the steps out instead of scanning one compiled step
    (``ode.unroll``; ``fixed.py`` says when that pays). Adaptive solves recompute from
    ``O(sqrt(max_steps))`` checkpoints (diffrax ``RecursiveCheckpointAdjoint``).
    """

    saves: Policy = eqx.field(static=True)
    unroll: bool = eqx.field(static=True, default=False)

    def solve(self, field, x0, ode, grid=None):
        return _backprop(field, x0, ode, grid, self.saves, self.unroll, diffrax.RecursiveCheckpointAdjoint())


class Direct(AbstractSensitivity):
    """Backpropagate through every step, storing everything.

    Exact gradient of the discrete forward computation, no recomputation; memory grows
    linearly with the steps (``N x`` one step's activations). Fixed steps: the scan with no
    rematerialisation (written out with ``unroll``); adaptive: diffrax
    ``RecursiveCheckpointAdjoint`` with one checkpoint per step. (diffrax's ``DirectAdjoint``
    runs a nested, checkpointed loop whose memory is nearly flat in the steps, so it is not
    this store-everything reference.)
    """

    unroll: bool = eqx.field(static=True, default=False)

    def solve(self, field, x0, ode, grid=None):
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=step_control(ode).max_steps)
        return _backprop(field, x0, ode, grid, None, self.unroll, adjoint)


class Backsolve(AbstractSensitivity):
    """Solve the continuous adjoint ODE (module docstring) backwards in time from ``t = 1``,
    re-solving ``x(t)`` backwards alongside (diffrax ``BacksolveAdjoint``).

    O(1) memory in the steps; the backward pass is a second solve, of the augmented system
    ``(x, a, thetabar)``, with one evaluation and one vector-Jacobian product of ``f`` per
    stage. An approximation of the discrete gradient whose error shrinks with the solver's
    error (and grows where the backwards re-solve of ``x`` is unstable).
    """

    def solve(self, field, x0, ode, grid=None):
        _no_grid(grid, "backsolve")
        return _diffrax_solve(field, x0, ode, diffrax.BacksolveAdjoint())


class Reversible(AbstractSensitivity):
    """Solve with an algebraically reversible scheme built on the chosen explicit Runge--Kutta
    solver (McCallum & Foster 2024) and backpropagate by reconstructing its states step by
    step (``reversible.py`` derives it).

    Exact gradient of that scheme; memory O(1) in the steps; each step costs two base steps
    forwards and two base-step VJPs backwards. ``coupling`` (``ode.reversible_coupling``,
    ``0 < lambda <= 1``) damps the scheme's parasitic mode below 1, at the price of
    amplifying rounding by ``1/lambda`` per step in the reconstruction.
    """

    coupling: float = eqx.field(static=True)

    def solve(self, field, x0, ode, grid=None):
        _no_grid(grid, "reversible")
        return integrate_reversible(field, x0, ode, coupling=self.coupling)


SENSITIVITIES: dict[str, type[AbstractSensitivity]] = {
    "checkpoint": Checkpoint, "direct": Direct, "backsolve": Backsolve, "reversible": Reversible}

# ode.unroll = "auto" writes out fixed-step solves of up to this many field evaluations on a
# GPU (the program and its compile time grow with them; the large benchmark step, 12 Euler
# steps on an H200: 36.96 ms unrolled against 39.89 ms scanned), and scans beyond and on a CPU,
# where the scan costs nothing extra and compiles faster.
AUTO_UNROLL_MAX_NFE = 16

# What a checkpointed step keeps, by ode.checkpoint_saves, for a field whose owner passes no
# policy of its own: generic JAX policies (the block's, with fused attention, are ode_lm.nn.SAVES).
GENERIC_SAVES: dict[str, Policy] = {
    "states": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def unrolls(ode: ODEConfig, backend: str | None = None) -> bool:
    """Whether a fixed-step backprop solve is written out step by step (``ode.unroll``)."""
    if ode.unroll == "auto":
        nfe = SOLVER_SPECS[ode.solver].nfe(ode.steps)
        return (backend or jax.default_backend()) == "gpu" and not ode.adaptive and nfe <= AUTO_UNROLL_MAX_NFE
    return ode.unroll == "unroll"


def checkpoint_saves(ode: ODEConfig, backend: str | None = None) -> str:
    """The policy ``ode.checkpoint_saves`` names; ``"auto"`` keeps the matrix products
    (``"matmuls"``) where the solve is unrolled on a GPU (``unrolls``), whose step it made
    15% faster at the large benchmark size on an H200 for 4.4x the saved activations, and
    only the states elsewhere (the scan, the CPU, memory first)."""
    if ode.checkpoint_saves != "auto":
        return ode.checkpoint_saves
    fixed_checkpoint = ode.adjoint == "checkpoint" and not ode.adaptive
    return "matmuls" if fixed_checkpoint and unrolls(ode, backend) else "states"


def sensitivity(ode: ODEConfig, saves: Mapping[str, Policy] = GENERIC_SAVES) -> AbstractSensitivity:
    """The sensitivity ``ode.adjoint`` names, its options from ``ode``; ``saves``: the field's
    ``jax.checkpoint`` policies by ``ode.checkpoint_saves`` name (``ode_lm.nn.SAVES`` for the
    transformer block)."""
    if ode.adjoint not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {ode.adjoint!r}; choose one of {', '.join(SENSITIVITIES)}")
    if ode.reversible and ode.adjoint != "reversible":
        raise ValueError(f"ODEConfig(reversible=True) conflicts with adjoint={ode.adjoint!r}; "
                         "pass adjoint='reversible' (config loading resolves the alias)")
    if ode.adjoint == "checkpoint":
        return Checkpoint(saves[checkpoint_saves(ode)], unrolls(ode))
    if ode.adjoint == "direct":
        return Direct(unrolls(ode))
    if ode.adjoint == "reversible":
        return Reversible(ode.reversible_coupling)
    return Backsolve()
