"""FSDP (``train.fsdp``) and sharded orbax checkpoints on CPU devices: the same loss curve as
the replicated run, about 1/N of its state per device, and resumes that re-cut the state for
another device count, or survive a SIGKILL in the middle of an asynchronous save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ode_lm.config import ConfigError
from ode_lm.train import load_run, train
from ode_lm.train.checkpoint import all_checkpoints, newest_checkpoint
from ode_lm.train.logging import read_metrics
from ode_lm.train.orbax_checkpoint import list_orbax, orbax_dir
from ode_lm.train.sharding import describe_state_memory, planned_device_bytes, state_shapes
from tests.conftest import REPO, tiny_config

pytest.importorskip("orbax.checkpoint")

STEPS = 20
# Checkpoints at 8, 16 and 20 are all kept: a test removes the later ones to resume from 8.
SETTINGS = {"train.steps": STEPS, "train.eval_every": STEPS, "train.eval_batches": 1,
            "train.sample": False, "checkpoint.every": 8, "checkpoint.keep": 3}

# Two runs on N devices (the replicated one writes files, the FSDP one orbax directories),
# and the per-device bytes of their state: resident shards and XLA's compiled step.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    from tests.conftest import tiny_config
    from ode_lm.train import train
    from ode_lm.train.logging import read_metrics
    from ode_lm.train.parallel import DataParallel
    from ode_lm.train.sharding import device_bytes, place, planned_device_bytes
    from ode_lm.train.steps import TrainStep, peak_bytes
    from ode_lm.train.trainer import init_state
    root, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
    out = {"devices": jax.device_count()}
    for fsdp in (False, True):
        cfg = tiny_config(root, **settings, **{"train.fsdp": fsdp, "train.run_name": f"fsdp_{fsdp}"})
        run = train(cfg, say=lambda m: None)
        out[f"loss_{fsdp}"] = [r["loss"] for r in read_metrics(run.run_dir, "train") if "lr" not in r]
        model, optimizer, opt_state = init_state(cfg, 256)
        parallel = DataParallel(cfg)
        shardings = parallel.state_shardings((model, opt_state))
        model, opt_state = place((model, opt_state), shardings)
        out[f"resident_{fsdp}"] = device_bytes((model, opt_state))
        out[f"planned_{fsdp}"] = planned_device_bytes((model, opt_state), 2, fsdp)
        step = TrainStep(optimizer, cfg.ode, state_shardings=shardings if fsdp else None)
        batch = [parallel.batch(jax.numpy.zeros((cfg.train.batch_size, cfg.data.seq_len), "int32"))] * 2
        analysis = step.compiled(model, opt_state, *batch, jax.random.key(0)).memory_analysis()
        out[f"compiled_{fsdp}"] = int(analysis.argument_size_in_bytes)
        out[f"peak_{fsdp}"] = peak_bytes(analysis)
    print(json.dumps(out))
""")


def run_on_devices(devices: int, code: str, *args: str) -> str:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train") if "lr" not in r]


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    out = json.loads(run_on_devices(2, SCRIPT, str(root), json.dumps(SETTINGS)))
    assert out["devices"] == 2
    return root, out


def copy_run_at_step_8(root: Path, name: str, to: Path) -> Path:
    """``root``'s run ``name`` as it was when step 8 had been saved (later checkpoints removed)."""
    run = to / "runs" / "tiny"
    shutil.copytree(root / "runs" / name, run)
    for later in all_checkpoints(run):
        if int(later.name[5:13]) > 8:
            shutil.rmtree(later) if later.is_dir() else later.unlink()
    return run


def test_fsdp_gives_the_replicated_loss_curve_with_half_the_state_per_device(two_devices):
    _, out = two_devices
    np.testing.assert_allclose(out["loss_True"], out["loss_False"], rtol=1e-5)
    assert len(out["loss_True"]) == STEPS
    # The tiny model's matrices hold 96% of its parameters; vectors and scalars stay whole.
    for kind in ("resident", "compiled"):
        ratio = out[f"{kind}_True"] / out[f"{kind}_False"]
        assert 0.5 <= ratio < 0.55, (kind, out)
    # The whole step too: the gathered weights and whole gradient are temporaries, and the
    # weight gradients are not computed from gathered activations.
    assert out["peak_True"] < 0.9 * out["peak_False"], out
    # What ``ode-lm info`` plans from shapes alone is what the devices hold.
    assert (out["planned_True"], out["planned_False"]) == (out["resident_True"], out["resident_False"])


def resume_at_step_8_as_fsdp(root: Path, name: str, to: Path, expected: list[float]) -> Path:
    run = copy_run_at_step_8(root, name, to)
    assert newest_checkpoint(run).step == 8
    train(tiny_config(to, **SETTINGS, **{"train.fsdp": True}), resume=True, say=lambda m: None)
    np.testing.assert_allclose(losses(run), expected, rtol=1e-5)
    assert [p.name for p in list_orbax(run)][-1] == "step_00000020"
    return run


def test_fsdp_run_saves_orbax_steps_and_resumes_resharded_on_one_device(two_devices, tmp_path):
    """Saved on 2 devices (sharded, orbax), continued on 1 with the uninterrupted run's losses;
    generate's loader reads the orbax step as the replicated run's file."""
    root, out = two_devices
    sharded = root / "runs" / "fsdp_True"
    assert [p.name for p in list_orbax(sharded)] == ["step_00000008", "step_00000016", "step_00000020"]
    assert not list(orbax_dir(sharded).glob("*tmp*"))
    loaded = load_run(sharded)  # what generate and ablate --eval-only read
    assert loaded.step == STEPS and loaded.checkpoint == orbax_dir(sharded) / "step_00000020"
    from_file = load_run(root / "runs" / "fsdp_False")  # the replicated run: the same weights
    assert from_file.checkpoint.name == "step_00000020.ckpt"
    for a, b in zip(jax.tree.leaves(loaded.model), jax.tree.leaves(from_file.model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    resume_at_step_8_as_fsdp(root, "fsdp_True", tmp_path, out["loss_False"])


@pytest.mark.slow
def test_a_replicated_runs_checkpoint_file_continues_as_an_fsdp_run(two_devices, tmp_path):
    root, out = two_devices
    run = resume_at_step_8_as_fsdp(root, "fsdp_False", tmp_path, out["loss_False"])
    assert [p.name for p in all_checkpoints(run)][0] == "step_00000008.ckpt"  # files stay readable


@pytest.mark.slow
def test_orbax_checkpoint_of_two_devices_resumes_on_four(two_devices, tmp_path):
    root, out = two_devices
    run = copy_run_at_step_8(root, "fsdp_True", tmp_path)
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from tests.conftest import tiny_config
        from ode_lm.train import train
        from ode_lm.train.logging import read_metrics
        cfg = tiny_config(Path(sys.argv[1]), **json.loads(sys.argv[2]), **{"train.fsdp": True})
        run = train(cfg, resume=True, say=lambda m: None)
        print(json.dumps([r["loss"] for r in read_metrics(run.run_dir, "train") if "lr" not in r]))
    """)
    continued = json.loads(run_on_devices(4, code, str(tmp_path), json.dumps(SETTINGS)))
    np.testing.assert_allclose(continued, out["loss_False"], rtol=1e-5)
    assert losses(run) == continued


@pytest.mark.slow
def train_until_a_save_is_in_flight(tmp_path: Path):
    """Start an FSDP orbax run saving after every step; return ``(cfg, run, proc, step)`` once
    a temporary step directory (a save in flight) exists for ``step`` >= 3."""
    settings = {**SETTINGS, "checkpoint.every": 1, "checkpoint.keep": 50, "train.fsdp": True}
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tmp_path, **settings).to_toml())
    run = tmp_path / "runs" / "tiny"
    saves = orbax_dir(run)
    proc = subprocess.Popen([sys.executable, "-m", "ode_lm.cli", "train", str(cfg)], cwd=REPO, env=CPU_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, cut = time.monotonic() + 300, []
    while not cut:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no save in flight was seen"
        cut = [p for p in saves.glob("step_*.orbax-checkpoint-tmp*")] if saves.is_dir() else []
        if cut and int(cut[0].name[5:13]) < 3:
            cut = []  # leave a complete step or two before it
    return cfg, run, proc, int(cut[0].name[5:13])


def resume_and_compare(cfg: Path, run: Path, step: int, uninterrupted: list[float]) -> None:
    result = subprocess.run([sys.executable, "-m", "ode_lm.cli", "train", str(cfg), "--resume"], cwd=REPO,
                            env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {step})" in result.stdout
    np.testing.assert_allclose(losses(run), uninterrupted, rtol=1e-5)
    assert not list(orbax_dir(run).glob("*tmp*"))  # no temporary is left behind


CPU_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def test_sigkill_during_an_async_save_resumes_from_the_previous_complete_step(two_devices, tmp_path):
    """A save after every step keeps one in flight most of the time; SIGKILL the trainer
    while a temporary step directory exists, then resume: the killed save is not used."""
    _, out = two_devices
    cfg, run, proc, killed = train_until_a_save_is_in_flight(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    complete = [int(p.name[5:]) for p in list_orbax(run)]
    assert killed not in complete and max(complete) == killed - 1, (killed, complete)
    assert newest_checkpoint(run).step == killed - 1
    resume_and_compare(cfg, run, killed - 1, out["loss_False"])  # the writer removes the temporary


def test_sigterm_during_an_async_save_finishes_it_and_saves_the_step_it_stopped_at(two_devices, tmp_path):
    """SIGTERM while a save is in flight: the trainer finishes the step, waits for the save,
    saves the step it stopped at and exits with 128 + SIGTERM; the resumed run continues the
    uninterrupted loss curve from that step."""
    _, out = two_devices
    cfg, run, proc, in_flight = train_until_a_save_is_in_flight(tmp_path)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    complete = [int(p.name[5:]) for p in list_orbax(run)]
    stopped = newest_checkpoint(run).step
    assert in_flight in complete and stopped >= in_flight and complete[-1] == stopped, (in_flight, complete)
    assert "Traceback" not in stderr
    resume_and_compare(cfg, run, stopped, out["loss_False"])


def test_info_plans_a_quarter_of_the_state_per_device_on_four(tmp_path):
    cfg = tiny_config(tmp_path)
    model, opt_state = state_shapes(cfg, 256)
    parameters = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))
    replicated = planned_device_bytes((model, opt_state), 4, fsdp=False)
    sharded = planned_device_bytes((model, opt_state), 4, fsdp=True)
    assert abs(replicated - 3 * parameters) <= 64  # parameters and Adam's two moments, + the count
    assert 0.25 < sharded / replicated < 0.3  # vectors stay whole on every device
    report = describe_state_memory(cfg, 256, devices=4)
    assert "mesh of 4 device(s)" in report and "train.fsdp = false: replicated" in report


def test_fsdp_needs_data_parallel(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.fsdp": True, "train.data_parallel": False})
    with pytest.raises(ConfigError, match="needs train.data_parallel = true"):
        train(cfg, say=lambda m: None)


def test_an_orbax_run_named_relative_to_the_working_directory_loads(tmp_path, monkeypatch):
    """`ode-lm generate runs/<name>`: orbax wants absolute directories, ode-lm takes the path
    as the user typed it, for saving and for loading."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, **{"train.runs_dir": "runs", "train.steps": 2, "train.eval_every": 2,
                                   "checkpoint.every": 2, "checkpoint.format": "orbax", "train.sample": False})
    train(cfg, say=lambda m: None)
    assert [p.name for p in list_orbax(Path("runs/tiny"))] == ["step_00000002"]
    relative, absolute = (load_run(p, warn=lambda m: None) for p in ("runs/tiny", tmp_path / "runs" / "tiny"))
    assert relative.step == absolute.step == 2
    for a, b in zip(jax.tree.leaves(relative.model), jax.tree.leaves(absolute.model)):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_orbax_step_stops_generate_with_one_line(tmp_path):
    """An intact orbax run generates without orbax's notices on the terminal; one whose
    arrays were overwritten stops with exit status 2 and one line naming the step, none of
    the errors of the reads orbax leaves behind."""
    from tests.conftest import run_cli

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.eval_every": 2, "checkpoint.every": 2,
                                   "checkpoint.format": "orbax", "train.sample": False})
    train(cfg, say=lambda m: None)
    run_dir = Path(cfg.train.runs_dir) / cfg.train.run_name
    args = ("generate", str(run_dir), "--prompt", "ab", "--max-new-tokens", "2")
    intact = run_cli(*args)
    assert intact.returncode == 0, intact.stderr
    assert "absl" not in intact.stderr and "Traceback" not in intact.stderr
    (step,) = list_orbax(run_dir)
    chunks = [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(os.urandom(64))
    damaged = run_cli(*args)
    assert damaged.returncode == 2
    assert damaged.stderr.strip().splitlines() == [damaged.stderr.strip()], damaged.stderr[-2000:]
    assert damaged.stderr.startswith("ode-lm: error: ") and step.name in damaged.stderr
