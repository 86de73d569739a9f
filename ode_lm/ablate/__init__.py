"""Ablations: grids of training runs with statistics, plots and a report, and the
inference-time depth ablation of one trained run."""

from ode_lm.ablate.depth import discretisation_gap, eval_ablation, run_gap
from ode_lm.ablate.grid import Ablation, GridPoint, load_ablation, parse_grid_args
from ode_lm.ablate.report import write_report
from ode_lm.ablate.runner import enable_compilation_cache, read_results, run_ablation
from ode_lm.ablate.stats import Summary, summarize, welch_p_value

__all__ = ["discretisation_gap", "eval_ablation", "run_gap", "Ablation", "GridPoint", "load_ablation", "parse_grid_args", "write_report",
           "enable_compilation_cache", "read_results", "run_ablation", "Summary", "summarize",
           "welch_p_value"]
