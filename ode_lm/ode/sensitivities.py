"""Sensitivities (how gradients flow through a solve), by name.

- ``checkpoint``: backpropagate through the solver's operations, recomputing from
  O(sqrt(steps)) checkpoints (diffrax ``RecursiveCheckpointAdjoint``). Exact discrete gradient.
- ``direct``: backpropagate through every operation, storing everything (diffrax
  ``DirectAdjoint``). Exact discrete gradient; memory grows with steps.
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
