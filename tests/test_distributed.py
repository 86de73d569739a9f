"""Multi-process training through ``jax.distributed`` on CPU (gloo collectives): two
``ode-lm train`` processes on this machine, one device each, against one process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ode_lm.config import ConfigError, load_config
from ode_lm.train import train
from ode_lm.train.checkpoint import list_checkpoints, read_checkpoint
from ode_lm.train.logging import read_metrics
from tests.conftest import REPO, tiny_config

STEPS = 60
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_pair(cfg: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return [subprocess.Popen([sys.executable, "-m", "ode_lm.cli", "train", str(cfg), *extra,
                              "train.distributed=true", f"train.coordinator_address=localhost:{port}",
                              "train.num_processes=2", f"train.process_id={i}"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        results.append((proc.returncode, out + err))
    return results


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train") if "lr" not in r]


def test_two_processes_train_stop_and_resume_like_one(tmp_path):
    """The pair's loss curve equals one process's; a SIGTERM to the non-lead process alone
    stops both at the same step with the lead's checkpoint; resuming both finishes the curve."""
    settings = {"train.steps": STEPS, "train.eval_every": 20, "train.eval_batches": 1,
                "checkpoint.every": 3}
    single = train(tiny_config(tmp_path / "single", **settings), say=lambda m: None)
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tmp_path, **settings).to_toml())
    run_dir = tmp_path / "runs" / "tiny"

    lead, other = procs = launch_pair(cfg)
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= 4 for r in read_metrics(run_dir)):
        assert lead.poll() is None and other.poll() is None, finish(procs)
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.01)
    other.send_signal(signal.SIGTERM)
    (rc_lead, out_lead), (rc_other, out_other) = finish(procs)
    assert rc_lead == rc_other == 128 + signal.SIGTERM, (out_lead, out_other)
    line = [ln for ln in out_lead.splitlines() if ln.startswith("interrupted at step")]
    assert len(line) == 1 and "Traceback" not in out_lead + out_other, out_lead
    step = int(line[0].split()[3].rstrip(";"))
    assert 4 <= step < STEPS and read_checkpoint(list_checkpoints(run_dir)[-1])[0].step == step
    assert "interrupted" not in out_other  # one voice: the lead's

    results = finish(launch_pair(cfg, "--resume"))
    assert [rc for rc, _ in results] == [0, 0], results
    (_, out_lead), (_, out_other) = results
    assert f"(step {step})" in out_lead and "done: 60 steps" in out_lead
    assert "done:" not in out_other and "sample" not in out_other
    np.testing.assert_allclose(losses(run_dir), losses(single.run_dir), rtol=1e-5, atol=1e-5)
    assert len(losses(run_dir)) == STEPS  # the lead alone wrote the metrics: no duplicate rows


@pytest.mark.parametrize("overrides, needle", [
    (["train.num_processes=2"], "set train.distributed = true"),
    (["train.distributed=true", "train.num_processes=2", "train.process_id=2"], "use 0 ... 1"),
])
def test_distributed_settings_are_checked(tmp_path, overrides, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tmp_path).to_toml())
    with pytest.raises(ConfigError, match=needle):
        load_config(str(cfg), overrides)


def test_distributed_without_a_cluster_or_coordinator_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tmp_path).to_toml())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    proc = subprocess.run([sys.executable, "-m", "ode_lm.cli", "train", str(cfg), "train.distributed=true"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.coordinator_address" in proc.stderr and "jax.distributed.initialize failed" in proc.stderr


@pytest.mark.slow
def test_two_processes_train_fsdp_with_sharded_orbax_checkpoints(tmp_path):
    """train.fsdp over two processes of one device each: each holds half of every matrix and
    writes its own slices of every orbax step; the losses are one process's, and a step saved
    by the pair resumes in one process."""
    pytest.importorskip("orbax.checkpoint")
    from ode_lm.train.orbax_checkpoint import list_orbax
    settings = {"train.steps": 20, "train.eval_every": 20, "train.eval_batches": 1, "checkpoint.every": 8,
                "checkpoint.keep": 3, "train.sample": True,
                "generate.max_new_tokens": 4}
    single = train(tiny_config(tmp_path / "single", **settings), say=lambda m: None)
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tmp_path, **settings).to_toml())
    run_dir = tmp_path / "runs" / "tiny"
    results = finish(launch_pair(cfg, "train.fsdp=true"))
    assert [rc for rc, _ in results] == [0, 0], results
    assert "checkpoints: orbax format; state sharded (fsdp) over 2 device(s)" in results[0][1]
    np.testing.assert_allclose(losses(run_dir), losses(single.run_dir), rtol=1e-5, atol=1e-5)
    steps = list_orbax(run_dir)
    assert [p.name for p in steps] == ["step_00000008", "step_00000016", "step_00000020"]
    assert {p.name for p in (steps[-1] / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}

    for later in steps[1:]:
        shutil.rmtree(later)
    train(tiny_config(tmp_path, **settings, **{"train.fsdp": True}), resume=True, say=lambda m: None)
    np.testing.assert_allclose(losses(run_dir), losses(single.run_dir), rtol=1e-5, atol=1e-5)
