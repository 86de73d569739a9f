"""The time-indexed model in float64 NumPy, from exported parameters only (no JAX maths).

An independent implementation to check ode-lm's JAX/diffrax solves against::

    x(0)    = E[tokens] + P[:seq]                                 # [batch, seq, dim]
    g(t)    = sigmoid(W2 silu(W1 [sin(w t), cos(w t)] + b1) + b2)   # gates, split qkv|proj|fc1|fc2
    f(t, x) = attn(LN_a(x); g) + mlp(LN_m(x); g)                  # gated Linear: (x W) * g + b
    logits  = LN_r(x(1)) E^T            (or the untied head)
    loss    = mean_{b,s} [logsumexp(logits) - logits[target]]

with ``w_k = max_frequency ** (k / (half - 1))``, LayerNorm ``(x - mean) / sqrt(var + eps)``
(biased variance), causal multi-head softmax attention scaled by ``1/sqrt(head_dim)`` and the
tanh-approximate GELU (what ``jax.nn.gelu`` computes by default).

Fixed-step solves use the grid ``t_n = n / steps`` of ``ode_lm.ode.integrate`` with our own
Euler / Heun / Midpoint / RK4 / reversible Heun loops; adaptive solves use
``scipy.integrate.solve_ivp``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ode_lm.interop.export import ExportedModel

FIXED_STEP_SOLVERS = ("euler", "heun", "midpoint", "rk4", "reversible_heun")
ADAPTIVE_METHODS = ("RK45", "DOP853")  # scipy.integrate.solve_ivp methods


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class ReferenceModel:
    """The exported model's maths; every method takes and returns float64 NumPy arrays."""

    def __init__(self, exported: ExportedModel):
        self.p = {name: np.array(a, np.float64) for name, a in exported.params.items()}  # own, writable copies
        self.heads, self.mlp_ratio = exported.heads, exported.mlp_ratio
        self.time_embed_dim, self.eps = exported.time_embed_dim, exported.layer_norm_eps
        self.max_frequency = exported.max_frequency
        self.dim = self.p["embedding.tokens"].shape[1]

    def linear(self, name: str, x: np.ndarray, gate: np.ndarray | None = None) -> np.ndarray:
        y = x @ self.p[f"{name}.weight"]
        if gate is not None:
            y = y * gate
        return y + self.p[f"{name}.bias"]

    def norm(self, name: str, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.p[f"{name}.weight"], self.p[f"{name}.bias"], self.eps)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.p["embedding.tokens"][tokens] + self.p["embedding.positions"][: tokens.shape[-1]]

    def time_features(self, t: float) -> np.ndarray:
        half = self.time_embed_dim // 2
        freqs = self.max_frequency ** (np.arange(half) / max(half - 1, 1))
        return np.concatenate([np.sin(t * freqs), np.cos(t * freqs)])

    def gates(self, t: float) -> list[np.ndarray]:
        """The qkv, proj, fc1 and fc2 output-feature gates at depth-time ``t``."""
        h = silu(self.linear("modulation.hidden", self.time_features(t)))
        flat = sigmoid(self.linear("modulation.out", h))
        d = self.dim
        return np.split(flat, np.cumsum([3 * d, d, self.mlp_ratio * d]))

    def attention(self, x: np.ndarray, g_qkv: np.ndarray, g_proj: np.ndarray) -> np.ndarray:
        b, s, d = x.shape
        hd = d // self.heads
        q, k, v = np.split(self.linear("block.attn.qkv", x, g_qkv), 3, axis=-1)
        q, k, v = (a.reshape(b, s, self.heads, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # [b, heads, query, key]
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        out = np.exp(log_softmax(scores)) @ v
        return self.linear("block.attn.proj", out.transpose(0, 2, 1, 3).reshape(b, s, d), g_proj)

    def field(self, t: float, x: np.ndarray) -> np.ndarray:
        """``dx/dt = attn_t(LN_a(x)) + mlp_t(LN_m(x))``."""
        g_qkv, g_proj, g_fc1, g_fc2 = self.gates(t)
        a = self.attention(self.norm("block.ln_attn", x), g_qkv, g_proj)
        hidden = gelu_tanh(self.linear("block.mlp.fc1", self.norm("block.ln_mlp", x), g_fc1))
        return a + self.linear("block.mlp.fc2", hidden, g_fc2)

    def readout(self, x: np.ndarray) -> np.ndarray:
        head = self.p.get("readout.head", self.p["embedding.tokens"].T)
        return self.norm("readout.norm", x) @ head

    @staticmethod
    def loss(logits: np.ndarray, targets: np.ndarray) -> float:
        """Mean next-token cross-entropy in nats."""
        logp = log_softmax(logits)
        return float(-np.take_along_axis(logp, targets[..., None], axis=-1).mean())


Field = Callable[[float, np.ndarray], np.ndarray]


def solve_fixed(field: Field, x0: np.ndarray, solver: str, steps: int) -> tuple[np.ndarray, int]:
    """``x(1)`` and the number of field evaluations on the grid ``t_n = n / steps``.

    The evaluations are counted as they happen, not by a formula, so comparing the count
    with ode-lm's (its solver table's NFE rule) checks that rule.
    """
    if solver not in FIXED_STEP_SOLVERS:
        raise ValueError(f"no fixed-step reference for solver {solver!r}; "
                         f"choose one of {', '.join(FIXED_STEP_SOLVERS)}")
    calls = [0]

    def f(t: float, x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return field(t, x)

    ts = np.linspace(0.0, 1.0, steps + 1)
    x = x0
    if solver == "reversible_heun":
        # Reversible Heun: y and its auxiliary z; f(t_n, z_n) carries over (FSAL).
        z, fz = x0, f(ts[0], x0)
        for t0, t1 in zip(ts[:-1], ts[1:]):
            h = t1 - t0
            z = 2 * x - z + h * fz
            fz_next = f(t1, z)
            x, fz = x + 0.5 * h * (fz + fz_next), fz_next
        return x, calls[0]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = _explicit_step(f, solver, t0, t1, x)
    return x, calls[0]


def _explicit_step(f: Field, solver: str, t0: float, t1: float, x: np.ndarray) -> np.ndarray:
    """One step of the Euler, Heun, midpoint or classic RK4 method from ``t0`` to ``t1``."""
    h = t1 - t0
    if solver == "euler":
        return x + h * f(t0, x)
    if solver == "heun":
        k1 = f(t0, x)
        k2 = f(t1, x + h * k1)
        return x + 0.5 * h * (k1 + k2)
    if solver == "midpoint":
        k1 = f(t0, x)
        return x + h * f(t0 + 0.5 * h, x + 0.5 * h * k1)
    k1 = f(t0, x)  # rk4
    k2 = f(t0 + 0.5 * h, x + 0.5 * h * k1)
    k3 = f(t0 + 0.5 * h, x + 0.5 * h * k2)
    k4 = f(t1, x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def solve_adaptive(field: Field, x0: np.ndarray, method: str, rtol: float, atol: float
                   ) -> tuple[np.ndarray, int]:
    """``x(1)`` from ``scipy.integrate.solve_ivp`` and its number of field evaluations."""
    from scipy.integrate import solve_ivp

    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown solve_ivp method {method!r}; choose one of {', '.join(ADAPTIVE_METHODS)}")
    shape = x0.shape
    sol = solve_ivp(lambda t, y: field(t, y.reshape(shape)).ravel(), (0.0, 1.0), x0.ravel(),
                    method=method, rtol=rtol, atol=atol, t_eval=[1.0])
    if not sol.success:
        raise RuntimeError(f"solve_ivp({method}) failed: {sol.message}")
    return sol.y[:, -1].reshape(shape), int(sol.nfev)
