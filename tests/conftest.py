"""Shared fixtures: tiny configs that train in seconds on a laptop CPU."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the session, its xdist workers and the CLI
# processes the tests start (they inherit the variable): many tests compile the same tiny
# train step, each in a new process or through a new jit. Set before JAX is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ode-lm-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

from ode_lm.config import Config, config_from_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The tests check maths to float32/float64 tolerances; on GPUs JAX's default float32 matmul
# precision is TF32 (about 1e-3 relative), so ask for full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def tiny_config(tmp_path: Path, **dotted) -> Config:
    """A model of a few thousand parameters on 300 kB of the embedded corpus."""
    raw = {
        "model": {"dim": 32, "heads": 2, "mlp_ratio": 2, "max_positions": 64, "dropout": 0.0,
                  "time_embed_dim": 8, "modulation_hidden": 16},
        "ode": {"solver": "euler", "steps": 2},
        "data": {"seq_len": 16, "max_bytes": 300_000, "cache_dir": str(tmp_path / "cache")},
        "train": {"run_name": "tiny", "runs_dir": str(tmp_path / "runs"), "steps": 30,
                  "batch_size": 4, "eval_every": 10, "eval_batches": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "log": {"every": 5, "progress": False, "tensorboard": False},
        "checkpoint": {"every": 10, "keep": 2},
        "generate": {"max_new_tokens": 8},
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
