"""`ode-lm info`: FLOP formulas against XLA's own count, and every shipped config."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from ode_lm.config import FAMILIES, ModelConfig, load_config
from ode_lm.models import build_model, count_parameters
from ode_lm.models.accounting import (block_flops_per_token, flops_per_token, parameter_counts,
                                      per_evaluation_flops, ssm_flops_per_token)
from tests.conftest import REPO, run_cli


# The families with their own formulas in the default run; the shared block's in the slow one.
@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in ("hypernetwork", "time_indexed_ssm")
                                                 else pytest.mark.slow) for f in FAMILIES])
def test_field_flops_match_xla_cost_analysis(family):
    """Our matmul count is what XLA counts, less the elementwise work (a few %)."""
    b, t, d = 2, 64, 64
    m = ModelConfig(family=family, dim=d, heads=4, max_positions=t, dropout=0.0, ssm_state_size=16, layers=1,
                    ssm_scan="associative")
    params, static = eqx.partition(build_model(m, 256, jax.random.key(0)), eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (b, t, d))

    def evaluate(params, x):
        model = eqx.combine(params, static)
        return model.layers[0](x) if family == "standard" else model.field(jnp.asarray(0.3), x)

    cost = jax.jit(evaluate).lower(params, x).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = b * t * block_flops_per_token(m, t) + per_evaluation_flops(m)
    if family == "time_indexed_ssm":
        ours += b * t * ssm_flops_per_token(m)
    # The SSM's parallel scan does ~2x the sequential recurrence's elementwise work.
    upper = 1.35 if family == "time_indexed_ssm" else 1.1
    assert 1.0 <= xla / ours <= upper, (xla, ours)


def test_forward_flops_scale_with_nfe():
    cfg = load_config(REPO / "configs" / "time_indexed.toml")
    euler, rk4 = flops_per_token(cfg, 256), flops_per_token(cfg.replace(**{"ode.solver": "rk4"}), 256)
    assert (euler.nfe, rk4.nfe) == (6, 25)
    assert rk4.forward - rk4.head - rk4.embed == pytest.approx(25 / 6 * (euler.forward - euler.head - euler.embed))
    assert euler.embed == euler.head  # vocab 256: embedded by a one-hot product of the same size
    assert euler.train_step == 3 * euler.forward
    standard = flops_per_token(cfg.replace(**{"model.family": "standard", "ode.solver": "rk4"}), 256)
    assert standard.nfe == 6 and standard.forward < euler.forward  # no modulation work


CONFIGS = sorted(p for p in (REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    family = path.stem.removeprefix("quickstart").lstrip("_") or "time_indexed"
    assert cfg.model.family == family
    model = build_model(cfg.model, 256, jax.random.key(0))
    assert sum(parameter_counts(model).values()) == count_parameters(model)
    if not path.stem.startswith("quickstart"):  # the reference size
        m = cfg.model
        assert (m.dim, m.heads, m.dropout, cfg.data.seq_len, cfg.train.batch_size) == (256, 4, 0.1, 512, 32)
        assert (m.layers if family == "standard" else cfg.ode.steps) == 6


def test_covers_every_family():
    assert {load_config(p).model.family for p in CONFIGS} == set(FAMILIES)


def test_cli_info():
    proc = run_cli("info", "configs/time_indexed_ssm.toml", "ode.solver=rk4")
    assert proc.returncode == 0, proc.stderr
    for needle in ("embeddings", "block", "modulation", "ssm", "head", "NFE 25", "FLOP per token",
                   "parameter memory", "training state per device"):
        assert needle in proc.stdout, proc.stdout
    bad = run_cli("info", "configs/time_indexed.toml", "model.family=transformer")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "standard" in bad.stderr


@pytest.mark.parametrize("decode_weights", ["per_evaluation", "shared"])
@pytest.mark.parametrize("family, solver", [(f, "rk4" if f == "time_indexed" else "euler") for f in FAMILIES])
def test_generation_memory_counts_the_caches_decoding_builds(family, solver, decode_weights):
    """The estimate's key/value cache and folded blocks are the bytes ``init_cache`` allocates."""
    from ode_lm.config import Config, DataConfig, GenerateConfig, ODEConfig
    from ode_lm.models.accounting import generation_memory

    cfg = Config(model=ModelConfig(family=family, dim=16, heads=2, layers=3, max_positions=40),
                 ode=ODEConfig(solver=solver, steps=2), data=DataConfig(seq_len=40),
                 generate=GenerateConfig(decode_weights=decode_weights))
    model = build_model(cfg.model, 32, jax.random.key(0))
    cache = model.init_cache(jnp.zeros((3, 5), jnp.int32), cfg.ode, 40, decode_weights)
    kv = cache.kv if family == "standard" else cache.slots
    kv = kv.kv if family == "time_indexed_ssm" else kv  # its SSM states are not counted
    parts = generation_memory(cfg, 32, count_parameters(model), 3, 40, 5, cache=True).parts
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert parts["key/value cache"] == nbytes(kv)
    assert parts["folded blocks"] == nbytes(cache.blocks)
