"""Numeric precision: parameter dtype vs compute dtype.

``train.dtype = "bfloat16"`` is mixed precision: parameters and optimizer state stay
float32, the forward and backward passes run on bf16 copies of the parameters, and the ODE
state, solver error control and loss stay float32 (see ``CastField``, which also casts the
vector field's parameters at each evaluation, so their gradients sum over the solve's steps
in float32; ``LanguageModel.in_dtype``, ``ode_lm.ode.cast_floating``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ode_lm.config import Config


def param_dtype(cfg: Config) -> jnp.dtype:
    if cfg.train.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return jnp.dtype(jnp.float32 if cfg.train.dtype == "bfloat16" else cfg.train.dtype)


def compute_dtype(cfg: Config) -> jnp.dtype:
    return jnp.dtype(cfg.train.dtype)

