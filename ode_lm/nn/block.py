"""The pre-norm transformer block: as a derivative ``f(x) = attn(LN(x)) + mlp(LN(x))`` (the
ODE families), or as GPT-2's sequential layer (the discrete ``standard`` family).

Every family shares this code; they differ only in the per-output-feature gates they pass
(``W_eff = W * gate``) and in where the weights come from.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.nn.cache import KVCache
from ode_lm.nn.dropout import Dropout
from ode_lm.nn.layers import LayerNorm, Linear, add_bias, gates_weights, gelu, scale, standardize


class BlockGates(NamedTuple):
    """Output-feature gates of the block's four weight matrices (None: ungated)."""

    qkv: Float[Array, " 3*dim"] | None = None
    proj: Float[Array, " dim"] | None = None
    fc1: Float[Array, " hidden"] | None = None
    fc2: Float[Array, " dim"] | None = None

    @staticmethod
    def sizes(dim: int, mlp_ratio: int) -> tuple[int, int, int, int]:
        return (3 * dim, dim, mlp_ratio * dim, dim)

    @classmethod
    def split(cls, flat: Float[Array, " n"], dim: int, mlp_ratio: int) -> "BlockGates":
        """Cut one vector of ``sum(sizes)`` gates into the four matrices' gates."""
        bounds = np.cumsum(cls.sizes(dim, mlp_ratio))[:-1].tolist()
        return cls(*jnp.split(flat, bounds))


def causal_attention_explicit(q: Float[Array, "batch seq heads hd"], k: Float[Array, "batch seq heads hd"],
                              v: Float[Array, "batch seq heads hd"], dropout: Dropout | None = None
                              ) -> Float[Array, "batch seq heads hd"]:
    """``drop(softmax(q k^T / sqrt(hd), causal)) v`` with the probabilities written out.

    The softmax runs in at least float32 (float64 stays float64: ``jax.nn.dot_product_attention``
    always takes float32, which would cap a float64 model's cross-checks in ode_lm.interop
    at float32 accuracy). Dropout on the probabilities (``model.attn_dropout``, GPT-2's
    ``attn_pdrop``) needs them written out, so this path also serves training with it.
    """
    seq = q.shape[1]
    wide = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(wide) / jnp.sqrt(jnp.asarray(q.shape[-1], wide))
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    if dropout is not None:
        probs = dropout.attention_probs(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class Attention(eqx.Module):
    """Causal multi-head self-attention."""

    qkv: Linear
    proj: Linear
    heads: int = eqx.field(static=True)
    implementation: str = eqx.field(static=True, default="auto")
    gate_apply: str = eqx.field(static=True, default="auto")  # model.gate_apply (Linear)

    def __init__(self, dim: int, heads: int, *, key: PRNGKeyArray, std: float, dtype=jnp.float32,
                 implementation: str = "auto", bias: bool = True, proj_std: float | None = None,
                 gate_apply: str = "auto"):
        k1, k2 = jax.random.split(key)
        self.qkv = Linear(dim, 3 * dim, key=k1, std=std, bias=bias, dtype=dtype)
        self.proj = Linear(dim, dim, key=k2, std=std if proj_std is None else proj_std, bias=bias, dtype=dtype)
        self.heads = heads
        self.implementation = implementation
        self.gate_apply = gate_apply

    def kernel(self, dtype) -> str | None:
        """cuDNN's fused (flash) attention on GPU for 16-bit inputs; XLA's otherwise."""
        if self.implementation == "auto":
            gpu = jax.default_backend() == "gpu"
            return "cudnn" if gpu and dtype in (jnp.bfloat16, jnp.float16) else None
        return None if self.implementation == "xla" else self.implementation

    def __call__(self, x: Float[Array, "batch seq dim"], gates: BlockGates, norm: LayerNorm | None = None,
                 dropout: Dropout | None = None) -> Float[Array, "batch seq dim"]:
        """Attention of ``norm(x)`` (``x`` standardised when ``norm`` is given); ``dropout``
        drops attention probabilities (the output's own dropout is the caller's)."""
        b, t, d = x.shape
        q, k, v, value_bias = self.project(x, gates, norm)
        if dropout is not None and dropout.drops_attention and value_bias is not None:
            # Dropped-out probability rows no longer sum to one: the value bias stays in v.
            v, value_bias = v + value_bias, None
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if x.dtype == jnp.float64 or (dropout is not None and dropout.drops_attention):
            out = causal_attention_explicit(q, k, v, dropout)
        else:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.kernel(x.dtype))
        return self.proj(out.reshape(b, t, d), gates.proj, input_shift=value_bias, gate_apply=self.gate_apply)

    def project(self, x: Float[Array, "batch seq dim"], gates: BlockGates, norm: LayerNorm | None = None
                ) -> tuple[Float[Array, "batch seq dim"], Float[Array, "batch seq dim"],
                           Float[Array, "batch seq dim"], Float[Array, " dim"] | None]:
        """``q, k, v`` of ``norm(x)`` without the key and value biases, and the value bias.

        Attention is blind to both. ``q . (k + b_k) = q . k + q . b_k`` moves all scores of a
        query by one constant, which the softmax ignores; softmax rows sum to one, so
        attending to ``v + b_v`` gives the output plus ``b_v``, which the output projection
        takes into its bias (``input_shift``: weight-sized work). Each leaves out a pass
        over the activations in the forward and in the backward pass.
        """
        gate_weights = gates_weights(self.gate_apply, x)
        weight, bias = self.qkv.effective(gates.qkv, norm, gate_weights=gate_weights)
        w_q, w_k, w_v = jnp.split(weight, 3, axis=1)
        q, k, v = x @ w_q, x @ w_k, x @ w_v
        if gates.qkv is not None and not gate_weights:
            g_q, g_k, g_v = jnp.split(gates.qkv, 3)
            q, k, v = scale(q, g_q), scale(k, g_k), scale(v, g_v)
        if bias is None:
            return q, k, v, None
        b_q, _, b_v = jnp.split(bias, 3)
        return add_bias(q, b_q), k, v, b_v

    def empty_cache(self, slots: int, batch: int, max_len: int) -> KVCache:
        dim = self.proj.weight.shape[1]
        return KVCache.empty(slots, batch, self.heads, max_len, dim // self.heads, self.proj.weight.dtype)


class MLP(eqx.Module):
    fc1: Linear
    fc2: Linear
    gate_apply: str = eqx.field(static=True, default="auto")  # model.gate_apply (Linear)

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray, std: float, dtype=jnp.float32,
                 bias: bool = True, out_std: float | None = None, gate_apply: str = "auto"):
        k1, k2 = jax.random.split(key)
        self.fc1 = Linear(dim, hidden, key=k1, std=std, bias=bias, dtype=dtype)
        self.fc2 = Linear(hidden, dim, key=k2, std=std if out_std is None else out_std, bias=bias, dtype=dtype)
        self.gate_apply = gate_apply

    def __call__(self, x: Float[Array, "... dim"], gates: BlockGates,
                 norm: LayerNorm | None = None) -> Float[Array, "... dim"]:
        """The MLP of ``norm(x)`` (``x`` standardised when ``norm`` is given)."""
        h = self.fc1(x, gates.fc1, norm, gate_apply=self.gate_apply)
        return self.fc2(gelu(h), gates.fc2, gate_apply=self.gate_apply)


class Block(eqx.Module):
    """A pre-norm transformer block: attention and an MLP, each behind its layer norm.

    As an ODE's vector field it is the *parallel* block, ``f(x) = attn(LN_a(x)) + mlp(LN_m(x))``
    (``__call__``): one evaluation is one ``f``. Both norms standardise the same ``x``, so it
    is standardised once and each norm's gain and shift are folded into the weights of the
    products that follow (``Linear``). GPT-2's *sequential* layer,
    ``x' = x + attn(LN_a(x)); x'' = x' + mlp(LN_m(x'))``, calls ``attention_branch`` and
    ``mlp_branch`` in turn (``models/standard.py``).

    ``resid_std`` initialises the two residual projections (attention's output projection
    and the MLP's second layer); GPT-2 uses ``std / sqrt(2 * layers)`` there.
    """

    ln_attn: LayerNorm
    attn: Attention
    ln_mlp: LayerNorm
    mlp: MLP

    def __init__(self, dim: int, heads: int, mlp_ratio: int, *, key: PRNGKeyArray, std: float,
                 dtype=jnp.float32, attention: str = "auto", bias: bool = True, resid_std: float | None = None,
                 gate_apply: str = "auto"):
        ka, km = jax.random.split(key)
        self.ln_attn = LayerNorm(dim, dtype=dtype, bias=bias)
        self.attn = Attention(dim, heads, key=ka, std=std, dtype=dtype, implementation=attention, bias=bias,
                              proj_std=resid_std, gate_apply=gate_apply)
        self.ln_mlp = LayerNorm(dim, dtype=dtype, bias=bias)
        self.mlp = MLP(dim, mlp_ratio * dim, key=km, std=std, dtype=dtype, bias=bias, out_std=resid_std,
                       gate_apply=gate_apply)

    def __call__(self, x: Float[Array, "batch seq dim"], gates: BlockGates = BlockGates(),
                 dropout: Dropout | None = None) -> Float[Array, "batch seq dim"]:
        """The parallel block's ``attn(LN_a(x)) + mlp(LN_m(x))``, each branch dropped out."""
        return self.of_standardized(self.ln_attn.standardize(x), gates, dropout)  # ln_mlp has the same eps

    def of_standardized(self, x_hat: Float[Array, "batch seq dim"], gates: BlockGates = BlockGates(),
                        dropout: Dropout | None = None) -> Float[Array, "batch seq dim"]:
        """``__call__`` of the ``x`` whose standardisation is ``x_hat`` (a caller that needs
        ``x_hat`` too, the SSM term of ``time_indexed_ssm``, standardises ``x`` once)."""
        a = self.attn(x_hat, gates, self.ln_attn, dropout)
        m = self.mlp(x_hat, gates, self.ln_mlp)
        if dropout is not None:
            a, m = dropout.attention_out(a), dropout.mlp_out(m)
        return a + m

    def attention_branch(self, x: Float[Array, "batch seq dim"], gates: BlockGates = BlockGates(),
                         dropout: Dropout | None = None) -> Float[Array, "batch seq dim"]:
        """``drop(attn(LN_a(x)))``: the first residual branch of a sequential layer."""
        a = self.attn(self.ln_attn.standardize(x), gates, self.ln_attn, dropout)
        return a if dropout is None else dropout.attention_out(a)

    def mlp_branch(self, x: Float[Array, "batch seq dim"], gates: BlockGates = BlockGates(),
                   dropout: Dropout | None = None) -> Float[Array, "batch seq dim"]:
        """``drop(mlp(LN_m(x)))``: the second residual branch of a sequential layer."""
        m = self.mlp(self.ln_mlp.standardize(x), gates, self.ln_mlp)
        return m if dropout is None else dropout.mlp_out(m)


class DecodeGates(NamedTuple):
    """Per-output gates a ``DecodeBlock`` applies to its products' outputs (shared weights)."""

    into: Float[Array, " 3*dim+hidden"]  # of the [q|k|v|h] product
    attn: Float[Array, " dim"]  # of the attention's output product
    mlp: Float[Array, " dim"]  # of the MLP's output product


class DecodeBlock(eqx.Module):
    """A block at one depth-time, its gates and norms folded into two merged products, for
    evaluating a few new positions against a KV cache (decoding)::

        [q | k | v | h] = x_hat W_in + b_in,     W_in  = [diag(g_a) W_qkv diag(gate_qkv) | diag(g_m) W_1 diag(gate_1)]
        f(x)            = [attn(q, k, v) | gelu(h)] W_out + b_attn + b_mlp,
                                                 W_out = [W_proj diag(gate_proj) ; W_2 diag(gate_2)]

    with ``x_hat`` the standardised ``x`` and ``g``, the norms' gains (their shifts and the
    layers' biases fold into ``b_in``, ``b_attn = b_proj`` and ``b_mlp = b_2``): the same
    ``f`` as ``Block(x, gates)``. The gates depend on ``t`` only, so a decoding grid builds one
    ``DecodeBlock`` per evaluation once (``of``), and each decoded token's evaluation runs two
    products and the attention instead of the gates' MLP, the folds and five products.
    GPT-2's sequential layer reads the same weights a sub-layer at a time
    (``attention_branch``, ``mlp_branch``).

    ``gates`` set (``of(..., fold=False)``): the matrices stay ungated, one copy for every
    evaluation of a block that does not change with ``t``, and the gates multiply the
    products' outputs, ``[q|k|v|h] = (x_hat W_in) * gate_in + b_in`` and
    ``f = (a W_proj) * gate_proj + (gelu(h) W_2) * gate_2 + b_attn + b_mlp`` (two output
    products). Both matrices are stored transposed (``[outputs, inputs]``): a one-token
    product sums along rows, which the GPU does with one warp per output instead of a few
    blocks for all of them.
    """

    w_in: Float[Array, "3*dim+hidden dim"]  # W_in transposed
    b_in: Float[Array, " 3*dim+hidden"]
    w_out: Float[Array, "dim dim+hidden"]  # W_out transposed
    b_attn: Float[Array, " dim"]
    b_mlp: Float[Array, " dim"]
    gates: DecodeGates | None
    heads: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    @classmethod
    def of(cls, block: Block, gates: BlockGates = BlockGates(), dtype=None, fold: bool = True) -> "DecodeBlock":
        """``block`` under ``gates`` (in ``dtype``, default the block's): folded into the
        weights, or (``fold=False``) kept apart as ``DecodeGates``."""
        apart = not fold and gates.qkv is not None
        (w_qkv, b_qkv), (w_1, b_1) = (lin.effective(g, norm, gate_weights=not apart) for lin, g, norm in (
            (block.attn.qkv, gates.qkv, block.ln_attn), (block.mlp.fc1, gates.fc1, block.ln_mlp)))
        (w_p, b_p), (w_2, b_2) = (lin.effective(None if apart else g) for lin, g in (
            (block.attn.proj, gates.proj), (block.mlp.fc2, gates.fc2)))
        b_qkv, b_1, b_p, b_2 = (jnp.zeros_like(w[0]) if b is None else b
                                for w, b in ((w_qkv, b_qkv), (w_1, b_1), (w_p, b_p), (w_2, b_2)))
        dtype = dtype or w_qkv.dtype
        cast = lambda tree: jax.tree.map(lambda leaf: leaf.astype(dtype), tree)  # noqa: E731
        apart_gates = DecodeGates(jnp.concatenate([gates.qkv, gates.fc1]), gates.proj, gates.fc2) if apart else None
        return cls(*cast((jnp.concatenate([w_qkv, w_1], 1).T, jnp.concatenate([b_qkv, b_1]),
                          jnp.concatenate([w_p, w_2], 0).T, b_p, b_2, apart_gates)),
                   block.attn.heads, block.ln_attn.eps)

    def at(self, slot: Int[Array, ""]) -> "DecodeBlock":
        """Evaluation ``slot``'s block of a stack of them; matrices without the stack's axis
        (of a block's rank, like the vectors' one below theirs) are one copy for all."""
        if self.w_in.ndim > self.b_in.ndim:
            return jax.tree.map(lambda leaf: leaf[slot], self)
        vectors = lambda b: (b.b_in, b.b_attn, b.b_mlp, b.gates)  # noqa: E731
        return eqx.tree_at(vectors, self, jax.tree.map(lambda leaf: leaf[slot], vectors(self)))

    def _dim(self) -> int:
        return self.w_out.shape[0]

    def _into(self, x: Float[Array, "batch chunk dim"], rows: slice) -> Float[Array, "batch chunk n"]:
        """Rows ``rows`` of ``[q|k|v|h]`` of ``x``."""
        y = _product(standardize(x, self.eps), self.w_in[rows])
        return (y if self.gates is None else y * self.gates.into[rows]) + self.b_in[rows]

    def _out(self, z: Float[Array, "batch chunk n"], branch: str) -> Float[Array, "batch chunk dim"]:
        """The output product of ``branch`` (``attn`` or ``mlp``: its columns of ``W_out``), gated."""
        d = self._dim()
        y = _product(z, self.w_out[:, :d] if branch == "attn" else self.w_out[:, d:])
        return y if self.gates is None else y * getattr(self.gates, branch)

    def _attention(self, qkv: Float[Array, "batch chunk 3*dim"], cache: KVCache, slot, start
                   ) -> tuple[Float[Array, "batch chunk dim"], KVCache]:
        b, t, _ = qkv.shape
        q, k, v = (z.reshape(b, t, self.heads, -1) for z in jnp.split(qkv, 3, axis=-1))
        out, cache = cache.attend(slot, start, q, k, v)
        return out.reshape(b, t, self._dim()), cache

    def __call__(self, x: Float[Array, "batch chunk dim"], cache: KVCache, slot: Int[Array, ""],
                 start: Int[Array, ""]) -> tuple[Float[Array, "batch chunk dim"], KVCache]:
        """The parallel block's ``f(x)`` of a chunk at positions ``start ...``, attending through
        ``cache`` slot ``slot`` (which it writes)."""
        d = self._dim()
        y = self._into(x, slice(None))
        a, cache = self._attention(y[..., : 3 * d], cache, slot, start)
        h = gelu(y[..., 3 * d:])
        if self.gates is None:  # one merged output product
            out = _product(jnp.concatenate([a, h], axis=-1), self.w_out)
        else:
            out = self._out(a, "attn") + self._out(h, "mlp")
        return out + (self.b_attn + self.b_mlp), cache

    def attention_branch(self, x: Float[Array, "batch chunk dim"], cache: KVCache, slot: Int[Array, ""],
                         start: Int[Array, ""]) -> tuple[Float[Array, "batch chunk dim"], KVCache]:
        """``attn(LN_a(x))`` of a chunk: a sequential layer's first sub-layer."""
        d = self._dim()
        a, cache = self._attention(self._into(x, slice(None, 3 * d)), cache, slot, start)
        return self._out(a, "attn") + self.b_attn, cache

    def mlp_branch(self, x: Float[Array, "batch chunk dim"]) -> Float[Array, "batch chunk dim"]:
        """``mlp(LN_m(x))``: a sequential layer's second sub-layer."""
        d = self._dim()
        h = gelu(self._into(x, slice(3 * d, None)))
        return self._out(h, "mlp") + self.b_mlp


def _product(x: Float[Array, "... fan_in"], w_t: Float[Array, "fan_out fan_in"]) -> Float[Array, "... fan_out"]:
    """``x W`` of a transposed ``W``."""
    return jnp.einsum("...i,oi->...o", x, w_t)
