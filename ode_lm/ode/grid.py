"""Solves on a given time grid with numbered vector-field evaluations (for cached decoding).

An explicit solve on a known grid ``0 = t_0 < ... < t_N = 1`` is a known list of
vector-field evaluations: step ``n``, stage ``j``, at ``t_n + c_j h_n``. Numbering them::

    slot = initial + n * per_step + j        # GridScheme.cost, the solver table's NFE rule

lets each evaluation keep state between calls (the K/V cache of its attention, an SSM's
recurrent state). That is what makes token-by-token decoding exact: at a given slot, the
input of every earlier position does not depend on later tokens (causality), so what the
slot computed for them stays valid.

The loop is ours -- unrolled over stages, scanned over steps -- so every evaluation knows
its slot. On the same grid it reproduces ``integrate``'s diffrax solve (tested for every
solver). First-same-as-last stages (rk4, tsit5, dopri5) are not separate evaluations here:
the last stage of step ``n`` is ``f(t_{n+1}, x_{n+1})``, the first stage of step ``n + 1``.
"""

from __future__ import annotations

import abc
from typing import Callable, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from ode_lm.ode.solvers import SOLVER_SPECS, Cost, SolverSpec

State = TypeVar("State")
Carry = TypeVar("Carry")
# evaluate(slot, t, x, carry) -> (dx/dt, carry): one numbered evaluation of the vector field.
Evaluate = Callable[[Int[Array, ""], Float[Array, ""], State, Carry], tuple[State, Carry]]


def _axpy(x: PyTree, h, coeffs, ks) -> PyTree:
    """``x + sum_j coeffs[j] (h k_j)`` over nonzero coefficients.

    Summed as diffrax sums a stage (a full-precision dot product of the coefficients with
    the stacked ``h k_j``), so the two loops agree to the last bit on the same grid.
    """
    terms = [(c, k) for c, k in zip(coeffs, ks) if c != 0.0]
    if not terms:
        return x
    def one(xl, *kl):
        weights = jnp.asarray([c for c, _ in terms], xl.dtype)
        return xl + jnp.tensordot(weights, jnp.stack([h * k for k in kl]), axes=1,
                                  precision=jax.lax.Precision.HIGHEST)
    return jax.tree.map(one, x, *[k for _, k in terms])


class GridScheme(eqx.Module):
    """A one-step method run over an explicit grid, its evaluations numbered by slot."""

    cost: Cost = eqx.field(static=True)  # evaluations per step and before the first

    @property
    def evals_per_step(self) -> int:
        return self.cost.per_step

    def slots(self, steps: int) -> int:
        """Evaluations of a solve of ``steps`` steps (``Cost.nfe``): one cache slot each."""
        return self.cost.nfe(steps)

    @abc.abstractmethod
    def slot_times(self, grid: Float[Array, " steps+1"]) -> Float[Array, " slots"]:
        """The depth-time of each evaluation (cache slot) of a solve on ``grid``, as ``solve``
        passes it to ``evaluate``."""

    @abc.abstractmethod
    def solve(self, evaluate: Evaluate, grid: Float[Array, " steps+1"], x0: State, carry: Carry,
              unroll: bool = False) -> tuple[State, Carry]:
        """Integrate from ``x(grid[0]) = x0`` to ``grid[-1]``; ``carry`` threads per-slot state.

        ``unroll`` unrolls the loop over steps (no device loop: faster for one-token decode
        steps on GPU, slower to compile).
        """


class RungeKuttaScheme(GridScheme):
    """An explicit Runge--Kutta method from its Butcher tableau ``(c, a, b)``::

        k_j     = f(t_n + c_j h, x_n + h sum_{i<j} a_ji k_i)
        x_{n+1} = x_n + h sum_j b_j k_j
    """

    c: tuple[float, ...] = eqx.field(static=True)
    a: tuple[tuple[float, ...], ...] = eqx.field(static=True)  # a[j] has j entries
    b: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, c, a, b, spec: SolverSpec):
        self.c, self.b = tuple(map(float, c)), tuple(map(float, b))
        self.a = tuple(tuple(map(float, row)) for row in a)
        # The solver table's cost, except that the first stage is evaluated in its own step
        # rather than carried over from the previous one (FSAL): nothing before the first step.
        self.cost = Cost(spec.evals_per_step, 0)
        if len(self.b) != spec.evals_per_step:
            raise ValueError(f"a tableau of {len(self.b)} evaluated stages for a solver of {spec.evals_per_step}")

    @classmethod
    def from_diffrax(cls, tableau, spec: SolverSpec) -> "RungeKuttaScheme":
        """From a diffrax ``ButcherTableau``, dropping a first-same-as-last final stage (``tableau.fsal``:
        it is the next step's first stage)."""
        c = [0.0, *np.asarray(tableau.c).tolist()]
        a = [[]] + [np.asarray(row).tolist() for row in tableau.a_lower]
        b = np.asarray(tableau.b_sol).tolist()
        if tableau.fsal:
            c, a, b = c[:-1], a[:-1], b[:-1]
        return cls(c, a, b, spec)

    def slot_times(self, grid):
        # Slot n * stages + j: t_n + c_j h_n, computed as solve computes it.
        t, h = grid[:-1, None], (grid[1:] - grid[:-1])[:, None]
        return (t + jnp.asarray(self.c, grid.dtype) * h).reshape(-1)

    def solve(self, evaluate, grid, x0, carry, unroll=False):
        stages = len(self.b)

        def step(state, n):
            x, carry = state
            t, h = grid[n], grid[n + 1] - grid[n]
            ks = []
            for j in range(stages):
                k, carry = evaluate(n * stages + j, t + self.c[j] * h, _axpy(x, h, self.a[j], ks), carry)
                ks.append(k)
            return (_axpy(x, h, self.b, ks), carry), None

        (x, carry), _ = jax.lax.scan(step, (x0, carry), jnp.arange(grid.shape[0] - 1), unroll=unroll)
        return x, carry


class ReversibleHeunScheme(GridScheme):
    """The reversible Heun method (Kidger et al. 2021), as diffrax steps it::

        v_0 = f(t_0, x_0),  xhat_0 = x_0                       # slot 0
        xhat_{n+1} = 2 x_n - xhat_n + h v_n
        v_{n+1}    = f(t_{n+1}, xhat_{n+1})                    # slot n + 1
        x_{n+1}    = x_n + h/2 (v_n + v_{n+1})
    """

    def __init__(self, spec: SolverSpec):
        self.cost = spec.cost  # one evaluation before the first step, one per step

    def slot_times(self, grid):
        return grid  # slot n: t_n

    def solve(self, evaluate, grid, x0, carry, unroll=False):
        v0, carry = evaluate(jnp.asarray(0), grid[0], x0, carry)

        def step(state, n):
            x, xhat, v, carry = state
            h = grid[n + 1] - grid[n]
            xhat = jax.tree.map(lambda xl, xh, vl: 2 * xl - xh + h * vl, x, xhat, v)
            v_next, carry = evaluate(n + 1, grid[n + 1], xhat, carry)
            x = jax.tree.map(lambda xl, a, b: xl + 0.5 * h * (a + b), x, v, v_next)
            return (x, xhat, v_next, carry), None

        (x, _, _, carry), _ = jax.lax.scan(step, (x0, x0, v0, carry), jnp.arange(grid.shape[0] - 1),
                                           unroll=unroll)
        return x, carry


def grid_scheme(solver: str) -> GridScheme:
    """The grid scheme of solver ``solver`` (a ``SOLVER_SPECS`` name)."""
    spec = SOLVER_SPECS[solver]
    if solver == "reversible_heun":
        return ReversibleHeunScheme(spec)
    if solver == "euler":
        return RungeKuttaScheme(c=(0.0,), a=((),), b=(1.0,), spec=spec)
    return RungeKuttaScheme.from_diffrax(spec.make().tableau, spec)
