"""What every family shares: token + position embedding, the readout, the ODE forward pass.

An ODE family's forward pass::

    x(0)   = embed(tokens)                  # [batch, seq, dim]
    dx/dt  = f(t, x)                        # the family's VectorField, t in [0, 1]
    logits = head(LN(x(1)))

Cached decoding (``init_cache`` / ``prefill`` / ``decode_step``) runs the same maths on a
chunk of new positions at a time: every attention evaluation keeps its keys and values in a
fixed-size cache slot, so a new token costs one position's worth of work (see
docs/generation.md).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ode_lm.config import DECODE_WEIGHTS, ModelConfig, ODEConfig
from ode_lm.errors import ConfigError, GenerationError
from ode_lm.nn import SAVES, Block, BlockGates, DecodeBlock, Dropout, DropoutRates, LayerNorm, add_bias, gather_rows
from ode_lm.ode import (CastField, GridScheme, SolveStats, VectorField, accepted_grid, cast_floating, fixed_grid,
                        grid_scheme, integrate)


# Vocabularies up to this size are embedded by a one-hot product (see Embedding.__call__);
# its cost, 2 x vocab x dim FLOPs per token, stays below one block's 24 x dim^2 there.
ONE_HOT_MAX_VOCAB = 1024
SOLVE_KEY = 1  # folded into the training key: the solve's randomness (grid jitter, Hutchinson probe)


class Embedding(eqx.Module):
    tokens: Float[Array, "vocab dim"]
    positions: Float[Array, "max_positions dim"]

    def __init__(self, vocab: int, max_positions: int, dim: int, *, key: PRNGKeyArray,
                 std: float, dtype=jnp.float32):
        kt, kp = jax.random.split(key)
        self.tokens = std * jax.random.normal(kt, (vocab, dim), dtype)
        self.positions = std * jax.random.normal(kp, (max_positions, dim), dtype)

    def __call__(self, tokens: Int[Array, "batch seq"], offset: int | Int[Array, ""] = 0
                 ) -> Float[Array, "batch seq dim"]:
        vocab = self.tokens.shape[0]
        if vocab <= ONE_HOT_MAX_VOCAB:
            # A one-hot product rather than a gather: the gather's gradient is a scatter-add
            # whose atomic updates collide on frequent tokens (a space is ~15% of bytes), which
            # made byte-level training steps 2-5x slower on an H100 than on uniform tokens.
            pos = jax.lax.dynamic_slice_in_dim(self.positions, offset, tokens.shape[-1])
            return add_bias(jax.nn.one_hot(tokens, vocab, dtype=self.tokens.dtype) @ self.tokens, pos)
        return self.lookup(tokens, offset)

    def lookup(self, tokens: Int[Array, "batch seq"], offset: int | Int[Array, ""] = 0
               ) -> Float[Array, "batch seq dim"]:
        """The same embedding by a gather (exactly equal): for decoding, which takes no
        gradient, and where the one-hot product is a column sum over the vocabulary per token."""
        return add_bias(gather_rows(self.tokens, tokens),
                        jax.lax.dynamic_slice_in_dim(self.positions, offset, tokens.shape[-1]))


class Readout(eqx.Module):
    """Final layer norm and LM head; the head is the token embedding when tied."""

    norm: LayerNorm
    head: Float[Array, "dim vocab"] | None

    def __init__(self, dim: int, vocab: int, tied: bool, *, key: PRNGKeyArray, std: float,
                 dtype=jnp.float32, bias: bool = True):
        self.norm = LayerNorm(dim, dtype=dtype, bias=bias)
        self.head = None if tied else std * jax.random.normal(key, (dim, vocab), dtype)

    def __call__(self, x: Float[Array, "batch seq dim"], embedding: Embedding
                 ) -> Float[Array, "batch seq vocab"]:
        w = embedding.tokens.T if self.head is None else self.head
        return self.norm(x) @ w


class LanguageModel(eqx.Module):
    """Tokens ``[batch, seq]`` -> next-token logits ``[batch, seq, vocab]`` and solve stats."""

    @abc.abstractmethod
    def __call__(self, tokens: Int[Array, "batch seq"], ode: ODEConfig, *,
                 key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq vocab"], SolveStats]:
        """``key`` turns dropout on (training); ``None`` is the deterministic eval mode."""

    @abc.abstractmethod
    def init_cache(self, prompt: Int[Array, "batch seq"], ode: ODEConfig, max_len: int,
                   decode_weights: str = "auto") -> PyTree:
        """An empty decoding cache for sequences of up to ``max_len`` positions.

        The prompt matters only to adaptive ODE solves, whose step grid it fixes;
        ``decode_weights`` (``generate.decode_weights``) only to families whose block does not
        change with ``t``.
        """

    @abc.abstractmethod
    def extend(self, tokens: Int[Array, "batch chunk"], start: Int[Array, ""] | int, cache: PyTree
               ) -> tuple[Float[Array, "batch chunk vocab"], PyTree]:
        """Logits of tokens at positions ``start ...``, given the cache of positions ``< start``."""

    def in_dtype(self, dtype) -> "LanguageModel":
        """The model with its floating-point parameters in ``dtype``, to compute in."""
        return cast_floating(self, dtype)

    def prefill(self, prompt: Int[Array, "batch seq"], cache: PyTree
                ) -> tuple[Float[Array, "batch seq vocab"], PyTree]:
        return self.extend(prompt, 0, cache)

    def decode_step(self, token: Int[Array, " batch"], position: Int[Array, ""], cache: PyTree
                    ) -> tuple[Float[Array, "batch vocab"], PyTree]:
        logits, cache = self.extend(token[:, None], position, cache)
        return logits[:, 0], cache


class CachedField(VectorField):
    """A vector field that can also evaluate new positions against per-evaluation caches.

    Its block at depth-time ``t`` (``block_at``) is what decoding evaluates: ``decode_blocks``
    folds it once per evaluation of the decoding grid (``DecodeBlock``), and ``extend`` runs
    one. ``dropout`` is set for a training solve only (``ODELanguageModel.hidden_final``).
    """

    dropout: eqx.AbstractVar[Dropout | None]

    def at_step(self, step):
        if self.dropout is None or not self.dropout.per_step:
            return self
        return eqx.tree_at(lambda f: f.dropout, self, self.dropout.at_step(step))

    @abc.abstractmethod
    def block_at(self, t: Float[Array, ""]) -> tuple[Block, BlockGates]:
        """The transformer block and its gates at depth-time ``t``."""

    @abc.abstractmethod
    def init_cache(self, slots: int, batch: int, max_len: int) -> PyTree:
        """Empty per-evaluation state, stacked over ``slots`` evaluations."""

    # Whether ``block_at(t)`` is one block for every ``t`` (only its gates vary), so decoding
    # may keep one copy of its weights (``generate.decode_weights = "shared"``).
    block_is_constant: ClassVar[bool] = False

    def decode_blocks(self, times: Float[Array, " slots"], dtype, shared: bool) -> DecodeBlock:
        """The block of every evaluation at ``times``, stacked over evaluations: gates folded
        into each one's weights, or (``shared``) one copy of the weights and per-evaluation gates."""
        blocks = jax.vmap(lambda t: DecodeBlock.of(*self.block_at(t), dtype, fold=not shared))(times)
        if not shared:
            return blocks
        return eqx.tree_at(lambda b: (b.w_in, b.w_out), blocks, (blocks.w_in[0], blocks.w_out[0]))

    def extend(self, block: DecodeBlock, t: Float[Array, ""], x: Float[Array, "batch chunk dim"], cache: PyTree,
               slot: Int[Array, ""], start: Int[Array, ""]) -> tuple[Float[Array, "batch chunk dim"], PyTree]:
        """``f(t, x)`` of a chunk at positions ``start ...``, evaluation number ``slot``, whose
        folded block is ``block``."""
        return block(x, cache, slot, start)


class ODECache(eqx.Module):
    """A frozen solve to continue: per-evaluation state, the step grid it belongs to and the
    folded block of each evaluation on it."""

    slots: PyTree  # the field's per-evaluation state (keys/values, SSM states), stacked over slots
    grid: Float[Array, " steps+1"]
    scheme: GridScheme
    blocks: DecodeBlock  # stacked over slots (the matrices: one copy, if shared)
    # Unroll the step loop of one-token decode solves (no device loop, which costs a host
    # round trip per step on GPU). Fixed grids only: an adaptive one may have max_steps steps.
    unroll: bool = eqx.field(static=True)


class ODELanguageModel(LanguageModel):
    """An ODE family: the family supplies only ``field``, the vector field over depth-time."""

    embedding: Embedding
    field: CachedField
    readout: Readout
    dropout: DropoutRates = eqx.field(static=True)
    dropout_per_step: bool = eqx.field(static=True, default=False)  # model.dropout_masks

    def hidden_final(self, tokens: Int[Array, "batch seq"], ode: ODEConfig, *,
                     key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq dim"], SolveStats]:
        """``x(1)``; with ``key`` the embeddings are dropped out and the field draws its masks
        from one ``Dropout``: the same at every evaluation, or renewed per fixed step."""
        x0 = self.embedding(tokens)
        field = self.field
        if key is not None and self.dropout.any:
            drop = Dropout(key, self.dropout, self.dropout_per_step)
            x0 = drop.embedding(x0)
            field = eqx.tree_at(lambda f: f.dropout, field, drop, is_leaf=lambda v: v is None)
        # The solver state and its error control stay at least float32 (mixed precision).
        state_dtype = jnp.promote_types(x0.dtype, jnp.float32)
        if state_dtype != x0.dtype:
            field, x0 = CastField(field, x0.dtype), x0.astype(state_dtype)
        # A training solve (key given) may jitter its grid and integrate regularisers.
        return integrate(field, x0, ode, None if key is None else jax.random.fold_in(key, SOLVE_KEY), saves=SAVES)

    def in_dtype(self, dtype) -> "ODELanguageModel":
        """Everything but the vector field in ``dtype``. The field keeps its parameters' dtype
        and ``CastField`` casts them at each evaluation, so their gradients sum over the
        solve's steps in that dtype (float32 under bf16 mixed precision)."""
        return eqx.tree_at(lambda m: m.field, cast_floating(self, dtype), self.field)

    def __call__(self, tokens, ode, *, key=None):
        x1, stats = self.hidden_final(tokens, ode, key=key)
        return self.readout(x1.astype(self.embedding.tokens.dtype), self.embedding), stats

    def init_cache(self, prompt, ode, max_len, decode_weights="auto"):
        """Cache slots for every evaluation of the solve on the decoding grid, and each
        evaluation's block (``decode_weights``: ``generate.decode_weights``).

        Fixed steps: the grid ``n / steps``. Adaptive: the grid the solver accepts for the
        prompt, frozen for the rest of the generation (an approximation; docs/generation.md).
        """
        grid = None
        if ode.adaptive:
            times, accepted = _accepted_grid(self, prompt, ode)
            accepted = int(accepted)
            if not float(times[accepted]) == 1.0:
                raise GenerationError(f"the adaptive solve of the prompt did not reach t = 1 within "
                                      f"ode.max_steps = {ode.max_steps} steps; raise ode.max_steps or "
                                      "loosen ode.rtol / ode.atol")
            grid = times[:accepted + 1]
        shared = type(self.field).block_is_constant and resolve_decode_weights(decode_weights) == "shared"
        return _empty_cache(self.field, grid, ode.steps, grid_scheme(ode.solver), prompt.shape[0], max_len,
                            self.embedding.tokens.dtype, shared)

    def extend(self, tokens, start, cache: ODECache):
        x0 = self.embedding.lookup(tokens, start)
        dtype = x0.dtype
        state_dtype = jnp.promote_types(dtype, jnp.float32)

        def evaluate(slot, t, x, slots):
            block = cache.blocks.at(slot)
            dx, slots = self.field.extend(block, t, x.astype(dtype), slots, slot, start)
            return dx.astype(state_dtype), slots

        x1, slots = cache.scheme.solve(evaluate, cache.grid, x0.astype(state_dtype), cache.slots,
                                       unroll=cache.unroll and tokens.shape[1] == 1)
        logits = self.readout(x1.astype(dtype), self.embedding)
        return logits, eqx.tree_at(lambda c: c.slots, cache, slots)


def resolve_decode_weights(setting: str) -> str:
    """``generate.decode_weights``: ``auto`` is ``per_evaluation`` on a GPU, whose decoding is
    bound by its number of kernels, and ``shared`` elsewhere, where one copy of the weights
    stays in the processor's caches across a token's evaluations."""
    if setting not in DECODE_WEIGHTS:
        raise ConfigError(f"generate.decode_weights = {setting!r}; allowed are {', '.join(DECODE_WEIGHTS)}")
    if setting == "auto":
        return "per_evaluation" if jax.default_backend() == "gpu" else "shared"
    return setting


@eqx.filter_jit
def _empty_cache(field: CachedField, grid: Float[Array, " n"] | None, steps: int, scheme: GridScheme, batch: int,
                 max_len: int, dtype, shared: bool) -> ODECache:
    """``ODELanguageModel.init_cache`` on ``grid`` (``None``: the fixed grid of ``steps``
    steps, the training solve's times), in one compiled call (issued op by op, the
    construction cost a GPU milliseconds of dispatch per generation)."""
    fixed = grid is None
    if fixed:
        grid = fixed_grid(steps, jnp.promote_types(dtype, jnp.float32))
    slots = field.init_cache(scheme.slots(grid.shape[0] - 1), batch, max_len)
    blocks = field.decode_blocks(scheme.slot_times(grid), dtype, shared)
    return ODECache(slots, grid, scheme, blocks, unroll=fixed)


@eqx.filter_jit
def _accepted_grid(model: ODELanguageModel, prompt, ode):
    x0 = model.embedding(prompt)
    return accepted_grid(model.field, x0.astype(jnp.promote_types(x0.dtype, jnp.float32)), ode)


def build_shared(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype) -> tuple[Embedding, Readout]:
    ke, kr = jax.random.split(key)
    return (Embedding(vocab, cfg.max_positions, cfg.dim, key=ke, std=cfg.init_std, dtype=dtype),
            Readout(cfg.dim, vocab, cfg.tie_embeddings, key=kr, std=cfg.init_std, dtype=dtype, bias=cfg.bias))


def dropout_rates(cfg: ModelConfig) -> DropoutRates:
    return DropoutRates(cfg.embd_dropout, cfg.attn_dropout, cfg.resid_dropout)


def ode_language_model(cfg: ModelConfig, embedding: Embedding, field: CachedField, readout: Readout
                       ) -> ODELanguageModel:
    """An ODE family's model around its ``field``, with the configured dropout."""
    return ODELanguageModel(embedding, field, readout, dropout_rates(cfg),
                            dropout_per_step=cfg.dropout_masks == "per_step")


def build_block(cfg: ModelConfig, key: PRNGKeyArray, dtype, **kwargs) -> Block:
    """The configured transformer block (``kwargs``: e.g. GPT-2's residual-projection std)."""
    return Block(cfg.dim, cfg.heads, cfg.mlp_ratio, key=key, std=cfg.init_std, dtype=dtype,
                 attention=cfg.attention, bias=cfg.bias, gate_apply=cfg.gate_apply, **kwargs)
