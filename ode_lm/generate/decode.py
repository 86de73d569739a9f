"""``generate``: continue a prompt, with the KV cache (default) or by full recomputation.

Both paths run the same loop and the same jitted sampling, so with equal logits they pick
equal tokens. The loop keeps one invariant: the context holds ``n`` tokens at positions
``0 .. n-1`` and ``token`` is the next one, to be placed at position ``n``.

- cached: ``prefill`` runs the context once, filling every evaluation's cache slot; each
  later token costs one ``decode_step`` (one position through the whole solve). Buffers
  have a fixed size and the position is a traced scalar, so the step compiles once. The
  token loop runs on the device (``fori_loop``; sampling there too): when nobody watches
  tokens arrive (no ``on_token``), the steps up to the next window slide are one device
  loop; streaming runs ``generate.chunk`` tokens per call (a traced count, so a short last
  chunk reuses the program) and hands each chunk to ``on_token`` while the next one runs.
- recompute (``cache = false``): every token re-runs the model on the whole context, padded
  to a multiple of ``bucket`` positions so it compiles once per bucket; causality makes the
  padding irrelevant. Adaptive solves see exactly the context (no padding), because padding
  would change the step sizes the controller picks.
- sliding window (``window = w > 0``): when ``token`` has no position left (``n`` =
  max_positions), the context becomes the last ``max_positions - w`` tokens and is run again
  from position 0 (learned absolute positions: every state moves, so the cache cannot roll).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ode_lm.config import Config, GenerateConfig, ODEConfig, config_from_dict
from ode_lm.data import Tokenizer
from ode_lm.errors import ConfigError, GenerationError
from ode_lm.generate.sampling import Sampling, sample
from ode_lm.models import LanguageModel

# How many times each jitted function below was traced (a compile-once check for tests).
TRACES: collections.Counter[str] = collections.Counter()


def _choose(logits, seen, key, s: Sampling):
    key, sub = jax.random.split(key)
    token = sample(logits, seen, sub, s)
    return token, seen.at[jnp.arange(token.shape[0]), token].set(True), key


# The decode functions are plain ``jax.jit`` (every leaf of a model and of a cache is an
# array): a call returns once its work is queued, so the host hands one chunk of tokens to the
# caller while the device computes the next (``eqx.filter_jit`` would wait for the device on
# every call; see ode_lm/train/steps.py). They donate their inputs (all but the model), so
# the cache, the seen-token mask and the key are updated in place instead of copied per call.
def _prefill(model: LanguageModel, context: Int[Array, "batch n"], cache, seen, key, s: Sampling):
    TRACES["prefill"] += 1
    logits, cache = model.prefill(context, cache)
    return (*_choose(logits[:, -1], seen, key, s), cache)


_prefill = jax.jit(_prefill, static_argnames="s", donate_argnums=(2, 3, 4))


def _decode_loop(model, token, position, cache, seen, key, s, size: int, count, unroll: int):
    """Up to ``size`` tokens after ``token`` in one device loop, the first ``count`` of them
    chosen (``count`` = ``size`` makes the trip count static): ``(tokens [size, batch], last
    token, seen, key, cache, position)``. Rows past ``count`` stay 0.

    Each loop iteration decodes ``unroll`` tokens (``generate.unroll``; a last loop takes the
    ``count % unroll`` left): a GPU pays the loop's control, a round trip to the host, once
    per iteration.
    """

    def one(i, carry):
        tokens, token, seen, key, cache, position = carry
        logits, cache = model.decode_step(token, position, cache)
        token, seen, key = _choose(logits, seen, key, s)
        return tokens.at[i].set(token), token, seen, key, cache, position + 1

    def several(n, carry):
        for j in range(unroll):
            carry = one(n * unroll + j, carry)
        return carry
    carry = (jnp.zeros((size, token.shape[0]), jnp.int32), token, seen, key, cache, position)
    full = count // unroll
    return jax.lax.fori_loop(full * unroll, count, one, jax.lax.fori_loop(0, full, several, carry))


def _decode(model: LanguageModel, token: Int[Array, " batch"], position: Int[Array, ""], cache,
            seen, key, count: Int[Array, ""], s: Sampling, size: int, unroll: int):
    """A chunk of ``count <= size`` tokens (the streaming path: ``size`` = ``generate.chunk``;
    ``count`` is traced, so a short last chunk reuses the program)."""
    TRACES["decode"] += 1
    return _decode_loop(model, token, position, cache, seen, key, s, size, count, unroll)


def _decode_many(model: LanguageModel, token: Int[Array, " batch"], position: Int[Array, ""], cache,
                 seen, key, s: Sampling, count: int, unroll: int):
    """``count`` tokens in one device loop of static length (nobody watches them arrive)."""
    TRACES["decode_many"] += 1
    return _decode_loop(model, token, position, cache, seen, key, s, count, count, unroll)


_decode = jax.jit(_decode, static_argnames=("s", "size", "unroll"), donate_argnums=(1, 2, 3, 4, 5))
_decode_many = jax.jit(_decode_many, static_argnames=("s", "count", "unroll"), donate_argnums=(1, 2, 3, 4, 5))


def _recompute(model: LanguageModel, window: Int[Array, "batch length"], read: Int[Array, ""],
               seen, key, s: Sampling, ode: ODEConfig):
    TRACES["recompute"] += 1
    logits, _ = model(window, ode)
    return _choose(jax.lax.dynamic_index_in_dim(logits, read, axis=1, keepdims=False), seen, key, s)


_recompute = jax.jit(_recompute, static_argnames=("s", "ode"))


@eqx.filter_jit
def greedy_logits(model: LanguageModel, prompt: Int[Array, "batch prompt"], cache, new_tokens: int
                  ) -> tuple[Int[Array, "batch new_tokens"], Array]:
    """Cached greedy decoding that keeps every logit: ``(new tokens, logits)``.

    ``logits[:, i]`` (``[batch, prompt + new_tokens, vocab]``) predicts position ``i + 1``,
    exactly what one forward pass of ``prompt + new tokens`` returns, so comparing the two
    measures what the cache changes (nothing, on a fixed grid).
    """
    first, cache = model.prefill(prompt, cache)
    start = prompt.shape[1]

    def step(carry, position):
        cache, logits = carry
        token = jnp.argmax(logits, axis=-1)
        logits, cache = model.decode_step(token, position, cache)
        return (cache, logits), (token, logits)
    _, (new, logits) = jax.lax.scan(step, (cache, first[:, -1]), jnp.arange(start, start + new_tokens))
    return jnp.swapaxes(new, 0, 1), jnp.concatenate([first, jnp.swapaxes(logits, 0, 1)], axis=1)


class _Cached:
    def __init__(self, model, ode, max_len, s: GenerateConfig):
        self.model, self.ode, self.max_len = model, ode, max_len
        self.unroll, self.decode_weights = s.unroll, s.decode_weights

    def restart(self, context, seen, key, s):
        context = jnp.asarray(context)
        self.cache = self.model.init_cache(context, self.ode, self.max_len, self.decode_weights)
        token, seen, key, self.cache = _prefill(self.model, context, self.cache, seen, key, s=s)
        self.position = jnp.asarray(context.shape[1], jnp.int32)  # on device: no transfer per token
        return token, seen, key

    def advance(self, token, n, count, seen, key, s, chunk=None):
        """``count`` tokens after ``token``, placed at ``n``: ``(tokens [count, batch], last
        token, seen, key)``; ``chunk``: the program's fixed chunk size (streaming), else one
        program of exactly ``count`` steps."""
        if chunk is None:
            tokens, token, seen, key, self.cache, self.position = _decode_many(
                self.model, token, self.position, self.cache, seen, key, s=s, count=count, unroll=self.unroll)
            return tokens, token, seen, key
        tokens, token, seen, key, self.cache, self.position = _decode(
            self.model, token, self.position, self.cache, seen, key, jnp.asarray(count, jnp.int32), s=s, size=chunk,
            unroll=self.unroll)
        return tokens[:count], token, seen, key


class _Recompute:
    def __init__(self, model, ode, max_len, bucket):
        self.model, self.ode, self.max_len = model, ode, max_len
        self.bucket = 1 if ode.adaptive else bucket

    def _run(self, length, seen, key, s):
        padded = min(self.max_len, -(-length // self.bucket) * self.bucket)
        return _recompute(self.model, self.buffer[:, :padded], jnp.asarray(length - 1, jnp.int32),
                          seen, key, s=s, ode=self.ode)

    def restart(self, context, seen, key, s):
        self.buffer = jnp.zeros((context.shape[0], self.max_len), jnp.int32).at[:, :context.shape[1]].set(context)
        return self._run(context.shape[1], seen, key, s)

    def advance(self, token, n, count, seen, key, s, chunk=None):
        tokens = []
        for i in range(count):
            self.buffer = self.buffer.at[:, n + i].set(token)
            token, seen, key = self._run(n + i + 1, seen, key, s)
            tokens.append(token)
        return jnp.stack(tokens), token, seen, key


def check_settings(settings: GenerateConfig | None = None, **overrides) -> GenerateConfig:
    """``settings`` with ``overrides`` applied, validated like a config file's [generate]."""
    base = dataclasses.asdict(settings or GenerateConfig())
    unknown = set(overrides) - set(base)
    if unknown:
        raise ConfigError(f"unknown generation setting(s) {', '.join(sorted(unknown))}; allowed are "
                          f"{', '.join(base)}")
    return config_from_dict({"generate": {**base, **overrides}}, "generation settings").generate


def generate(model: LanguageModel, prompt_ids, ode: ODEConfig, settings: GenerateConfig | None = None, *,
             on_token: Callable[[np.ndarray], None] | None = None, bucket: int = 128,
             **overrides) -> np.ndarray:
    """Continue ``prompt_ids``; return the new tokens, ``[num_samples, max_new_tokens]``.

    ``prompt_ids``: one prompt (a sequence of token ids), or several of one length as a
    ``[prompts, length]`` array, decoded as one batch: then ``[prompts * num_samples,
    max_new_tokens]``, each prompt's samples in consecutive rows.

    ``settings`` (default ``GenerateConfig()``) and keyword ``overrides`` such as
    ``temperature=0.5, top_k=40, cache=False`` choose the sampling; ``on_token`` receives each
    step's tokens (one per sample), in order, a chunk of ``chunk`` steps at a time (``chunk=1``:
    each as soon as it is chosen), for streaming. ``bucket`` is the
    padding granularity of full recomputation.
    """
    s = check_settings(settings, **overrides)
    vocab, limit = model.embedding.tokens.shape[0], model.embedding.positions.shape[0]
    prompts = _check_prompts(prompt_ids, vocab, limit, s)
    length = prompts.shape[1]
    max_len = limit if s.window else length + s.max_new_tokens
    runner = _Cached(model, ode, max_len, s) if s.cache else _Recompute(model, ode, max_len, bucket)
    sampling = Sampling.of(s)

    sequence = np.repeat(prompts.astype(np.int32), s.num_samples, axis=0)  # prompt-major rows
    rows = np.arange(sequence.shape[0])[:, None]
    seen = np.zeros((sequence.shape[0], vocab), bool)
    seen[rows, sequence] = True  # on the host: one transfer, not a scatter's eager ops
    seen = jnp.asarray(seen)
    key = jax.random.key(s.seed)
    context = sequence if sequence.shape[1] <= limit else sequence[:, -(limit - s.window):]
    n = context.shape[1]
    token, seen, key = runner.restart(context, seen, key, sampling)
    new = [token[None]]  # chunks of [count, batch] tokens, on device until read
    delivered = 0  # chunks handed to on_token
    produced = 1
    while produced < s.max_new_tokens:
        if n == limit:  # no position left for ``token``: slide the window
            sequence = np.concatenate([sequence[:, :length], np.asarray(jnp.concatenate(new).T)], 1)
            context = sequence[:, -(limit - s.window):]
            n = context.shape[1]
            token, seen, key = runner.restart(context, seen, key, sampling)
            chunk = token[None]
        else:
            # Streaming: chunks of s.chunk tokens. Otherwise everything up to the next slide at once.
            count = min(s.max_new_tokens - produced, limit - n)
            if on_token is not None:
                count = min(count, s.chunk)
            chunk, token, seen, key = runner.advance(token, n, count, seen, key, sampling,
                                                     s.chunk if on_token is not None else None)
            n += count
        new.append(chunk)
        produced += chunk.shape[0]
        # The next chunk is queued (calls return before the device finishes): hand the
        # previous ones to on_token while it runs.
        delivered = _deliver(new, delivered, len(new) - 1, on_token)
    _deliver(new, delivered, len(new), on_token)
    return np.asarray(jnp.concatenate(new).T)


def _check_prompts(prompt_ids, vocab: int, limit: int, s: GenerateConfig) -> np.ndarray:
    """``prompt_ids`` as ``[prompts, length]`` (one prompt: a flat sequence), checked."""
    try:
        prompts = np.asarray(prompt_ids)
    except ValueError:  # ragged
        prompts = np.empty((0, 0, 0))
    prompts = prompts.reshape(1, -1) if prompts.ndim <= 1 else prompts
    if prompts.ndim != 2:
        raise GenerationError(f"prompt token ids must be one sequence or a [prompts, length] array of "
                              f"prompts of one length; got an array of shape {prompts.shape}")
    if prompts.size == 0:
        raise GenerationError("the prompt is empty; give at least one token to continue")
    if not np.issubdtype(prompts.dtype, np.integer) or prompts.min() < 0 or prompts.max() >= vocab:
        raise GenerationError(f"prompt token ids must be integers in [0, {vocab}); got "
                              f"{prompts.dtype} values in [{prompts.min()}, {prompts.max()}]")
    if s.window >= limit:
        raise GenerationError(f"window = {s.window} must be below max_positions = {limit}")
    length = prompts.shape[1]
    if not s.window and length + s.max_new_tokens > limit:
        raise GenerationError(f"prompt ({length} tokens) + max_new_tokens ({s.max_new_tokens}) = "
                              f"{length + s.max_new_tokens} exceeds the model's max_positions = "
                              f"{limit}; shorten them or slide a window (--window)")
    return prompts


def _deliver(chunks: list, start: int, stop: int, on_token) -> int:
    """Give ``on_token`` every token of ``chunks[start:stop]``, one step (all samples) a call."""
    if on_token is not None:
        for chunk in chunks[start:stop]:
            for row in np.asarray(chunk):
                on_token(row)
    return stop


def training_sample(model: LanguageModel, cfg: Config, tokenizer: Tokenizer) -> str:
    """The end-of-training sample (``train.sample``): one continuation of ``generate.prompt``
    with the ``[generate]`` settings, cut to the positions the model has left; "" when none
    are left. The command line hands it to ``ode_lm.train.train``, which does not import
    this package."""
    prompt = tokenizer.encode(cfg.generate.prompt)
    n = min(cfg.generate.max_new_tokens, cfg.model.max_positions - len(prompt))
    if n <= 0 or len(prompt) == 0:
        return ""
    ids = generate(model, prompt, cfg.ode, cfg.generate, max_new_tokens=n, num_samples=1, window=0)
    return tokenizer.decode(ids[0])
