"""Shared fixtures: tiny configs that train in seconds on a laptop CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ode_lm.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[1]

# The tests check maths to float32/float64 tolerances; on GPUs JAX's default float32 matmul
# precision is TF32 (about 1e-3 relative), so ask for full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(tmp_path: Path, **dotted) -> Config:
    """A model of a few thousand parameters on 300 kB of the embedded corpus."""
    raw = {
        "model": {"dim": 32, "heads": 2, "mlp_ratio": 2, "max_positions": 64, "dropout": 0.0,
                  "time_embed_dim": 8, "modulation_hidden": 16},
        "ode": {"solver": "euler", "steps": 2},
        "data": {"seq_len": 16, "max_bytes": 300_000, "cache_dir": str(tmp_path / "cache")},
        "train": {"run_name": "tiny", "runs_dir": str(tmp_path / "runs"), "steps": 30,
                  "batch_size": 4, "eval_every": 10, "eval_batches": 2, "sample_tokens": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "log": {"every": 5, "progress": False, "tensorboard": False},
        "checkpoint": {"every": 10, "keep": 2},
    }
    for key, value in dotted.items():
        section, name = key.split(".")
        raw[section][name] = value
    return config_from_dict(raw, "tiny_config")


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``ode-lm`` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ode_lm.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
