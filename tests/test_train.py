import math

import jax
import numpy as np
import pytest

from ode_lm.config import config_from_toml
from ode_lm.errors import CheckpointError, RunDirError
from ode_lm.generate import training_sample
from ode_lm.train import TrainingError, load_run, train
from ode_lm.train.checkpoint import list_checkpoints, read_checkpoint
from ode_lm.train.logging import read_metrics
from tests.conftest import run_cli


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "train") if "lr" not in r]


def test_training_lowers_the_loss_and_writes_the_run(tiny):
    cfg = tiny(**{"train.steps": 40, "log.tensorboard": True})
    result = train(cfg, say=lambda m: None, sample=training_sample)
    losses = train_losses(result.run_dir)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert config_from_toml((result.run_dir / "config.toml").read_text(), "run") == cfg
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step_00000030.ckpt", "step_00000040.ckpt"]
    val = read_metrics(result.run_dir, "val")
    assert [r["step"] for r in val] == [10, 20, 30, 40]
    assert val[-1]["bits_per_byte"] == pytest.approx(val[-1]["loss"] / math.log(2))
    assert math.isfinite(result.evaluation.loss) and len(result.sample) > 0
    assert result.compilations == 1  # 40 steps, one compiled train step


def test_resume_continues_the_same_loss_curve(tiny):
    cfg = tiny(**{"train.steps": 20, "model.dropout": 0.1})
    straight = train(cfg, say=lambda m: None)
    reference = train_losses(straight.run_dir)
    # Lose the last checkpoint, as if the process died after step 10, then resume.
    list_checkpoints(straight.run_dir)[-1].unlink()
    resumed = train(cfg, resume=True, say=lambda m: None)
    assert train_losses(resumed.run_dir) == reference  # exactly, not approximately


def test_run_dir_is_never_silently_overwritten(tiny):
    cfg = tiny(**{"train.steps": 2})
    train(cfg, say=lambda m: None)
    with pytest.raises(RunDirError, match="--resume"):
        train(cfg, say=lambda m: None)
    train(cfg, overwrite=True, say=lambda m: None)


def test_resume_with_an_incompatible_config_is_refused(tiny):
    train(tiny(**{"train.steps": 10}), say=lambda m: None)
    with pytest.raises(CheckpointError, match="model.dim"):
        train(tiny(**{"train.steps": 20, "model.dim": 64}), resume=True, say=lambda m: None)


def test_corrupted_checkpoints_give_a_clear_error(tiny, tmp_path):
    result = train(tiny(**{"train.steps": 10}), say=lambda m: None)
    ckpt = list_checkpoints(result.run_dir)[-1]
    data = ckpt.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(truncated)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not an ode-lm checkpoint"):
        read_checkpoint(noise)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_run(tmp_path / "flipped.ckpt")
    # The intact one loads back into the same model.
    run = load_run(result.run_dir)
    assert run.step == 10 and run.config.model.dim == 32


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tiny):
    cfg = tiny(**{"train.steps": 30, "optim.lr": 1e8, "optim.warmup_steps": 0,
                  "optim.grad_clip": 1e12, "checkpoint.every": 1})
    with pytest.raises(TrainingError, match=r"step \d+: non-finite (loss|gradient norm).*Last good checkpoint: .*step_") as info:
        train(cfg, say=lambda m: None)
    # on_nonfinite = "stop" (the default) writes nothing for the failing step.
    failed = int(str(info.value).split()[1].rstrip(":"))
    run_dir = cfg.train.runs_dir + "/tiny"
    assert max(r["step"] for r in read_metrics(run_dir)) == failed - 1
    assert list_checkpoints(run_dir)[-1].name == f"step_{failed - 1:08d}.ckpt"
    assert str(list_checkpoints(run_dir)[-1]) in str(info.value)


def test_train_step_compiles_once(tiny):
    from ode_lm.data import BatchSampler, load_corpus
    from ode_lm.train.steps import TrainStep
    from ode_lm.train.trainer import init_state

    cfg = tiny()
    sampler = BatchSampler(load_corpus(cfg.data), 16, 4, 0)
    model, optimizer, opt_state = init_state(cfg, 256)
    step = TrainStep(optimizer, cfg.ode)
    for i in range(4):
        model, opt_state, _ = step(model, opt_state, *sampler.train_batch(i), jax.random.key(i))
    assert step.traces == 1


def test_the_train_step_returns_before_the_device_has_run_it(tiny):
    """The trainer queues step n + 1 before it reads step n's loss; that only keeps the
    device busy if a call returns once its step is queued, not once it has run."""
    from ode_lm.train.steps import TrainStep
    from ode_lm.train.trainer import init_state

    cfg = tiny(**{"model.dim": 128, "ode.steps": 8})
    tokens = jax.random.randint(jax.random.key(0), (32, 65), 0, 256)
    model, optimizer, opt_state = init_state(cfg, 256)
    step = TrainStep(optimizer, cfg.ode)
    model, opt_state, metrics = step(model, opt_state, tokens[:, :-1], tokens[:, 1:], jax.random.key(0))
    jax.block_until_ready(metrics)  # compiled and run once
    # Queue a chain of steps, each needing the last one's model: if a call waited for its
    # step, the last loss would be ready when the loop ends. Queueing a step takes the host
    # a fraction of what running it takes any device, so the chain is far from done.
    for i in range(1, 31):
        model, opt_state, metrics = step(model, opt_state, tokens[:, :-1], tokens[:, 1:], jax.random.key(i))
    assert not metrics["loss"].is_ready()
    assert np.isfinite(float(metrics["loss"])) and metrics["loss"].is_ready()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's GPU options: other compilers ignore them")
def test_compiler_options_leave_the_train_step_unchanged(tiny):
    """The train step's XLA options (steps.TRAIN_STEP_COMPILER_OPTIONS: on a GPU no dot merger,
    no zero-fill of the scan's residual stacks, CUDA graphs run as dependency graphs) change
    how the step compiles, not what it computes: three steps give the losses and parameters
    of XLA's defaults."""
    import equinox as eqx

    from ode_lm.train.steps import TrainStep
    from ode_lm.train.trainer import init_state

    cfg = tiny(**{"ode.steps": 4, "ode.checkpoint_saves": "matmuls"})
    tokens = jax.random.randint(jax.random.key(0), (3, 4, 17), 0, 256)

    def run(compiler_options):
        model, optimizer, opt_state = init_state(cfg, 256)
        step, losses = TrainStep(optimizer, cfg.ode, compiler_options=compiler_options), []
        for i, batch in enumerate(tokens):
            model, opt_state, metrics = step(model, opt_state, batch[:, :-1], batch[:, 1:], jax.random.key(i))
            losses.append(float(metrics["loss"]))
        return losses, eqx.filter(model, eqx.is_inexact_array)

    (tuned_losses, tuned), (default_losses, default) = run(None), run({})
    np.testing.assert_allclose(tuned_losses, default_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(default)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_cli_train_then_generate(tmp_path, tiny):
    cfg = tiny(**{"train.steps": 12})
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "val loss" in proc.stdout and "sample" in proc.stdout
    again = run_cli("train", str(path))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    run_dir = tmp_path / "runs" / "tiny"
    gen = run_cli("generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "10", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("def ")
    for bad in (["--prompt", ""], ["--prompt", "x", "--temperature", "-1"],
                ["--prompt", "x", "--max-new-tokens", "1000"]):
        proc = run_cli("generate", str(run_dir), *bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for ckpt in list_checkpoints(run_dir):
        ckpt.write_bytes(b"garbage")
    proc = run_cli("generate", str(run_dir), "--prompt", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no checkpoint" in proc.stderr
    proc = run_cli("generate", str(tmp_path / "nowhere"), "--prompt", "x")
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_the_end_of_training_sample_takes_the_generate_settings_and_reads_the_old_keys(tmp_path):
    """``[train] sample_*`` (config files, runs and overrides from before) read as the
    ``[generate]`` keys; a resolved config.toml keeps its own ``[generate]`` values, which
    ode-lm generate used."""
    from ode_lm.config import Config, config_from_dict, load_config

    old = load_config(None, ["train.sample_tokens=0", "train.sample_prompt=x"])
    assert not old.train.sample and old.generate.prompt == "x"
    path = tmp_path / "old.toml"
    path.write_text("[train]\nsample_tokens = 7\nsample_temperature = 0.5\n")
    assert load_config(path).generate == config_from_dict({"generate": {"max_new_tokens": 7,
                                                                        "temperature": 0.5}}).generate
    assert load_config(path, ["train.sample_tokens=3"]).generate.max_new_tokens == 3  # an override wins
    stored = (Config().to_toml().replace('prompt = "def "\n', "")  # no generate.prompt then
              .replace("[train]\n", '[train]\nsample_tokens = 8\nsample_prompt = "y"\n'))
    cfg = config_from_toml(stored, "config.toml")
    assert cfg.generate.prompt == "y" and cfg.generate.max_new_tokens == Config().generate.max_new_tokens
    assert cfg.train.sample
