"""Solvers, sensitivities and ``integrate()``, the only code that calls diffrax."""

from ode_lm.ode.field import CastField, VectorField
from ode_lm.ode.integrate import SolveStats, fixed_grid, integrate
from ode_lm.ode.reversible import Reversible, integrate_reversible, reconstruct
from ode_lm.ode.sensitivities import SENSITIVITIES
from ode_lm.ode.solvers import SOLVER_SPECS, ClassicRK4, SolverSpec

__all__ = ["CastField", "VectorField", "SolveStats", "fixed_grid", "integrate", "Reversible",
           "integrate_reversible", "reconstruct", "SENSITIVITIES",
           "SOLVER_SPECS", "ClassicRK4", "SolverSpec"]
