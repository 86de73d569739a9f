"""Text generation."""

from ode_lm.generate.sampling import generate_recompute, sample_logits

__all__ = ["generate_recompute", "sample_logits"]
