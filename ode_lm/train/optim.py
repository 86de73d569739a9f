"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import equinox as eqx
import jax
import optax

from ode_lm.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    # Decay matrices and embeddings only; never gains, biases or scalars.
    return jax.tree.map(lambda p: eqx.is_inexact_array(p) and p.ndim >= 2, params)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_decay_mask),
    )
