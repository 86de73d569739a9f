"""Model families, by name (``model.family``)."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ode_lm.config import FAMILIES, ModelConfig
from ode_lm.models.base import CachedField, Embedding, LanguageModel, ODECache, ODELanguageModel, Readout
from ode_lm.models.constant import build_constant
from ode_lm.models.hypernetwork import HypernetworkField, build_hypernetwork
from ode_lm.models.standard import StandardLanguageModel, build_standard
from ode_lm.models.time_indexed import TimeIndexedField, build_time_indexed
from ode_lm.models.time_indexed_ssm import TimeIndexedSSMField, build_time_indexed_ssm

MODEL_FAMILIES: dict[str, Callable[..., LanguageModel]] = {
    "standard": build_standard,
    "hypernetwork": build_hypernetwork,
    "time_indexed": build_time_indexed,
    "time_indexed_ssm": build_time_indexed_ssm,
    "constant": build_constant,
}
assert tuple(MODEL_FAMILIES) == FAMILIES, "model registry and config.FAMILIES must agree"


def count_parameters(model: LanguageModel) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def build_model(cfg: ModelConfig, vocab: int, key: PRNGKeyArray, dtype=jnp.float32) -> LanguageModel:
    """A freshly initialised model of family ``cfg.family``."""
    return MODEL_FAMILIES[cfg.family](cfg, vocab, key, dtype)


__all__ = ["MODEL_FAMILIES", "build_model", "count_parameters", "CachedField", "Embedding", "HypernetworkField",
           "LanguageModel", "ODECache", "ODELanguageModel", "Readout", "StandardLanguageModel", "TimeIndexedField",
           "TimeIndexedSSMField"]
