"""A selective state-space layer whose dynamics depend on depth-time ``t``.

For the hidden state ``x`` of one sequence, position ``k``, channel ``c < dim`` and state
index ``n < N`` (``N = model.ssm_state_size``), with the default form ``channel``::

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

The form ``head`` (``model.ssm_form``, Mamba-2's scalar decay) splits the channels into
``H = model.ssm_heads`` heads of ``P = dim / H`` channels and gives each head one step and
one decay: ``alpha(t), delta(t), a_log`` and ``Delta_k`` live in ``R^H`` and, for channel
``c`` of head ``h``, ``A(t)[h] = -exp(a_log[h] + alpha_h(t))`` and
``h_k[c,n] = exp(Delta_k[h] A(t)[h]) h_{k-1}[c,n] + Delta_k[h] B_k[n] u_k[c]`` (``a_log``
starts at ``log`` of ``H`` values evenly spaced in ``[1, 16]``, Mamba-2's range). The decay
no longer depends on ``n``, which turns the chunked scan into matrix products (below).

The recurrence ``h_k = a_k h_{k-1} + b_k`` is a scan under the associative operator
``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``. ``__call__`` evaluates it by the scan named by
``model.ssm_scan``:

- ``sequential`` loops ``step`` over the sequence (the test oracle);
- ``associative``: ``jax.lax.associative_scan`` (O(log T) depth, but every level reads and
  writes ``batch x seq x dim x N`` floats);
- ``chunked``: chunks of ``L = model.ssm_chunk`` positions. Form ``channel``: a sequential
  scan over chunks carries ``h`` (``batch x dim x N``); inside a chunk, ``extend`` gives
  every position's state in parallel from the carried one,
  ``h_k = (prod_{j<=k} a_j) h_0 + (zero-start scan)_k``; each chunk is recomputed in the
  backward pass (``jax.checkpoint``), so neither pass holds more than one chunk's
  ``batch x L x dim x N`` states. Form ``head`` (Mamba-2's SSD): with the within-chunk
  cumulative log-decay ``s_i = sum_{m<=i} Delta_m A``, the chunk's outputs are
  ``y_i = sum_{j<=i} exp(s_i - s_j) (C_i . B_j) (Delta u)_j``  (an ``L x L`` masked matrix
  per head times the chunk's inputs) plus ``exp(s_i) C_i . h_start``; each chunk's
  zero-start end state ``sum_j exp(s_L - s_j) (Delta u)_j B_j^T`` is one matrix product, and
  those give every chunk's starting state, ``h_start(z) = sum_{w<z} exp(S_{z-1} - S_w) end_w``
  (``S_z``: the log-decay of chunks ``<= z``), by one masked product over chunks
  (``model.ssm_carry = matmul``) or a sequential scan over chunks (``scan``: a loop, whose
  iterations run small kernels one by one and stack their states). The heads axis precedes
  the positions in the ``L x L`` decays, as the products batch over it.
  ``model.ssm_products = compute`` feeds the products compute-dtype inputs (Mamba-2's kernels
  take bf16); the cumulative log-decays and their exponentials stay wide.
  No ``batch x seq x dim x N`` tensor exists in either form.
- ``auto``: ``chunked`` for the ``head`` form; for the ``channel`` form ``sequential`` on
  the CPU and ``associative`` elsewhere, the fastest of each (H200, reference size, bf16
  training step: channel ``chunked`` 138.8 ms, 2x its ``associative`` scan; the chunk body
  runs as plain XLA ops, not a fused kernel).

``step`` advances the recurrence by one token (for decoding) and ``extend`` continues it
from a carried state over a chunk (cached decoding).
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
HEAD_DECAY_RANGE = (1.0, 16.0)  # initial -A per head, form 'head' (Mamba-2's range)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


class SSMParams(eqx.Module):
    """The discretised recurrence for a batch of tokens: ``h <- decay * h + drive``."""

    decay: Float[Array, "*tokens dim state_or_1"]  # exp(Delta A), in (0, 1); one per channel in form 'head'
    drive: Float[Array, "*tokens dim state"]  # Delta B u
    readout: Float[Array, "*tokens state"]  # C
    skip: Float[Array, "*tokens dim"]  # D u


class SSMFactors(eqx.Module):
    """The recurrence before its outer products: ``decay = exp(delta A)`` (``delta``
    repeated over a head's channels), ``drive = (delta u) B^T``; ``G`` = dim or heads."""

    delta: Float[Array, "*tokens groups"]  # Delta > 0
    a: Float[Array, "groups state_or_1"]  # A(t) < 0
    u: Float[Array, "*tokens dim"]
    b: Float[Array, "*tokens state"]
    c: Float[Array, "*tokens state"]
    skip: Float[Array, "*tokens dim"]  # D u

    def per_channel(self) -> tuple[Float[Array, "*tokens dim"], Float[Array, "dim state_or_1"]]:
        """``Delta`` and ``A`` of every channel (a head's values repeated over its channels)."""
        repeat = self.u.shape[-1] // self.delta.shape[-1]
        return jnp.repeat(self.delta, repeat, axis=-1), jnp.repeat(self.a, repeat, axis=0)

    def params(self) -> SSMParams:
        delta, a = self.per_channel()
        return SSMParams(decay=jnp.exp(delta[..., None] * a),
                         drive=(delta * self.u)[..., None] * self.b[..., None, :],
                         readout=self.c, skip=self.skip)


def _to_chunks(z: Float[Array, "batch seq *rest"], length: int) -> Float[Array, "batch chunks length *rest"]:
    """Split the sequence axis into chunks, zero-padding the last one."""
    b, t = z.shape[:2]
    pad = -t % length
    z = jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))
    return z.reshape(b, (t + pad) // length, length, *z.shape[2:])


def _chunk_starts(decay: Float[Array, "batch chunks heads"], ends: Float[Array, "batch chunks state heads p"]
                  ) -> Float[Array, "batch chunks state heads p"]:
    """Each chunk's starting state, by a sequential scan over chunks:
    ``h_start(z + 1) = decay_z h_start(z) + end_z`` from ``h_start(0) = 0``."""
    def step(h, inputs):
        a, end = inputs
        return a[:, None, :, None] * h + end, h

    _, starts = jax.lax.scan(step, jnp.zeros_like(ends[:, 0]), (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(ends, 1, 0)))
    return jnp.moveaxis(starts, 0, 1)


def _chunk_starts_matmul(log_decay: Float[Array, "batch chunks heads"],
                         ends: Float[Array, "batch chunks state heads p"], dot=jnp.einsum
                         ) -> Float[Array, "batch chunks state heads p"]:
    """``_chunk_starts`` as one masked product over chunks (Mamba-2's state passing):
    ``h_start(z) = sum_{w<z} exp(S_{z-1} - S_w) end_w`` with ``S_z`` the cumulative log-decay
    of chunks ``<= z``. Every exponent is ``<= 0``; no loop over chunks remains."""
    per_chunk = jnp.moveaxis(log_decay, 1, 2)  # [b, H, z]
    z = per_chunk.shape[-1]
    # S_{z-1} - S_w as a sum of the chunks strictly between w and z, not a difference of
    # cumulative sums (which loses precision as they grow).
    between = jnp.tril(jnp.ones((z, z), bool), -1)
    summands = jnp.where(between, jnp.broadcast_to(per_chunk[..., :, None], (*per_chunk.shape, z)), 0.0)
    gaps = jnp.cumsum(summands, axis=-2) - summands  # [b, H, z, w]: chunks w < v < z
    gaps = jnp.exp(jnp.where(between, gaps, -jnp.inf))
    return dot("bhzw,bwnhp->bznhp", gaps, ends)


def ssd_scan(f: SSMFactors, length: int, carry: str = "matmul", products=None) -> Float[Array, "batch seq dim"]:
    """``sum_n C_k[n] h_k[c,n]`` of form 'head' by chunks of ``length`` positions (Mamba-2's
    state-space duality; module docstring): masked ``L x L`` products within chunks, and
    between them a masked product over chunks (``carry = "matmul"``) or a scan (``"scan"``).
    ``products``: the dtype the matrix products take their inputs in (None: ``f``'s)."""
    b, t, d = f.u.shape
    heads = f.delta.shape[-1]
    wide = f.u.dtype
    length = min(length, t)

    def dot(spec, *operands):
        return jnp.einsum(spec, *(o.astype(products or wide) for o in operands)).astype(wide)

    log_decay = jnp.cumsum(_to_chunks(f.delta * f.a[:, 0], length), axis=2)  # [b, z, L, H]
    s = jnp.moveaxis(log_decay, 3, 2)  # [b, z, H, L]: log prod of decays within the chunk
    x = _to_chunks(f.delta[..., None] * f.u.reshape(b, t, heads, d // heads), length)  # [b, z, L, H, P]
    bs, cs = _to_chunks(f.b, length), _to_chunks(f.c, length)  # [b, z, L, N]
    causal = jnp.tril(jnp.ones((length, length), bool))
    within = jnp.exp(jnp.where(causal, s[..., :, None] - s[..., None, :], -jnp.inf))  # [b, z, H, i, j]
    mix = dot("bzin,bzjn->bzij", cs, bs)[:, :, None] * within
    y = dot("bzhij,bzjhp->bzihp", mix, x)
    to_end = jnp.exp(log_decay[:, :, -1:] - log_decay)[..., None] * x  # each input decayed to its chunk's end
    ends = dot("bzjn,bzjhp->bznhp", bs, to_end)
    if carry == "scan":
        starts = _chunk_starts(jnp.exp(log_decay[:, :, -1]), ends)
    else:
        starts = _chunk_starts_matmul(log_decay[:, :, -1], ends, dot)
    y = y + jnp.exp(log_decay)[..., None] * dot("bzin,bznhp->bzihp", cs, starts)
    return y.reshape(b, -1, d)[:, :t]


class SelectiveSSM(eqx.Module):
    norm: LayerNorm
    in_proj: Linear  # u -> [delta (G), B (N), C (N)], no bias (z(t) has it); G = dim or heads
    out_proj: Linear
    a_log: Float[Array, " state_or_heads"]
    t_hidden: Linear  # the small hypernetwork: sinusoidal(t) -> hidden -> z(t)
    t_out: Linear
    time_embed_dim: int = eqx.field(static=True)
    max_frequency: float = eqx.field(static=True)
    scan: str = eqx.field(static=True, default="auto")
    form: str = eqx.field(static=True, default="channel")
    chunk: int = eqx.field(static=True, default=64)
    carry: str = eqx.field(static=True, default="matmul")
    products: str = eqx.field(static=True, default="wide")

    def __init__(self, dim: int, state_size: int, time_embed_dim: int, hidden: int, *,
                 key: PRNGKeyArray, std: float, dtype=jnp.float32, scan: str = "auto",
                 form: str = "channel", heads: int = 4, chunk: int = 64, max_frequency: float = MAX_FREQUENCY,
                 carry: str = "matmul", products: str = "wide"):
        k_in, k_out, k_delta, k_th, k_to = jax.random.split(key, 5)
        groups = dim if form == "channel" else heads  # one Delta and alpha per channel or per head
        self.norm = LayerNorm(dim, dtype=dtype)
        self.in_proj = Linear(dim, groups + 2 * state_size, key=k_in, std=std, bias=False, dtype=dtype)
        self.out_proj = Linear(dim, dim, key=k_out, std=std, dtype=dtype)
        if form == "channel":  # S4D-real initialisation: A[c, n] = -(n + 1).
            self.a_log = jnp.log(jnp.arange(1, state_size + 1, dtype=dtype))
        else:
            self.a_log = jnp.log(jnp.linspace(*HEAD_DECAY_RANGE, heads, dtype=dtype))
        self.t_hidden = Linear(time_embed_dim, hidden, key=k_th, std=1.0 / time_embed_dim**0.5, dtype=dtype)
        t_out = Linear(hidden, 2 * groups + dim + 2 * state_size, key=k_to, std=std, dtype=dtype)
        lo, hi = np.log(DELTA_INIT_RANGE[0]), np.log(DELTA_INIT_RANGE[1])
        delta0 = jnp.exp(jax.random.uniform(k_delta, (groups,), minval=lo, maxval=hi))
        bias = jnp.concatenate([jnp.zeros(groups), delta0 + jnp.log(-jnp.expm1(-delta0)),  # softplus^-1
                                jnp.ones(dim), jnp.zeros(2 * state_size)])
        self.t_out = eqx.tree_at(lambda lin: lin.bias, t_out, bias.astype(dtype))
        self.time_embed_dim, self.max_frequency = time_embed_dim, max_frequency
        self.scan, self.form, self.chunk = scan, form, chunk
        self.carry, self.products = carry, products

    @property
    def dim(self) -> int:
        return self.out_proj.weight.shape[0]

    @property
    def state_size(self) -> int:
        return (self.in_proj.weight.shape[1] - self.groups) // 2

    @property
    def groups(self) -> int:
        """Channels (form 'channel') or heads (form 'head'): how many steps ``Delta`` a token has."""
        return self.dim if self.form == "channel" else self.a_log.shape[0]

    def init_state(self, batch: int) -> Float[Array, "batch dim state"]:
        return jnp.zeros((batch, self.dim, self.state_size), jnp.promote_types(self.a_log.dtype, jnp.float32))

    def factors(self, x: Float[Array, "*tokens dim"], t: Float[Array, ""],
                standardized: Float[Array, "*tokens dim"] | None = None) -> SSMFactors:
        """The recurrence's factors for tokens ``x`` at depth-time ``t``, in >= float32.

        ``standardized``: ``x`` standardised over its last axis (``LayerNorm.standardize``), when
        the caller has it (the field shares the block's); the norm then applies only its gain
        and shift. Every method taking it below passes it on."""
        g, n = self.groups, self.state_size
        wide = jnp.promote_types(x.dtype, jnp.float32)  # long products need float32
        features = sinusoidal(t, self.time_embed_dim, self.max_frequency).astype(self.t_hidden.weight.dtype)
        z = self.t_out(jax.nn.silu(self.t_hidden(features))).astype(wide)
        alpha, delta_t, d_skip, beta, gamma = jnp.split(z, np.cumsum([g, g, self.dim, n]).tolist())
        u = self.norm(x) if standardized is None else self.norm.affine(standardized)
        proj = self.in_proj(u).astype(wide)
        a_log = self.a_log.astype(wide)
        # A: [dim, N] (per channel and state) or [heads, 1] (one per head); strictly negative.
        a = -jnp.exp(a_log + alpha[:, None]) if self.form == "channel" else -jnp.exp(a_log + alpha)[:, None]
        u = u.astype(wide)
        return SSMFactors(delta=jax.nn.softplus(proj[..., :g] + delta_t), a=a, u=u,
                          b=proj[..., g:g + n] * (1.0 + beta), c=proj[..., g + n:] * (1.0 + gamma),
                          skip=d_skip * u)

    def discretise(self, x: Float[Array, "*tokens dim"], t: Float[Array, ""], standardized=None) -> SSMParams:
        """The recurrence's coefficients for tokens ``x`` at depth-time ``t``, in >= float32."""
        return self.factors(x, t, standardized).params()

    def _output(self, h, p: SSMParams, dtype):
        y = jnp.einsum("...cn,...n->...c", h, p.readout) + p.skip
        return self.out_proj(y.astype(dtype))

    def resolved_scan(self) -> str:
        """``self.scan`` with ``auto`` resolved for the default backend (module docstring)."""
        if self.scan != "auto":
            return self.scan
        if self.form == "head":
            return "chunked"
        return "sequential" if jax.default_backend() == "cpu" else "associative"

    def __call__(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""],
                 standardized: Float[Array, "batch seq dim"] | None = None) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` for whole sequences, by the scan named in ``self.scan`` (``standardized``:
        see ``factors``)."""
        return getattr(self, self.resolved_scan())(x, t, standardized)

    def associative(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""], standardized=None
                    ) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` for whole sequences, by a parallel scan over positions."""
        p = self.discretise(x, t, standardized)
        _, h = jax.lax.associative_scan(_combine, (p.decay, p.drive), axis=1)
        return self._output(h, p, x.dtype)

    def chunked(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""], standardized=None
                ) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` for whole sequences by chunks of ``self.chunk`` positions (module docstring)."""
        if self.form == "head":
            f = self.factors(x, t, standardized)
            products = x.dtype if self.products == "compute" else None
            return self.out_proj((ssd_scan(f, self.chunk, self.carry, products) + f.skip).astype(x.dtype))
        b, seq, _ = x.shape
        chunks = jax.tree.map(lambda z: jnp.moveaxis(_to_chunks(z, min(self.chunk, seq)), 1, 0),
                              (x, standardized))  # [chunks, b, L, dim]

        @jax.checkpoint  # the backward pass recomputes a chunk's states from its carried start
        def body(state, chunk):
            return self.extend(state, chunk[0], t, chunk[1])

        _, y = jax.lax.scan(body, self.init_state(b), chunks)
        return jnp.moveaxis(y, 0, 1).reshape(b, -1, y.shape[-1])[:, :seq]

    def step(self, state: Float[Array, "batch dim state"], x_t: Float[Array, "batch dim"],
             t: Float[Array, ""], standardized=None
             ) -> tuple[Float[Array, "batch dim state"], Float[Array, "batch dim"]]:
        """One position of the recurrence: ``(h_{k-1}, x_k) -> (h_k, g_k)``."""
        p = self.discretise(x_t, t, standardized)
        state = p.decay * state + p.drive
        return state, self._output(state, p, x_t.dtype)

    def extend(self, state: Float[Array, "batch dim state"], x: Float[Array, "batch chunk dim"],
               t: Float[Array, ""], standardized=None
               ) -> tuple[Float[Array, "batch dim state"], Float[Array, "batch chunk dim"]]:
        """Continue the recurrence from ``state`` (``h`` before the chunk) over a chunk:
        ``h_k = (prod_{j<=k} decay_j) h_0 + scan_k``; returns the chunk's last ``h`` and ``g``."""
        p = self.discretise(x, t, standardized)
        decay, h = jax.lax.associative_scan(_combine, (p.decay, p.drive), axis=1)
        h = h + decay * state[:, None].astype(h.dtype)
        return h[:, -1], self._output(h, p, x.dtype)

    def sequential(self, x: Float[Array, "batch seq dim"], t: Float[Array, ""], standardized=None
                   ) -> Float[Array, "batch seq dim"]:
        """``g(x, t)`` one position at a time with ``step`` (the reference recurrence)."""
        def body(state, position):
            return self.step(state, position[0], t, position[1])
        positions = jax.tree.map(lambda z: jnp.swapaxes(z, 0, 1), (x, standardized))
        _, y = jax.lax.scan(body, self.init_state(x.shape[0]), positions)
        return jnp.swapaxes(y, 0, 1)
