"""Text generation: KV-cached decoding (ODE solves included), sampling, streaming."""

from ode_lm.generate.decode import TRACES, check_settings, generate, greedy_logits, training_sample
from ode_lm.generate.sampling import Sampling, sample
from ode_lm.generate.stream import TextStream

__all__ = ["TRACES", "check_settings", "generate", "greedy_logits", "training_sample", "Sampling", "sample", "TextStream"]
