"""Cross-checks against independent implementations: a float64 NumPy reference backend
(always available) and a juliacall bridge to the Julia project in ``julia/`` (optional).

Nothing here imports juliacall until the Julia backend is asked for.
"""

from ode_lm.interop.export import ExportedModel, ExportError, export_model, load_export, save_export
from ode_lm.interop.reference import ReferenceModel, solve_adaptive, solve_fixed

__all__ = ["ExportedModel", "ExportError", "export_model", "load_export", "save_export",
           "ReferenceModel", "solve_adaptive", "solve_fixed"]
