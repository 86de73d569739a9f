"""Solvers, sensitivities and ``integrate()``, the only code that calls diffrax."""

from ode_lm.ode.field import CastField, VectorField, cast_floating
from ode_lm.ode.grid import GridScheme, ReversibleHeunScheme, RungeKuttaScheme, grid_scheme
from ode_lm.ode.integrate import (TRAINING_SOLVE_ADJOINTS, SolveStats, accepted_grid, fixed_grid, integrate,
                                  jittered_grid, training_grid, training_solve)
from ode_lm.ode.regularise import Augmented
from ode_lm.ode.reversible import ReversibleRungeKutta, integrate_reversible, reconstruct
from ode_lm.ode.sensitivities import (SENSITIVITIES, AbstractSensitivity, Backsolve, Checkpoint, Direct, Grid,
                                      Reversible, checkpoint_saves, sensitivity)
from ode_lm.ode.solvers import SOLVER_SPECS, ClassicRK4, Cost, SolverSpec
from ode_lm.ode.stepping import solve_dtype

__all__ = ["CastField", "VectorField", "cast_floating", "GridScheme", "ReversibleHeunScheme",
           "RungeKuttaScheme", "grid_scheme", "SolveStats", "accepted_grid", "fixed_grid", "integrate",
           "jittered_grid", "training_grid", "training_solve", "TRAINING_SOLVE_ADJOINTS", "Augmented",
           "ReversibleRungeKutta", "integrate_reversible", "reconstruct", "SENSITIVITIES",
           "AbstractSensitivity", "Backsolve", "Checkpoint", "Direct", "Grid", "Reversible", "checkpoint_saves",
           "sensitivity",
           "SOLVER_SPECS", "ClassicRK4", "Cost", "SolverSpec", "solve_dtype"]
