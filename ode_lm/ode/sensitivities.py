"""Sensitivities (how gradients flow through a solve), by name.

- ``checkpoint``: backpropagate through the solver's operations, recomputing what is not
  stored. Exact discrete gradient. Fixed steps store the ``N`` states and recompute each
  step's intermediates once (``ode_lm.ode.fixed``, policy ``recompute``); adaptive solves
  recompute from O(sqrt(max_steps)) checkpoints (diffrax ``RecursiveCheckpointAdjoint``).
- ``direct``: backpropagate through every operation, storing everything (fixed steps:
  policy ``store``; adaptive: diffrax ``DirectAdjoint``). Exact discrete gradient; memory
  grows with steps.
- ``backsolve``: solve the continuous adjoint ODE backwards in time (diffrax
  ``BacksolveAdjoint``). O(1) memory; an approximation of the discrete gradient whose
  error shrinks with the solver's error.
"""

from __future__ import annotations

from typing import Callable

import diffrax

SENSITIVITIES: dict[str, Callable[[], diffrax.AbstractAdjoint]] = {
    "checkpoint": diffrax.RecursiveCheckpointAdjoint,
    "direct": diffrax.DirectAdjoint,
    "backsolve": diffrax.BacksolveAdjoint,
}

# Fixed-step solves differentiated by backpropagation: the scan's memory policy per sensitivity.
FIXED_STEP_POLICIES: dict[str, str] = {"checkpoint": "recompute", "direct": "store"}
