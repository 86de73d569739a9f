"""Sensitivities (how gradients flow through a solve), by name.

- ``checkpoint``: backpropagate through the solver's operations, recomputing from
  O(sqrt(steps)) checkpoints (diffrax ``RecursiveCheckpointAdjoint``). Exact discrete gradient.
- ``direct``: backpropagate through every operation, storing everything (diffrax
  ``DirectAdjoint``). Exact discrete gradient; memory grows with steps.
- ``backsolve``: solve the continuous adjoint ODE backwards in time (diffrax
  ``BacksolveAdjoint``). O(1) memory; an approximation of the discrete gradient whose
  error shrinks with the solver's error.
- ``reversible``: solve with an algebraically reversible scheme built on the chosen explicit
  Runge--Kutta solver and backpropagate by reconstructing its states step by step
  (``reversible.py``). Exact gradient of that scheme; O(1) memory in the number of steps.
  Not a diffrax adjoint, so it is not in the registry below; ``integrate`` dispatches on it.
"""

from __future__ import annotations

from typing import Callable

import diffrax

SENSITIVITIES: dict[str, Callable[[], diffrax.AbstractAdjoint]] = {
    "checkpoint": diffrax.RecursiveCheckpointAdjoint,
    "direct": diffrax.DirectAdjoint,
    "backsolve": diffrax.BacksolveAdjoint,
}
