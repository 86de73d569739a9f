"""``ode-lm analyze``: refinement, Jacobian spectrum, Lyapunov exponents, energy and gates of a
trained run (docs/analysis.md)."""

from ode_lm.analyze.dynamics import arnoldi, lyapunov, spectrum_at, trajectory
from ode_lm.analyze.refinement import observed_order, refinement, solve_errors
from ode_lm.analyze.report import analyze, check_out_dir

__all__ = ["arnoldi", "lyapunov", "spectrum_at", "trajectory", "observed_order",
           "refinement", "solve_errors", "analyze", "check_out_dir"]
