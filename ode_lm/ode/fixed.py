"""Fixed-step solves as a ``jax.lax.scan`` over diffrax's own solver steps.

A fixed grid ``t_n = n / N`` needs none of diffrax's adaptive machinery (a bounded while
loop with dynamic step sizes, per-step bookkeeping); scanning the solver's ``step`` function
over the grid compiles once for any ``N`` and lets XLA fuse across the step. The arithmetic
is diffrax's: the same solver object, tableau and state.

Reverse mode then differentiates the scan, i.e. the exact gradient of the discrete forward
computation. The memory policy names what each step keeps for the backward pass:

- ``everything``: every intermediate (``ode.adjoint = "direct"``); memory grows as
  ``N x`` (activations of one step);
- ``states``: only the ``N`` states; each step's intermediates are recomputed once in the
  backward pass (``ode.adjoint = "checkpoint"``); about 4/3 of the work of ``everything``;
- ``matmuls``: the outputs of the matrix products (dots without batch dimensions: the
  block's projections), of the fused attention kernel (cuDNN's output and softmax
  statistics on a GPU) and of the block's standardisation with its per-token statistics
  (``layers.standardize``), from which the backward pass needs no state at all; the
  elementwise work is recomputed, and attention too where it runs as plain XLA ops
  (``checkpoint`` with ``ode.checkpoint_saves = "matmuls"``).

``ode.unroll = "unroll"`` writes the steps out one after another instead (``unrolled``;
``"auto"``, the default, does so for short solves on a GPU: ``ode.sensitivities.unrolls``): the
program, and its compile time, grow with ``N``, but each step's saved values stay where they
were computed. In a scan they are copied into per-step stacks after the products and
attention kernels that make them (XLA cannot make those kernels write into a stack), and out
again for the backward pass. Large benchmark step on an H200: 36.96 ms unrolled, 39.89 ms
scanned, 37.43 ms for the discrete ``standard`` model (docs/results/gpu.md).
"""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ode_lm.nn.layers import STANDARDIZED
from ode_lm.ode.field import VectorField
from ode_lm.ode.stepping import TERM, fixed_grid

# JAX's primitives of the fused (cuDNN) attention forward pass: their outputs are what the
# kernel's backward pass reads, so keeping them saves running the forward kernel again.
FUSED_ATTENTION_FORWARD = frozenset({"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"})


_standardized = jax.checkpoint_policies.save_only_these_names(STANDARDIZED)


def matmuls_saveable(prim, *args, **params) -> bool:
    """Checkpoint policy: keep the block's matrix products, fused attention's outputs and the
    standardised input with its statistics."""
    return (prim.name in FUSED_ATTENTION_FORWARD or _standardized(prim, *args, **params)
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# jax.checkpoint policy of one step (None: no rematerialisation).
MEMORY_POLICIES = {
    "everything": None,
    "states": jax.checkpoint_policies.nothing_saveable,
    "matmuls": matmuls_saveable,
}


def solve_fixed(solver: diffrax.AbstractSolver, field: VectorField, x0: Float[Array, "*state"],
                steps: int, policy: str, unroll: bool = False,
                grid: Float[Array, " steps+1"] | None = None) -> Float[Array, "*state"]:
    """``x(1)`` after ``steps`` steps of ``solver`` on the grid ``fixed_grid(steps)`` (or the
    traced ``grid`` of ``steps + 1`` times, e.g. a jittered one), scanned or (``unroll``)
    written out step by step."""
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"unknown memory policy {policy!r}; choose one of {', '.join(MEMORY_POLICIES)}")
    term = TERM
    dtype = jnp.promote_types(jax.tree.leaves(x0)[0].dtype, jnp.float32)  # float64 times for float64 solves
    ts = fixed_grid(steps, dtype) if grid is None else grid.astype(dtype)
    solver_state = solver.init(term, ts[0], ts[1], x0, field.at_step(0))

    def step(carry, interval):
        x, state = carry
        t0, t1, n = interval
        x, _, _, state, _ = solver.step(term, t0, t1, x, field.at_step(n), state, made_jump=False)
        return (x, state), None

    if MEMORY_POLICIES[policy] is not None:
        # Outside a scan, XLA's common-subexpression elimination could merge the backward
        # pass's recomputation with the forward pass and keep everything alive.
        step = jax.checkpoint(step, prevent_cse=unroll, policy=MEMORY_POLICIES[policy])
    if unroll:
        carry = (x0, solver_state)
        for n in range(steps):
            carry, _ = step(carry, (ts[n], ts[n + 1], n))
        return carry[0]
    (x1, _), _ = jax.lax.scan(step, (x0, solver_state), (ts[:-1], ts[1:], jnp.arange(steps)))
    return x1
