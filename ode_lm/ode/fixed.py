"""Fixed-step solves as a ``jax.lax.scan`` over diffrax's own solver steps.

A fixed grid ``t_n = n / N`` needs none of diffrax's adaptive machinery (a bounded while
loop with dynamic step sizes, per-step bookkeeping); scanning the solver's ``step`` function
over the grid compiles once for any ``N`` and lets XLA fuse across the step. The arithmetic
is diffrax's: the same solver object, tableau and state.

Reverse mode then differentiates the scan, i.e. the exact gradient of the discrete forward
computation. What each step keeps for the backward pass is a ``jax.checkpoint`` policy the
caller passes (``remat``; the sensitivity owns it, ``sensitivities.py``):

- ``None``: no rematerialisation, every intermediate is kept (``ode.adjoint = "direct"``);
  memory grows as ``N x`` (activations of one step);
- ``jax.checkpoint_policies.nothing_saveable``: only the ``N`` states; each step's
  intermediates are recomputed once in the backward pass (``checkpoint``,
  ``ode.checkpoint_saves = "states"``); about 4/3 of the work of ``direct``;
- a policy that keeps the matrix products (``checkpoint_saves = "matmuls"``): the field's
  owner knows which of its values those are (``ode_lm.nn.SAVES`` adds fused attention's
  outputs and the block's standardised inputs), from which the backward pass needs no state
  at all; the elementwise work is recomputed.

A solve may also take fewer steps than its grid holds (``taken``, traced): steps with index
``n >= taken`` are empty (``t_n = t_{n+1} = 1``) and skipped by a ``lax.cond``, so one
compiled program runs any step count up to the grid's length (``ode.steps_range``).

``ode.unroll = "unroll"`` writes the steps out one after another instead (``unrolled``;
``"auto"``, the default, does so for short solves on a GPU: ``ode.sensitivities.unrolls``): the
program, and its compile time, grow with ``N``, but each step's saved values stay where they
were computed. In a scan they are copied into per-step stacks after the products and
attention kernels that make them (XLA cannot make those kernels write into a stack), and out
again for the backward pass. Large benchmark step on an H200: 36.96 ms unrolled, 39.89 ms
scanned, 37.43 ms for the discrete ``standard`` model (docs/results/gpu.md).
"""

from __future__ import annotations

from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ode_lm.ode.field import VectorField
from ode_lm.ode.stepping import TERM

# A jax.checkpoint policy: which of a step's intermediate values reverse mode keeps.
Policy = Callable[..., bool]


def solve_fixed(solver: diffrax.AbstractSolver, field: VectorField, x0: Float[Array, "*state"],
                grid: Float[Array, " steps+1"], remat: Policy | None, unroll: bool = False,
                taken: Int[Array, ""] | None = None) -> Float[Array, "*state"]:
    """``x(1)`` after the steps of ``solver`` over ``grid`` (``fixed_grid``), each step
    rematerialised under ``remat`` (None: everything kept), scanned or (``unroll``) written
    out step by step; with ``taken`` only the first ``taken`` steps run."""
    steps = grid.shape[0] - 1
    solver_state = solver.init(TERM, grid[0], grid[1], x0, field.at_step(0))

    def step(carry, interval):
        x, state = carry
        t0, t1, n = interval
        x, _, _, state, _ = solver.step(TERM, t0, t1, x, field.at_step(n), state, made_jump=False)
        return x, state

    if remat is not None:
        # Outside a scan, XLA's common-subexpression elimination could merge the backward
        # pass's recomputation with the forward pass and keep everything alive.
        step = jax.checkpoint(step, prevent_cse=unroll, policy=remat)
    if taken is not None:
        full = step

        def step(carry, interval):
            return jax.lax.cond(interval[2] < taken, full, lambda c, _: c, carry, interval)

    if unroll:
        carry = (x0, solver_state)
        for n in range(steps):
            carry = step(carry, (grid[n], grid[n + 1], n))
        return carry[0]
    (x1, _), _ = jax.lax.scan(lambda c, i: (step(c, i), None), (x0, solver_state),
                               (grid[:-1], grid[1:], jnp.arange(steps)))
    return x1
