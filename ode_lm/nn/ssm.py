"""A selective state-space layer whose dynamics depend on depth-time ``t``.

For the hidden state ``x`` of one sequence, position ``k``, channel ``c < dim`` and state
index ``n < N`` (``N = model.ssm_state_size``)::

    u_k        = LN(x_k)
    z(t)       = MLP(sinusoidal(t)) = [alpha(t), delta(t), D(t) in R^dim; beta(t), gamma(t) in R^N]
    A(t)[c,n]  = -exp(a_log[n] + alpha_c(t))             < 0
    Delta_k[c] = softplus(u_k W_delta + delta(t))[c]      > 0     (selective: per token)
    B_k[n]     = (u_k W_B)[n] * (1 + beta_n(t))
    C_k[n]     = (u_k W_C)[n] * (1 + gamma_n(t))

    h_k[c,n]   = exp(Delta_k[c] A(t)[c,n]) h_{k-1}[c,n] + Delta_k[c] B_k[n] u_k[c],   h_0 = 0
    y_k[c]     = sum_n C_k[n] h_k[c,n] + D(t)[c] u_k[c]
    g(x, t)_k  = y_k W_out + b_out

The MLP's output bias holds the per-channel constants (the initial step sizes, ``D = 1``);
``log(-A)`` is a per-state term plus the per-channel ``alpha(t)`` (S4D-real's
``A = -(n + 1)`` at initialisation). Weight decay (matrices only) never touches the
dynamics. ``A`` is discretised by zero-order hold and ``B`` by Euler, as in Mamba. Because
``Delta > 0`` and ``A < 0``, the decay ``exp(Delta A)`` lies in ``(0, 1)`` for every ``t``
and every input, so the recurrence is stable: ``|h_k| <= max|Delta B u| / (1 - max decay)``.

The recurrence ``h_k = a_k h_{k-1} + b_k`` is a scan under the associative operator
``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``. ``associative`` evaluates it with
``jax.lax.associative_scan`` (O(log T) depth, but every level reads and writes
``batch x seq x dim x N`` floats); ``step`` advances it by one token (for decoding) and
``extend`` continues it from a carried state over a chunk (cached decoding);
``sequential`` loops ``step`` over the sequence (the test oracle, and on CPU the faster
of the two). ``__call__`` uses the one named by ``model.ssm_scan``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ode_lm.nn.layers import LayerNorm, Linear
from ode_lm.nn.time_embedding import MAX_FREQUENCY, sinusoidal

DELTA_INIT_RANGE = (1e-3, 1e-1)  # initial steps Delta, log-uniform per channel (Mamba's choice)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


class SSMParams(eqx.Module):
    """The discretised recurrence for a batch of tokens: ``h <- decay * h + drive``."""

    decay: Float[Array, "*tokens dim state"]  # exp(Delta A), in (0, 1)
    drive: Float[Array, "*tokens dim state"]  # Delta B u
    readout: Float[Array, "*tokens state"]  # C
    skip: Float[Array, "*tokens dim"]  # D u


class SelectiveSSM(eqx.Module):
    norm: LayerNorm
    in_proj: Linear  # u -> [delta (dim), B (N), C (N)], no bias (z(t) has it)
    out_proj: Linear
    a_log: Float[Array, " state"]
    t_hidden: Linear  # the small hypernetwork: sinusoidal(t) -> hidden -> z(t)
    t_out: Linear
    time_embed_dim: int = eqx.field(static=True)
    max_frequency: float = eqx.field(static=True)
    scan: str = eqx.field(static=True, default="associative")

    def __init__(self, dim: int, state_size: int, time_embed_dim: int, hidden: int, *,
                 key: PRNGKeyArray, std: float, dtype=jnp.float32, scan: str = "associative",
                 max_frequency: float = MAX_FREQUENCY):
        k_in, k_out, k_delta, k_th, k_to = jax.random.split(key, 5)
        self.norm = LayerNorm(dim, dtype=dtype)
        self.in_proj = Linear(dim, dim + 2 * state_size, key=k_in, std=std, bias=False, dtype=dtype)
        self.out_proj = Linear(dim, dim, key=k_out, std=std, dtype=dtype)
        # S4D-real initialisation: A[c, n] = -(n + 1).
        self.a_log = jnp.log(jnp.arange(1, state_size + 1, dtype=dtype))
        self.t_hidden = Linear(time_embed_dim, hidden, key=k_th, std=1.0 / time_embed_dim**0.5, dtype=dtype)
        t_out = Linear(hidden, 3 * dim + 2 * state_size, key=k_to, std=std, dtype=dtype)
        lo, hi = np.log(DELTA_INIT_RANGE[0]), np.log(DELTA_INIT_RANGE[1])
        delta0 = jnp.exp(jax.random.uniform(k_delta, (dim,), minval=lo, maxval=hi))
        bias = jnp.concatenate([jnp.zeros(dim), delta0 + jnp.log(-jnp.expm1(-delta0)),  # softplus^-1
                                jnp.ones(dim), jnp.zeros(2 * state_size)])
        self.t_out = eqx.tree_at(lambda lin: lin.bias, t_out, bias.astype(dtype))
        self.time_embed_dim, self.max_frequency = time_embed_dim, max_frequency
        self.scan = scan

    @property
    def dim(self) -> int:
        return self.out_proj.weight.shape[0]

    @property
    def state_size(self) -> int:
        return self.a_log.shape[0]

    def init_state(self, batch: int) -> Float[Array, "batch dim state"]:
        return jnp.zeros((batch, self.dim, self.state_size), jnp.promote_types(self.a_log.dtype, jnp.float32))

    def discretise(self, x: Float[Array, "*tokens dim"], t: Float[Array, ""]) -> SSMParams:
        """The recurrence's coefficients for tokens ``x`` at depth-time ``t``, in >= float32."""
        d, n = self.dim, self.state_size
        wide = jnp.promote_types(x.dtype, jnp.float32)  # long products need float32
        features = sinusoidal(t, self.time_embed_dim, self.max_frequency).astype(self.t_hidden.weight.dtype)
        z = self.t_out(jax.nn.silu(self.t_hidden(features))).astype(wide)
        alpha, delta_t, d_skip, beta, gamma = jnp.split(z, np.cumsum([d, d, d, n]).tolist())
        u = self.norm(x)
        proj = self.in_proj(u).astype(wide)
        delta = jax.nn.softplus(proj[..., :d] + delta_t)  # [*tokens, dim]
        b = proj[..., d:d + n] * (1.0 + beta)
        c = proj[..., d + n:] * (1.0 + gamma)
        a = -jnp.exp(self.a_log.astype(wide) + alpha[:, None])  # [dim, N], strictly negative
        u = u.astype(wide)
        return SSMParams(decay=jnp.exp(delta[..., None] * a),
                         drive=(delta * u)[..., None] * b[..., None, :],
                         readout=c,
                         skip=d_skip * u)

    def _output(self, h, p: SSMParams, dtype):
        y = jnp.einsum("...cn,...n->...c", h, p.readout) + p.skip
        return self.out_proj(y.astype(dtype))

    def __call__(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""]) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` for whole sequences, by the scan named in ``self.scan``."""
        return self.sequential(x, t) if self.scan == "sequential" else self.associative(x, t)

    def associative(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""]) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` for whole sequences, by a parallel scan over positions."""
        p = self.discretise(x, t)
        _, h = jax.lax.associative_scan(_combine, (p.decay, p.drive), axis=1)
        return self._output(h, p, x.dtype)

    def step(self, state: Float[Array, "batch dim state"], x_t: Float[Array, "batch dim"],
             t: Float[Array, ""]) -> tuple[Float[Array, "batch dim state"], Float[Array, "batch dim"]]:
        """One position of the recurrence: ``(h_{k-1}, x_k) -> (h_k, g_k)``."""
        p = self.discretise(x_t, t)
        state = p.decay * state + p.drive
        return state, self._output(state, p, x_t.dtype)

    def extend(self, state: Float[Array, "batch dim state"], x: Float[Array, "batch chunk dim"],
               t: Float[Array, ""]) -> tuple[Float[Array, "batch dim state"], Float[Array, "batch chunk dim"]]:
        """Continue the recurrence from ``state`` (``h`` before the chunk) over a chunk:
        ``h_k = (prod_{j<=k} decay_j) h_0 + scan_k``; returns the chunk's last ``h`` and ``g``."""
        p = self.discretise(x, t)
        decay, h = jax.lax.associative_scan(_combine, (p.decay, p.drive), axis=1)
        h = h + decay * state[:, None].astype(h.dtype)
        return h[:, -1], self._output(h, p, x.dtype)

    def sequential(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""]) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` one position at a time with ``step`` (the reference recurrence)."""
        def body(state, x_t):
            return self.step(state, x_t, t)
        _, y = jax.lax.scan(body, self.init_state(x.shape[0]), jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(y, 0, 1)
