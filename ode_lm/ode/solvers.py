"""Solvers by name, with what each costs per step (for counting function evaluations).

``rk4`` is ours: diffrax has no classic Runge--Kutta 4. To make adaptive control possible
it carries a genuine embedded error estimate. Classic RK4's four stages admit no other
third-order weights (the order conditions force the RK4 weights themselves), so we add
the first-same-as-last stage ``k5 = f(t + h, y_{n+1})``, which is free in the next step.
The third-order companion ``(1/6, 1/3, 1/3, 0, 1/6)`` satisfies all four order-3
conditions; the error estimate is ``h/6 (k4 - k5)`` = O(h^4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import diffrax
import numpy as np
from diffrax._local_interpolation import ThirdOrderHermitePolynomialInterpolation

from ode_lm.config import SOLVERS


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
    interpolation_cls: ClassVar[Callable[..., ThirdOrderHermitePolynomialInterpolation]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k)

    def order(self, terms):
        return 4

    def error_order(self, terms):
        return 3


@dataclass(frozen=True)
class SolverSpec:
    """A solver and its cost: ``NFE = evals_per_step * steps + initial_evals``."""

    make: Callable[[], diffrax.AbstractSolver]
    order: int
    evals_per_step: int
    initial_evals: int  # FSAL solvers evaluate f once before the first step

    def nfe(self, num_steps):
        return self.evals_per_step * num_steps + self.initial_evals


SOLVER_SPECS: dict[str, SolverSpec] = {
    "euler": SolverSpec(diffrax.Euler, 1, 1, 0),
    "heun": SolverSpec(diffrax.Heun, 2, 2, 0),
    "midpoint": SolverSpec(diffrax.Midpoint, 2, 2, 0),
    "rk4": SolverSpec(ClassicRK4, 4, 4, 1),
    "tsit5": SolverSpec(diffrax.Tsit5, 5, 6, 1),
    "dopri5": SolverSpec(diffrax.Dopri5, 5, 6, 1),
    "reversible_heun": SolverSpec(diffrax.ReversibleHeun, 2, 1, 1),
}
assert tuple(SOLVER_SPECS) == SOLVERS, "solver registry and config.SOLVERS must name the same solvers"
