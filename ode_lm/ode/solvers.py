"""The solver table: each name, its diffrax solver and traits (order, stages, FSAL, adaptivity).

``rk4`` is ours: diffrax has no classic Runge--Kutta 4. To make adaptive control possible
it carries a genuine embedded error estimate. Classic RK4's four stages admit no other
third-order weights (the order conditions force the RK4 weights themselves), so we add
the first-same-as-last stage ``k5 = f(t + h, y_{n+1})``, which is free in the next step.
The third-order companion ``(1/6, 1/3, 1/3, 0, 1/6)`` satisfies all four order-3
conditions; the error estimate is ``h/6 (k4 - k5)`` = O(h^4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import diffrax
import numpy as np

from ode_lm.config import ADAPTIVE_SOLVERS, REVERSIBLE_SOLVERS, SOLVERS
from ode_lm.ode.stepping import TERM


class ClassicRK4(diffrax.AbstractERK):
    """Classic 4th-order Runge--Kutta with an FSAL embedded 3rd-order error estimate.

    Butcher tableau (the last row is the FSAL stage, whose weight is zero in the solution)::

        0   |
        1/2 | 1/2
        1/2 | 0    1/2
        1   | 0    0    1
        1   | 1/6  1/3  1/3  1/6
        ----+---------------------------
            | 1/6  1/3  1/3  1/6  0      (4th order)
            | 1/6  1/3  1/3  0    1/6    (3rd order, embedded)
    """

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([1 / 2, 1 / 2, 1.0, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6, 0.0]),
        b_error=np.array([0.0, 0.0, 0.0, 1 / 6, -1 / 6]),
        a_lower=(
            np.array([1 / 2]),
            np.array([0.0, 1 / 2]),
            np.array([0.0, 0.0, 1.0]),
            np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        ),
    )
    interpolation_cls: ClassVar[Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k)

    def order(self, terms):
        return 4

    def error_order(self, terms):
        return 3


class Cost(NamedTuple):
    """Vector-field evaluations of a fixed-step loop, the one NFE rule every count uses::

        NFE = per_step * steps + initial
    """

    per_step: int
    initial: int

    def nfe(self, steps):
        """Evaluations of ``steps`` steps (an int or a traced integer)."""
        return self.per_step * steps + self.initial


@dataclass(frozen=True)
class SolverSpec:
    """A solver by name and its traits. Its ``cost``: a first-same-as-last (FSAL) method's last
    stage is the next step's first, so diffrax's loop evaluates ``stages - 1`` per step plus
    one before the first step; other methods ``stages`` per step.
    """

    make: Callable[[], diffrax.AbstractSolver]
    order: int
    stages: int
    fsal: bool
    adaptive: bool  # has an embedded error estimate (usable with ode.adaptive = true)

    @classmethod
    def of(cls, make: Callable[[], diffrax.AbstractSolver], stages: int | None = None,
           fsal: bool | None = None) -> "SolverSpec":
        """Traits from diffrax's public API: the order from ``solver.order``, adaptivity from
        ``AbstractAdaptiveSolver``, stages and FSAL from the Butcher tableau when the solver
        has one (``stages`` / ``fsal`` only for those that do not)."""
        solver = make()
        tableau = solver.tableau if isinstance(solver, diffrax.AbstractERK) else None
        if tableau is not None:
            stages, fsal = tableau.num_stages, tableau.fsal
        return cls(make, solver.order(TERM), stages, fsal, isinstance(solver, diffrax.AbstractAdaptiveSolver))

    @property
    def cost(self) -> Cost:
        return Cost(self.stages - self.fsal, int(self.fsal))

    @property
    def evals_per_step(self) -> int:
        return self.cost.per_step

    def nfe(self, steps):
        """Vector-field evaluations of ``steps`` steps of diffrax's loop (an int or traced)."""
        return self.cost.nfe(steps)

    def reversible_nfe(self, steps):
        """The same for the ``reversible`` sensitivity's scheme on this solver: each of its
        steps is two fresh one-step solves (FSAL methods pay their first stage each time)."""
        return Cost(2 * self.nfe(1), 0).nfe(steps)


SOLVER_SPECS: dict[str, SolverSpec] = {
    "euler": SolverSpec.of(diffrax.Euler, stages=1, fsal=False),
    "heun": SolverSpec.of(diffrax.Heun),
    "midpoint": SolverSpec.of(diffrax.Midpoint),
    "rk4": SolverSpec.of(ClassicRK4),
    "tsit5": SolverSpec.of(diffrax.Tsit5),
    "dopri5": SolverSpec.of(diffrax.Dopri5),
    # One evaluation per step at the auxiliary state, carried into the next (McCallum & Foster's
    # reversible Heun), and one before the first step.
    "reversible_heun": SolverSpec.of(diffrax.ReversibleHeun, stages=2, fsal=True),
}
assert tuple(SOLVER_SPECS) == SOLVERS, "solver registry and config.SOLVERS must name the same solvers"
assert tuple(n for n, s in SOLVER_SPECS.items() if s.adaptive) == ADAPTIVE_SOLVERS, \
    "config.ADAPTIVE_SOLVERS must be the solvers with an error estimate"
# The reversible sensitivity wraps the explicit Runge--Kutta methods.
assert tuple(n for n, s in SOLVER_SPECS.items() if n != "reversible_heun") == REVERSIBLE_SOLVERS
