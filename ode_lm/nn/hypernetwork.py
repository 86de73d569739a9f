"""Hypernetworks that generate every weight of a transformer block from depth-time ``t``.

Two forms (``model.hyper_form``), both behind ``AbstractHyperNetwork``: ``t -> Block``.

**dense** (the default; Tong et al.'s continuous transformer as released). Every generated
module ``m`` (the four matrices qkv, proj, fc1, fc2 and the two layer norms) has its own
time embedding of width ``E = model.hyper_hidden``,

    e_m(t) = L2_m SiLU(L1_m phi(t))                    phi(t) = sinusoidal(t), S features

and its weights are dense linear maps of it:

    W_m(t) = W0_m + sum_k e_m(t)_k F_m[k]              F_m: E x In x Out,  W0_m: In x Out
    b_m(t) = e_m(t) G_m                                G_m: E x Out (time-dependent bias)
    LN_m(t): gain 1 + e_m(t) Gamma_m, shift e_m(t) Beta_m   (Gamma, Beta: E x D, zero at init)

``(F_m, W0_m)`` is one dense layer ``E -> In * Out`` with its bias. Parameters, with
``S = model.time_embed_dim``, ``D = model.dim``, ``bias = 1`` when ``model.bias``::

    embedding per module   S E + E + E^2 + E                       (L1, L2 with biases)
    per matrix (In, Out)   embedding + (E + 1) In Out + bias E Out
    per layer norm         embedding + E D + bias E D
    total                  sum over the 4 matrices and 2 norms

At ``D = 256``, ``E = 64``, MLP ratio 4 that is 51.4M parameters (all but 0.3M in the
``F_m``), against 0.7M for the block it generates: the 51.5M of the study these families
come from. Initialisation follows the released code: ``L1, L2, F`` truncated normal with std
``1 / sqrt(fan_in)`` (of the layer ``E -> In * Out`` for ``F``), ``W0`` and the embedding
biases zero, ``G ~ N(0, 1e-8)``, ``Gamma = Beta = 0``. Deviation (documented in
docs/families.md): ``phi`` is ode-lm's sinusoidal feature map shared by every family, not
the released ``[t, sin(1000 t w_k), cos(1000 t w_k)]``.

**rank_one**: with ``h(t) = SiLU(W_h phi(t) + b_h)`` in ``R^H``, ``H = model.hyper_hidden``,

    M(t) = M_0 + U_M diag(h(t)) V_M^T      for M in {qkv, proj, fc1, fc2}
    v(t) = v_0 + G h(t)                    for both layer norms' gains/shifts and the four biases

a one-hidden-layer hypernetwork whose output layer is linear with the base block as its bias
and one rank-one matrix per hidden unit: ``H (In + Out)`` parameters per matrix instead of
the dense ``H In Out``. ``U, V ~ N(0, std^2 / sqrt(H))``.

Either way the generated block is materialised once per evaluation (``2 E In Out`` FLOPs per
matrix, independent of the number of tokens) and the ordinary block runs on it.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ode_lm.nn.block import Block
from ode_lm.nn.layers import Linear
from ode_lm.nn.time_embedding import MAX_FREQUENCY, sinusoidal


def _matrices(b: Block) -> tuple[Array, ...]:
    return b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc1.weight, b.mlp.fc2.weight


def _biases(b: Block) -> tuple[Array | None, ...]:
    return b.attn.qkv.bias, b.attn.proj.bias, b.mlp.fc1.bias, b.mlp.fc2.bias


def _norms(b: Block) -> tuple[Array | None, ...]:
    """Gain and shift of the attention norm, then of the MLP norm."""
    return b.ln_attn.weight, b.ln_attn.bias, b.ln_mlp.weight, b.ln_mlp.bias


def _vectors(b: Block) -> tuple[Array, ...]:
    return (b.ln_attn.weight, b.ln_attn.bias, b.attn.qkv.bias, b.attn.proj.bias,
            b.ln_mlp.weight, b.ln_mlp.bias, b.mlp.fc1.bias, b.mlp.fc2.bias)


class AbstractHyperNetwork(eqx.Module):
    """``t -> Block``: the block with every weight generated at depth-time ``t``."""

    time_embed_dim: eqx.AbstractVar[int]
    max_frequency: eqx.AbstractVar[float]  # of the sinusoidal features (model.time_max_frequency)

    @abc.abstractmethod
    def __call__(self, t: Float[Array, ""]) -> Block:
        ...

    @abc.abstractmethod
    def structure(self) -> Block:
        """A block of the generated shapes and dtypes, without generating one."""

    def features(self, t: Float[Array, ""], dtype) -> Float[Array, " time_embed_dim"]:
        # t stays float32 (bf16 would blur high-frequency features); cast the features.
        return sinusoidal(t, self.time_embed_dim, self.max_frequency).astype(dtype)


def _truncated_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float, dtype) -> Array:
    return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)


class TimeEmbedding(eqx.Module):
    """``e(t) = L2 SiLU(L1 phi(t))``: one generated module's own embedding of ``t``."""

    l1: Linear
    l2: Linear

    def __init__(self, features: int, width: int, *, key: PRNGKeyArray, dtype):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.tree_at(lambda lin: lin.weight, Linear(features, width, key=k1, std=1.0, dtype=dtype),
                              _truncated_normal(k1, (features, width), features**-0.5, dtype))
        self.l2 = eqx.tree_at(lambda lin: lin.weight, Linear(width, width, key=k2, std=1.0, dtype=dtype),
                              _truncated_normal(k2, (width, width), width**-0.5, dtype))

    def __call__(self, phi: Float[Array, " features"]) -> Float[Array, " width"]:
        return self.l2(jax.nn.silu(self.l1(phi)))


class GeneratedLinear(eqx.Module):
    """``W(t) = W0 + e(t) . F`` and ``b(t) = e(t) G`` (``G`` None: no bias)."""

    embed: TimeEmbedding
    maps: Float[Array, "width fan_in fan_out"]  # F
    base: Float[Array, "fan_in fan_out"]  # W0, the dense layer's bias
    bias_map: Float[Array, "width fan_out"] | None  # G

    def __init__(self, features: int, width: int, fan_in: int, fan_out: int, *, key: PRNGKeyArray,
                 bias: bool, dtype):
        ke, kf, kb = jax.random.split(key, 3)
        self.embed = TimeEmbedding(features, width, key=ke, dtype=dtype)
        self.maps = _truncated_normal(kf, (width, fan_in, fan_out), width**-0.5, dtype)
        self.base = jnp.zeros((fan_in, fan_out), dtype)
        self.bias_map = 1e-4 * jax.random.normal(kb, (width, fan_out), dtype) if bias else None

    def __call__(self, phi: Float[Array, " features"]
                 ) -> tuple[Float[Array, "fan_in fan_out"], Float[Array, " fan_out"] | None]:
        e = self.embed(phi)
        weight = self.base + jnp.tensordot(e, self.maps, axes=1)
        return weight, None if self.bias_map is None else e @ self.bias_map


class GeneratedNorm(eqx.Module):
    """A layer norm's gain ``1 + e(t) Gamma`` and shift ``e(t) Beta`` (``Beta`` None: no shift)."""

    embed: TimeEmbedding
    gain_map: Float[Array, "width dim"]
    shift_map: Float[Array, "width dim"] | None

    def __init__(self, features: int, width: int, dim: int, *, key: PRNGKeyArray, bias: bool, dtype):
        self.embed = TimeEmbedding(features, width, key=key, dtype=dtype)
        self.gain_map = jnp.zeros((width, dim), dtype)
        self.shift_map = jnp.zeros((width, dim), dtype) if bias else None

    def __call__(self, phi: Float[Array, " features"]
                 ) -> tuple[Float[Array, " dim"], Float[Array, " dim"] | None]:
        e = self.embed(phi)
        return 1.0 + e @ self.gain_map, None if self.shift_map is None else e @ self.shift_map


class DenseHyperNetwork(AbstractHyperNetwork):
    """Tong et al.'s dense generator (module docstring): every matrix ``E -> In x Out``."""

    linears: tuple[GeneratedLinear, ...]  # qkv, proj, fc1, fc2
    norms: tuple[GeneratedNorm, GeneratedNorm]  # attention's, the MLP's
    # The generated block's structure (static: its arrays are shapes only, not parameters).
    template: Block = eqx.field(static=True)
    time_embed_dim: int = eqx.field(static=True)
    max_frequency: float = eqx.field(static=True)

    def __init__(self, template: Block, time_embed_dim: int, width: int, *, key: PRNGKeyArray, dtype,
                 max_frequency: float = MAX_FREQUENCY):
        bias = template.attn.qkv.bias is not None
        k_lin, k_norm = jax.random.split(key)
        self.linears = tuple(GeneratedLinear(time_embed_dim, width, *m.shape, key=k, bias=bias, dtype=dtype)
                             for m, k in zip(_matrices(template), jax.random.split(k_lin, 4)))
        dim = template.ln_attn.weight.shape[0]
        self.norms = tuple(GeneratedNorm(time_embed_dim, width, dim, key=k, bias=bias, dtype=dtype)
                           for k in jax.random.split(k_norm, 2))
        self.template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), template)
        self.time_embed_dim, self.max_frequency = time_embed_dim, max_frequency

    def structure(self):
        return self.template

    def __call__(self, t):
        phi = self.features(t, self.linears[0].maps.dtype)
        linears = [lin(phi) for lin in self.linears]
        (g_a, s_a), (g_m, s_m) = (norm(phi) for norm in self.norms)
        new = [w for w, _ in linears] + [b for _, b in linears] + [g_a, s_a, g_m, s_m]
        old = lambda b: _matrices(b) + _biases(b) + _norms(b)  # noqa: E731
        keep = [i for i, a in enumerate(new) if a is not None]
        return eqx.tree_at(lambda b: [old(b)[i] for i in keep], self.template, [new[i] for i in keep])


class RankOneBasis(eqx.Module):
    """``h -> U diag(h) V^T``: one rank-one matrix per hidden unit, mixed by ``h``."""

    u: Float[Array, "fan_in hidden"]
    v: Float[Array, "fan_out hidden"]

    def __call__(self, h: Float[Array, " hidden"]) -> Float[Array, "fan_in fan_out"]:
        return (self.u * h) @ self.v.T


class RankOneHyperNetwork(AbstractHyperNetwork):
    """The base block plus rank-one updates mixed by one hidden layer (module docstring)."""

    block: Block  # the base weights (M_0, v_0)
    hidden: Linear
    matrices: tuple[RankOneBasis, ...]  # qkv, proj, fc1, fc2
    vectors: Linear  # h -> the concatenated vector offsets (no bias: v_0 lives in the block)
    time_embed_dim: int = eqx.field(static=True)
    max_frequency: float = eqx.field(static=True)

    def __init__(self, block: Block, time_embed_dim: int, hidden: int, *, key: PRNGKeyArray,
                 std: float, dtype=jnp.float32, max_frequency: float = MAX_FREQUENCY):
        if block.attn.qkv.bias is None:
            raise ValueError("the rank-one hypernetwork generates offsets of the block's biases; "
                             "it needs model.bias = true")
        k_hidden, k_vec, *k_mats = jax.random.split(key, 2 + 2 * 4)
        self.block = block
        self.hidden = Linear(time_embed_dim, hidden, key=k_hidden, std=1.0 / time_embed_dim**0.5, dtype=dtype)
        scale = (std / hidden**0.5) ** 0.5
        self.matrices = tuple(
            RankOneBasis(scale * jax.random.normal(ku, (m.shape[0], hidden), dtype),
                         scale * jax.random.normal(kv, (m.shape[1], hidden), dtype))
            for m, ku, kv in zip(_matrices(block), k_mats[::2], k_mats[1::2]))
        n_vec = sum(v.shape[0] for v in _vectors(block))
        self.vectors = Linear(hidden, n_vec, key=k_vec, std=std / hidden**0.5, bias=False, dtype=dtype)
        self.time_embed_dim, self.max_frequency = time_embed_dim, max_frequency

    def structure(self):
        return self.block

    def __call__(self, t):
        base = self.block
        h = jax.nn.silu(self.hidden(self.features(t, self.hidden.weight.dtype)))
        mats = tuple(m0 + basis(h) for m0, basis in zip(_matrices(base), self.matrices))
        offsets = self.vectors(h)
        vecs, start = [], 0
        for v0 in _vectors(base):
            vecs.append(v0 + offsets[start:start + v0.shape[0]])
            start += v0.shape[0]
        return eqx.tree_at(lambda b: _matrices(b) + _vectors(b), base, mats + tuple(vecs))
