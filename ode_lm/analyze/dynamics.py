"""The learned dynamics along a trajectory: spectrum, Lyapunov exponents, energy.

Everything here is matrix-free: the Jacobian ``J(t) = df/dx (t, x(t))`` of a real model
acts on a state of ``batch x seq x dim`` numbers, so it is only ever applied to vectors:
``J v`` (a JVP, computed as the transpose of the VJP: ``linearize``) and ``J^T w`` (a VJP).

- ``trajectory``: ``x(t_n)`` on the grid ``t_n = n / M`` by classic RK4 (``M`` steps).
- ``arnoldi``: the leading eigenvalues of a linear operator from ``k`` steps of the Arnoldi
  iteration (Ritz values of the Hessenberg matrix ``H_k = Q_k^T J Q_k``), with twice-applied
  Gram--Schmidt. ``k`` = the dimension gives the exact spectrum; smaller ``k`` gives the
  extremal eigenvalues first.
- ``lyapunov``: finite-time Lyapunov exponents over ``[0, 1]``,
  ``lambda_i = log sigma_i(Phi)`` with ``Phi = dx(1)/dx(0)`` the linearised flow (the
  product of the RK4 step maps' Jacobians). Perturbations are propagated by JVPs with QR
  re-orthonormalisation after every step (``Q_{n+1} R_n = J_{S_n} Q_n``), which keeps them
  from collapsing onto the leading direction; ``sum_n log |diag R_n|`` is then
  ``log |diag R|`` of ``Phi Q_0 = Q R``. Started from the ``k`` leading right singular
  vectors of ``Phi`` (found by orthogonal iteration: forward JVP sweeps alternating with
  backward VJP sweeps, each with the same re-orthonormalisation), those diagonals are the
  singular values themselves. For ``f = A x`` with ``A`` normal, ``sigma_i(e^A) =
  e^{Re lambda_i(A)}``: the exponents are the eigenvalues' real parts.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ode_lm.ode import VectorField, fixed_grid, solve_dtype


def rk4_step(field: VectorField, t: Float[Array, ""], h: Float[Array, ""], x: Array) -> Array:
    """One classic RK4 step of ``dx/dt = field(t, x)`` from ``t`` to ``t + h``."""
    k1 = field(t, x)
    k2 = field(t + h / 2, x + h / 2 * k1)
    k3 = field(t + h / 2, x + h / 2 * k2)
    k4 = field(t + h, x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@eqx.filter_jit
def trajectory(field: VectorField, x0: Array, steps: int) -> tuple[Float[Array, " M+1"], Array]:
    """``(t_n, x(t_n))`` for ``n = 0 .. steps`` on the uniform grid, by RK4."""
    ts = fixed_grid(steps, solve_dtype(x0))

    def step(x, n):
        x = rk4_step(field, ts[n], ts[n + 1] - ts[n], x)
        return x, x

    _, xs = jax.lax.scan(step, x0, jnp.arange(steps))
    return ts, jnp.concatenate([x0[None], xs])


def linearize(fn: Callable[[Array], Array], x: Array) -> tuple[Callable, Callable]:
    """``(v -> J v, w -> J^T w)`` with ``J = dfn/dx`` at ``x``, by reverse mode only.

    The block's layers define custom VJPs, which forward mode cannot enter; ``w -> J^T w`` is
    linear, so its own VJP (at any point, here 0) is its transpose ``v -> J v``."""
    y, pullback = jax.vjp(fn, x)
    _, push = jax.vjp(lambda w: pullback(w)[0], jnp.zeros_like(y))
    return (lambda v: push(v.astype(y.dtype))[0]), (lambda w: pullback(w.astype(y.dtype))[0])


@eqx.filter_jit
def _jvp(field, t, x, v):
    return linearize(lambda y: field(t, y), x)[0](v)


@eqx.filter_jit
def _gram(field, t, x, v):
    """``J^T J v``: the normal operator, whose top eigenvalue is ``||J||_2^2``."""
    push, pull = linearize(lambda y: field(t, y), x)
    return pull(push(v))


def arnoldi(matvec: Callable[[np.ndarray], np.ndarray], v0: np.ndarray, k: int) -> np.ndarray:
    """Ritz values of ``k`` Arnoldi steps from ``v0`` (float64), largest modulus first."""
    n = v0.size
    k = min(k, n)
    basis = np.zeros((k + 1, n))
    hess = np.zeros((k + 1, k))
    basis[0] = v0.ravel() / np.linalg.norm(v0)
    m = k
    for j in range(k):
        w = np.asarray(matvec(basis[j]), np.float64).ravel()
        for _ in range(2):  # Gram--Schmidt twice: orthogonal to working precision
            coeffs = basis[:j + 1] @ w
            w = w - coeffs @ basis[:j + 1]
            hess[:j + 1, j] += coeffs
        hess[j + 1, j] = np.linalg.norm(w)
        if hess[j + 1, j] <= 1e-12 * max(np.abs(hess[:j + 2, :j + 1]).max(), 1e-300):
            m = j + 1  # an invariant subspace: its Ritz values are exact eigenvalues
            break
        basis[j + 1] = w / hess[j + 1, j]
    values = np.linalg.eigvals(hess[:m, :m])
    return values[np.argsort(-np.abs(values), kind="stable")]


def spectrum_at(field: VectorField, t, x: Array, k: int, seed: int) -> dict:
    """Leading eigenvalues of ``J(t)`` at state ``x``, its spectral radius and 2-norm."""
    rng = np.random.default_rng(seed)
    shape = x.shape

    def jv(v):
        return np.asarray(_jvp(field, t, x, jnp.asarray(v.reshape(shape))))

    def gram(v):
        return np.asarray(_gram(field, t, x, jnp.asarray(v.reshape(shape))))

    values = arnoldi(jv, rng.standard_normal(x.size), k)
    top = arnoldi(gram, rng.standard_normal(x.size), k)
    return {"eigenvalues": values, "spectral_radius": float(np.abs(values).max()),
            "norm": float(np.sqrt(max(float(np.abs(top).max()), 0.0)))}


def _orthonormal(y: Array) -> tuple[Array, Array]:
    """QR of ``k`` stacked perturbations ``[k, *state]``: ``(q [k, *state], |diag R| [k])``."""
    k = y.shape[0]
    q, r = jnp.linalg.qr(y.reshape(k, -1).T)
    signs = jnp.where(jnp.diag(r) < 0, -1.0, 1.0).astype(q.dtype)
    return (q * signs).T.reshape(y.shape), jnp.abs(jnp.diag(r))


@eqx.filter_jit
def _forward_sweep(field, ts, xs, q0):
    """Propagate ``q0`` through the step maps' Jacobians, re-orthonormalising each step."""
    def step(q, n):
        push, _ = linearize(lambda y: rk4_step(field, ts[n], ts[n + 1] - ts[n], y), xs[n])
        q, growth = _orthonormal(jax.vmap(push)(q))
        return q, jnp.log(growth)

    q, logs = jax.lax.scan(step, q0, jnp.arange(ts.shape[0] - 1))
    return q, logs.sum(0)


@eqx.filter_jit
def _backward_sweep(field, ts, xs, q1):
    """Pull ``q1`` back through the transposed step Jacobians (VJPs), last step first."""
    def step(q, n):
        _, pull = linearize(lambda y: rk4_step(field, ts[n], ts[n + 1] - ts[n], y), xs[n])
        q, _ = _orthonormal(jax.vmap(pull)(q))
        return q, None

    q, _ = jax.lax.scan(step, q1, jnp.arange(ts.shape[0] - 2, -1, -1))
    return q


def lyapunov(field: VectorField, ts: Array, xs: Array, k: int, seed: int, iterations: int = 8
             ) -> np.ndarray:
    """The ``k`` leading finite-time Lyapunov exponents over ``[ts[0], ts[-1]]`` of the
    trajectory ``xs`` (``trajectory``'s output), largest first."""
    k = min(k, xs[0].size)
    q = jax.random.normal(jax.random.key(seed), (k, *xs.shape[1:]), xs.dtype)
    q, _ = _orthonormal(q)
    for _ in range(iterations):  # orthogonal iteration on Phi^T Phi
        q1, _ = _forward_sweep(field, ts, xs, q)
        q = _backward_sweep(field, ts, xs, q1)
    _, logs = _forward_sweep(field, ts, xs, q)
    return np.sort(np.asarray(logs, np.float64) / float(ts[-1] - ts[0]))[::-1]


@eqx.filter_jit
def energy(field: VectorField, ts: Array, xs: Array) -> dict[str, Array]:
    """The per-token mean of ``||x(t)||``, root-mean-square of ``||f(t, x(t))||``, and the kinetic energy
    ``int_0^t ||f||^2 ds`` per token (trapezoid rule on the trajectory's grid)."""
    fs = jax.vmap(field)(ts, xs)
    x_norm = jnp.linalg.norm(xs, axis=-1).reshape(xs.shape[0], -1).mean(-1)
    f_sq = jnp.sum(jnp.square(fs), axis=-1).reshape(xs.shape[0], -1).mean(-1)
    dt = jnp.diff(ts)
    kinetic = jnp.concatenate([jnp.zeros(1, f_sq.dtype), jnp.cumsum(dt * (f_sq[1:] + f_sq[:-1]) / 2)])
    return {"x_norm": x_norm, "f_norm": jnp.sqrt(f_sq), "kinetic": kinetic}
