"""Faults, interruptions and bad input, with real processes where it matters.

The subprocess tests run ``python -m ode_lm.cli train`` on one tiny config and compare every
interrupted-then-resumed run's ``metrics.jsonl`` with one uninterrupted reference run (made
once per module). The processes share a JAX compilation cache so that each one costs a few
seconds of start-up rather than a full compile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ode_lm.config import SECTIONS, Config, ConfigError, config_from_dict, config_from_toml, load_config
from ode_lm.errors import RunDirError
from ode_lm.train import TrainingError, train
from ode_lm.train.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from ode_lm.train.logging import read_metrics
from tests.conftest import REPO, tiny_config

STEPS = 60
TIMEOUT = 240  # seconds any one process may take on a loaded 2-core machine


@dataclasses.dataclass
class Reference:
    config: Path  # the TOML file every process trains from
    root: Path
    run_dir: Path
    metrics: list[dict]


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock fields (throughput, time in train steps)."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_s")} for r in rows]


# Signals as in an interactive terminal: a shell starts background jobs (a CI runner's, say)
# with SIGINT ignored, and ode-lm deliberately leaves an ignored signal ignored.
SIGINT_AS_IN_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def launch(cfg_path: Path, runs_dir: Path, *extra: str, max_file_bytes: int | None = None) -> subprocess.Popen:
    """``ode-lm train`` in a child process; ``max_file_bytes``: no file it writes may grow past
    that (writes fail with EFBIG), set by the child itself (a ``preexec_fn`` would fork the
    multi-threaded test process)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(cfg_path.parent / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    limit = "" if max_file_bytes is None else (
        "import resource; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes}))\n")
    entry = (SIGINT_AS_IN_A_TERMINAL + limit + "import runpy, sys\n"
             "sys.argv[0] = 'ode-lm'; runpy.run_module('ode_lm.cli', run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", entry, "train", str(cfg_path),
                             f"train.runs_dir={runs_dir}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out + err


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Block until ``metrics.jsonl`` shows ``step`` (the loop is running)."""
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= step for r in read_metrics(run_dir)):
        assert proc.poll() is None, f"exited early: {finish(proc)[1]}"
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.01)


def resume(ref: Reference, runs_dir: Path) -> str:
    rc, output = finish(launch(ref.config, runs_dir, "--resume"))
    assert rc == 0, output
    assert comparable(read_metrics(runs_dir / "tiny")) == comparable(ref.metrics)
    assert not list((runs_dir / "tiny" / "checkpoints").glob(".*.tmp-*"))
    return output


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reliability")
    cfg = tiny_config(root, **{"train.steps": STEPS, "train.eval_every": 20, "train.eval_batches": 1,
                               "train.sample": False, "checkpoint.every": 3, "model.dropout": 0.1})
    path = root / "tiny.toml"
    path.write_text(cfg.to_toml())
    runs = root / "reference"
    rc, output = finish(launch(path, runs))
    assert rc == 0, output
    return Reference(path, root, runs / "tiny", read_metrics(runs / "tiny"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(ref, sig, tmp_path):
    proc = launch(ref.config, tmp_path)
    wait_for_step(proc, tmp_path / "tiny", 4)
    proc.send_signal(sig)
    rc, output = finish(proc)
    assert rc == 128 + sig, output
    line = [ln for ln in output.splitlines() if ln.startswith("interrupted at step")]
    assert len(line) == 1 and "--resume" in line[0] and "Traceback" not in output, output
    step = int(line[0].split()[3].rstrip(";"))
    assert 4 <= step < STEPS
    ckpt = list_checkpoints(tmp_path / "tiny")[-1]
    assert f"checkpoint saved to {ckpt}" in line[0]
    assert read_checkpoint(ckpt)[0].step == step
    if sig == signal.SIGINT:  # one resume suffices: both signals take the same path
        assert f"continuing from {ckpt} (step {step})" in resume(ref, tmp_path)
    else:
        assert comparable(read_metrics(tmp_path / "tiny")) == [
            r for r in comparable(ref.metrics) if r["step"] <= step]


def wait_for_stderr(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    while not lines or text not in lines[-1]:
        lines.append(proc.stderr.readline())
        assert lines[-1], f"no {text!r} in {''.join(lines)}"
    return lines


def test_a_second_sigint_quits_at_once_even_inside_a_long_step(tmp_path):
    """The main thread sleeps through a 60 s "step" and never looks at the flag: only the
    watcher thread can end the process, and it must do so on the second signal."""
    script = (SIGINT_AS_IN_A_TERMINAL + "import time\nfrom ode_lm.train.interrupts import InterruptGuard\n"
              "InterruptGuard().install()\nprint('ready', file=__import__('sys').stderr, flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for_stderr(proc, "ready")
    proc.send_signal(signal.SIGINT)
    wait_for_stderr(proc, "received SIGINT: finishing the current step")
    assert proc.poll() is None  # the first signal only asks
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130 and "quitting now" in err and time.monotonic() - t0 < 5


def test_a_second_sigint_during_training_leaves_readable_checkpoints(ref, tmp_path):
    proc = launch(ref.config, tmp_path)
    wait_for_step(proc, tmp_path / "tiny", 4)  # past the first periodic checkpoint (step 3)
    proc.send_signal(signal.SIGINT)
    wait_for_stderr(proc, "received SIGINT")
    proc.send_signal(signal.SIGINT)
    rc, output = finish(proc)
    # Quit at once ("quitting now": 130), or the clean stop won the race and the second signal
    # ended the exiting process (-SIGINT); either way no traceback and no torn checkpoint.
    assert rc in (130, -signal.SIGINT) and "Traceback" not in output, output
    found = latest_checkpoint(tmp_path / "tiny", warn=pytest.fail)
    assert found is not None and all(read_checkpoint(p) for p in list_checkpoints(tmp_path / "tiny"))


def sigkill_trials(ref: Reference, tmp_path: Path, trials: int) -> int:
    """SIGKILL at a random moment, then resume; returns how many kills landed before the end.

    The moment: one trial in four during start-up (a random delay after launch), the others
    a random 0-30 ms after a random training step was logged, which lands in a step, an
    evaluation, a log write or a checkpoint write (every third step writes one).
    """
    rng = random.Random(trials)
    killed = 0
    for trial in range(trials):
        runs = tmp_path / f"trial{trial}"
        proc = launch(ref.config, runs)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.2, 3.0))
        else:
            wait_for_step(proc, runs / "tiny", rng.randint(1, STEPS - 20))
            time.sleep(rng.uniform(0.0, 0.03))
        proc.kill()
        rc, _ = finish(proc)
        killed += rc == -signal.SIGKILL
        output = resume(ref, runs)  # also fine when killed before the run directory existed
        print(f"kill trial {trial}: exit {rc}; " + next(
            (ln for ln in output.splitlines() if ln.startswith("resume:")), "no resume line"))
    return killed


def test_sigkill_at_random_moments_then_resume(ref, tmp_path):
    assert sigkill_trials(ref, tmp_path, 2) == 2


@pytest.mark.slow
def test_sigkill_ten_trials(ref, tmp_path):
    assert sigkill_trials(ref, tmp_path, 10) == 10


def test_kill_mid_write_leftovers_are_ignored_and_cleaned(ref, tmp_path):
    """What SIGKILL during a checkpoint or log write leaves: a temporary file, a torn file
    under a final name (only possible outside ode-lm's own writes), a torn log line."""
    run = tmp_path / "tiny"
    shutil.copytree(ref.run_dir, run)
    newest, older = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    data = newest.read_bytes()
    (run / "checkpoints" / f".{newest.name}.tmp-999999").write_bytes(data[:1000])
    newest.write_bytes(data[: len(data) // 2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 99')
    notes = []
    path, header, _ = latest_checkpoint(run, warn=notes.append, set_aside=True)
    assert path == older and "truncated or corrupted" in notes[0] and ".corrupt" in notes[0]
    assert (run / "checkpoints" / (newest.name + ".corrupt")).exists()
    assert read_metrics(run) == ref.metrics  # the torn line is skipped
    from ode_lm.train.logging import MetricsLog

    MetricsLog(run, False).truncate_after(header.step)
    assert read_metrics(run) == [r for r in ref.metrics if r["step"] <= header.step]


def test_full_disk_during_a_checkpoint_fails_loudly_and_keeps_the_previous_one(ref, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(ref.run_dir, run)
    list_checkpoints(run)[-1].unlink()
    previous = list_checkpoints(run)[-1]
    before = previous.read_bytes()
    size = len(before)

    # Files may not grow past half a checkpoint.
    rc, output = finish(launch(ref.config, tmp_path, "--resume", max_file_bytes=size // 2))
    assert rc == 2 and "Traceback" not in output, output
    assert "could not write checkpoint" in output and f"{previous} is kept" in output
    assert list_checkpoints(run) == [previous] and previous.read_bytes() == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == [previous.name]  # no temp files


def test_unreadable_checkpoints_refuse_to_resume_with_exit_2(ref, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(ref.run_dir, run)
    newest, older = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    newest.write_bytes(newest.read_bytes()[:-100])
    older.write_bytes(np.random.default_rng(0).bytes(5000))
    rc, output = finish(launch(ref.config, tmp_path, "--resume"))
    assert rc == 2 and "Traceback" not in output, output
    assert "truncated or corrupted" in output and "not an ode-lm checkpoint" in output
    assert "none of the 2 checkpoints" in output
    assert list_checkpoints(run) == [older, newest]  # nothing renamed or deleted


def test_unwritable_run_directory_is_a_clear_error(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="cannot create run directory"):
        train(tiny(**{"train.runs_dir": str(blocker)}), say=lambda m: None)
    if os.geteuid() != 0:  # root ignores permission bits
        runs = tmp_path / "ro"
        runs.mkdir()
        runs.chmod(0o500)
        try:
            with pytest.raises(RunDirError, match="run directory"):
                train(tiny(**{"train.runs_dir": str(runs)}), say=lambda m: None)
        finally:
            runs.chmod(0o700)


# ---- numerical faults ----------------------------------------------------------------------


def test_a_non_finite_step_leaves_model_and_optimizer_unchanged(tiny):
    from ode_lm.data import BatchSampler, load_corpus
    from ode_lm.train.steps import TrainStep
    from ode_lm.train.trainer import init_state

    cfg = tiny()
    batch = BatchSampler(load_corpus(cfg.data), 16, 4, 0).train_batch(0)
    model, optimizer, opt_state = init_state(cfg, 256)
    step = TrainStep(optimizer, cfg.ode)
    leaves, treedef = jax.tree.flatten(model)
    first = next(i for i, leaf in enumerate(leaves) if eqx.is_inexact_array(leaf))
    leaves[first] = leaves[first].at[0].set(jnp.nan)  # one NaN weight: NaN loss and gradients
    poisoned = jax.tree.unflatten(treedef, leaves)
    for m, finite in ((model, True), (poisoned, False)):
        new_model, new_opt, metrics = step(m, opt_state, *batch, jax.random.key(0))
        assert bool(metrics["finite"]) is finite
        same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b, equal_nan=True)),
                            eqx.filter((new_model, new_opt), eqx.is_array),
                            eqx.filter((m, opt_state), eqx.is_array))
        assert all(jax.tree.leaves(same)) is not finite
    assert step.traces == 1


def test_on_nonfinite_skip_keeps_training_and_counts_skips(tiny):
    cfg = tiny(**{"train.steps": 12, "optim.lr": 1e8, "optim.warmup_steps": 0, "optim.grad_clip": 1e12,
                  "train.on_nonfinite": "skip", "checkpoint.every": 4, "train.sample": False})
    notes = []
    result = train(cfg, say=notes.append)
    rows = [r for r in read_metrics(result.run_dir, "train") if "lr" not in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    skipped = [r for r in rows if "skipped_steps" in r]
    assert 0 < result.skipped_steps == len(skipped) == skipped[-1]["skipped_steps"]
    from ode_lm.train.run import load_run

    params = jax.tree.leaves(eqx.filter(load_run(result.run_dir).model, eqx.is_inexact_array))
    assert all(bool(jnp.isfinite(p).all()) for p in params)  # no NaN update ever applied


@pytest.mark.slow  # compiles an adaptive train step; the failed flag itself is tested in test_ode
def test_adaptive_solve_hitting_max_steps_names_the_option(tiny):
    cfg = tiny(**{"train.steps": 2, "ode.solver": "heun", "ode.adaptive": True, "ode.rtol": 1e-12,
                  "ode.atol": 1e-12, "ode.max_steps": 2})
    with pytest.raises(TrainingError, match=r"step 1: .*ode.max_steps = 2.*ode.rtol = 1e-12"):
        train(cfg, say=lambda m: None)


# ---- config loader fuzzing -----------------------------------------------------------------

KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80), st.floats(),
                   st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3), st.dates(),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
NAMES = st.one_of(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})), st.text(max_size=8))
SECTION_NAMES = st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8))
DEFAULTS = Config().to_dict()


@st.composite
def near_valid(draw):
    """The default config with a few values replaced: reaches the range and consistency checks."""
    raw = {s: dict(v) for s, v in DEFAULTS.items()}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(list(KEYS)))
        key = draw(st.sampled_from(KEYS[section]))
        raw[section][key] = draw(same_type(DEFAULTS[section][key]) if draw(st.integers(0, 3)) else VALUES)
    return raw


def same_type(like):
    if isinstance(like, bool):
        return st.booleans()
    if isinstance(like, int):
        return st.integers(-2, 600)
    if isinstance(like, float):
        return st.floats(-0.5, 2)
    if isinstance(like, tuple):
        return st.lists(st.text(max_size=6), max_size=2)
    return st.text(max_size=8)


RAW = st.one_of(near_valid(), st.dictionaries(SECTION_NAMES, st.one_of(st.dictionaries(NAMES, VALUES, max_size=6),
                                                                      VALUES), max_size=5))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _toml_scalar(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are mostly valid TOML; the rest must fail cleanly
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_scalar(x)}" for k, x in v.items()) + "}"
    return "nan" if v != v else str(v)


TOML_DOCS = st.one_of(
    st.text(max_size=200),
    near_valid().map(lambda raw: "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {_toml_scalar(v)}" for k, v in kv.items())
                                          for s, kv in raw.items())),
    st.lists(st.tuples(SECTION_NAMES, NAMES, VALUES), max_size=8).map(
        lambda items: "\n".join(f"[{json.dumps(s)}]\n{json.dumps(k)} = {_toml_scalar(v)}"
                                for s, k, v in items)),
    st.lists(st.tuples(st.sampled_from(list(SECTIONS)), NAMES, VALUES), max_size=6).map(
        lambda items: "\n".join(f"{s}.{k} = {_toml_scalar(v)}" for s, k, v in items)),
)


def _config_or_config_error(load) -> Config | None:
    try:
        config = load()
    except ConfigError:
        event("ConfigError")
        return None
    event("Config")
    assert isinstance(config, Config)
    assert config_from_toml(config.to_toml(), "round trip") == config  # what runs write back
    return config


@FUZZ
@given(RAW)
def test_fuzz_config_from_any_dict(raw):
    _config_or_config_error(lambda: config_from_dict(raw, "fuzz"))


@FUZZ
@given(TOML_DOCS)
def test_fuzz_config_from_any_toml_text(text):
    _config_or_config_error(lambda: config_from_toml(text, "fuzz.toml"))


@FUZZ
@given(st.one_of(st.text(max_size=40), st.sampled_from(list(KEYS)).flatmap(
    lambda s: st.tuples(st.just(s), st.sampled_from(KEYS[s]), st.one_of(st.text(max_size=10), VALUES)))
    .map(lambda t: f"{t[0]}.{t[1]}={t[2] if isinstance(t[2], str) else _toml_scalar(t[2])}")))
def test_fuzz_command_line_overrides(item):
    _config_or_config_error(lambda: load_config(None, [item]))


def test_loader_fixes_found_by_fuzzing(tmp_path):
    for raw, needle in (({"optim": {"lr": 10**400}}, "finite"), ({"optim": {"lr": float("inf")}}, "finite"),
                        ({"train": {"seed": 2**64}}, "<= 4294967295"),
                        ({"train": {"run_name": "\ud800"}}, "UTF-8")):
        with pytest.raises(ConfigError, match=needle):
            config_from_dict(raw)
    with pytest.raises(ConfigError, match="nested too deeply"):
        config_from_toml("a = " + "[" * 50_000, "deep.toml")
    cfg = config_from_dict({"generate": {"prompt": 'a\x01\t"\\\x7fz'}, "data": {"paths": ["x\x00"]}})
    assert config_from_toml(cfg.to_toml(), "rt") == cfg
    assert tomllib.loads(cfg.to_toml())["generate"]["prompt"] == 'a\x01\t"\\\x7fz'


# ---- run directories: names, locks, --overwrite, signals before the first step, resources --


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (a run directory, compared before and after)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "../x", "x/..", "a\\b", "a\nb", "a\x00b", "x" * 256])
def test_run_names_that_are_not_one_plain_directory_are_refused(name):
    with pytest.raises(ConfigError, match=r"\[train\] run_name = .* plain directory name"):
        config_from_dict({"train": {"run_name": name}})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20), st.lists(st.sampled_from(["..", ".", "/", "a", "\\", "~", " ", "\x00"]),
                                                  max_size=6).map("".join)))
def test_no_accepted_run_name_resolves_outside_runs_dir(name):
    try:
        cfg = config_from_dict({"train": {"run_name": name, "runs_dir": "/srv/runs"}})
    except ConfigError:
        event("refused")
        return
    event("accepted")
    runs = Path("/srv/runs").resolve()
    run_dir = (runs / cfg.train.run_name).resolve()
    assert run_dir.parent == runs and run_dir != runs


def test_output_directories_must_end_in_a_plain_name_and_be_ode_lms_own(tmp_path):
    from ode_lm.errors import UserError
    from ode_lm.paths import OUTPUT_MARKER, check_output_dir, prepare_output_dir

    (tmp_path / "file").write_text("x")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.md").write_text("mine")
    for bad, needle in ((".", "plain directory name"), (str(tmp_path / ".."), "plain directory name"),
                        ("/", "plain directory name"), ("", "empty"), (str(tmp_path / "file"), "existing file"),
                        (str(tmp_path / "home"), "not an ode-lm output")):
        with pytest.raises(UserError, match=needle):
            check_output_dir(bad, "--out")
    out = prepare_output_dir(tmp_path / "new" / "abl", "--out")
    (out / "report.md").write_text("an earlier report")
    assert (out / OUTPUT_MARKER).exists() and check_output_dir(out, "--out") == out
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.jsonl").write_text("")
    assert check_output_dir(legacy, "--out", markers=("results.jsonl",)) == legacy


def test_ablation_out_is_checked_before_anything_runs(tmp_path):
    from ode_lm.ablate import load_ablation
    from ode_lm.errors import UserError

    base = tmp_path / "base.toml"
    base.write_text(tiny_config(tmp_path).to_toml())
    spec = tmp_path / "abl.toml"
    spec.write_text(f'base = "{base}"\n[grid]\n"ode.steps" = [1, 2]\n')
    with pytest.raises(UserError, match="plain directory name"):
        load_ablation(spec, out=".")
    with pytest.raises(UserError, match="not an ode-lm output"):
        load_ablation(spec, out=str(REPO))


def test_a_run_name_that_is_an_existing_file_is_one_clear_error(tiny, tmp_path):
    cfg = tiny()
    Path(cfg.train.runs_dir).mkdir(parents=True)
    (Path(cfg.train.runs_dir) / "tiny").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="is an existing file"):
            train(cfg, overwrite=overwrite, say=lambda m: None)
    assert (Path(cfg.train.runs_dir) / "tiny").read_text() == "my notes"
    assert sorted(p.name for p in Path(cfg.train.runs_dir).iterdir()) == ["tiny"]  # no lock left


def test_overwrite_with_a_bad_data_path_leaves_the_old_run_intact(ref, tmp_path):
    from ode_lm.errors import DataError

    run = tmp_path / "tiny"
    shutil.copytree(ref.run_dir, run)
    before = tree(run)
    cfg = load_config(ref.config, [f"train.runs_dir={tmp_path}", 'data.paths=["/no/such/corpus.txt"]',
                                   "data.source=text"])
    with pytest.raises(DataError, match="/no/such/corpus.txt"):
        train(cfg, overwrite=True, say=lambda m: None)
    assert tree(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


@pytest.mark.slow  # trains in this process; test_train covers --overwrite's result, the test below its timing
def test_overwrite_replaces_the_old_run_only_after_the_first_step(ref, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(ref.run_dir, run)
    cfg = load_config(ref.config, [f"train.runs_dir={tmp_path}", "train.steps=4", "checkpoint.every=2"])
    result = train(cfg, overwrite=True, say=lambda m: None)
    assert [r["step"] for r in read_metrics(run, "train") if "lr" not in r] == [1, 2, 3, 4]
    assert [read_checkpoint(p)[0].step for p in list_checkpoints(run)] == [2, 4] and result.run_dir == run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no lock, nothing moved aside


def test_a_second_trainer_is_refused_naming_the_first_ones_pid(ref, tmp_path):
    """A real trainer holds the run; a second one (this process) is refused at once, and the
    first one's metrics are not duplicated."""
    proc = launch(ref.config, tmp_path, "train.steps=100000", "checkpoint.every=1000")
    try:
        wait_for_step(proc, tmp_path / "tiny", 2)
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            t0 = time.monotonic()
            with pytest.raises(RunDirError, match=f"in use by another ode-lm train \\(PID {proc.pid}"):
                train(load_config(ref.config, [f"train.runs_dir={tmp_path}"]), say=lambda m: None, **flags)
            assert time.monotonic() - t0 < 30
    finally:
        proc.send_signal(signal.SIGINT)
        rc, output = finish(proc)
    assert rc == 130, output
    steps = [r["step"] for r in read_metrics(tmp_path / "tiny", "train") if "lr" not in r]
    assert steps == list(range(1, len(steps) + 1))  # one row per step, none twice
    assert not (tmp_path / ".tiny.lock").exists()


def sigint_after(ref: Reference, runs: Path, delay: float, *extra: str) -> tuple[int, str]:
    proc = launch(ref.config, runs, "train.steps=100000", "checkpoint.every=1000", *extra)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    return finish(proc)


def check_stopped_by_sigint(rc: int, output: str, runs: Path) -> str:
    """Exit 130 and one line; before the first step nothing is left, after it a checkpoint."""
    assert rc == 130 and "Traceback" not in output and "Exception ignored" not in output, output
    early = [ln for ln in output.splitlines() if "before the first training step; nothing was written" in ln]
    late = [ln for ln in output.splitlines() if ln.startswith("interrupted at step")]
    assert len(early) + len(late) == 1, output
    if early:
        assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
        return "before the first step"
    found = latest_checkpoint(runs / "tiny", warn=pytest.fail)
    assert found is not None and found[1].step < 100000
    return "in the training loop"


def test_sigint_in_the_first_second_stops_before_the_first_step(ref, tmp_path):
    runs = tmp_path / "runs"
    assert check_stopped_by_sigint(*sigint_after(ref, runs, 1.0), runs) == "before the first step"
    shutil.copytree(ref.run_dir, runs / "tiny")  # --overwrite: the old run stays as it was
    before = tree(runs)
    rc, output = sigint_after(ref, runs, 1.0, "--overwrite")
    assert rc == 130 and "nothing was written" in output and tree(runs) == before, output


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 2.0, 5.0])
def test_sigint_at_any_moment_of_start_up_exits_130(ref, tmp_path, delay):
    runs = tmp_path / "runs"
    check_stopped_by_sigint(*sigint_after(ref, runs, delay), runs)


def test_resource_check_refuses_without_building_or_compiling_anything(tiny, monkeypatch):
    from ode_lm.train import trainer
    from ode_lm.train.resources import ResourceError

    def never(*args, **kwargs):
        raise AssertionError("the model was built or the step compiled before the check")
    monkeypatch.setattr(trainer, "init_state", never)
    monkeypatch.setattr(trainer, "build_train_step", never)
    for dotted, needle in (({"train.batch_size": 10**7}, "lower train.batch_size"),
                           ({"model.max_positions": 10**9}, "lower model.max_positions"),
                           ({"model.dim": 2**16, "model.heads": 2}, "lower model.dim")):
        t0 = time.monotonic()
        with pytest.raises(ResourceError, match=rf"needs at least .* GiB of memory .* free; {needle}.*"
                                                "--skip-resource-check"):
            train(tiny(**dotted), say=lambda m: None)
        assert time.monotonic() - t0 < 20
    assert not Path(tiny().train.runs_dir).exists()  # nothing written


def test_generation_resource_check_names_num_samples():
    from ode_lm.train.resources import ResourceError, check_generation_resources

    cfg = config_from_dict({})
    with pytest.raises(ResourceError, match="--num-samples 100000000.*lower --num-samples"):
        check_generation_resources(cfg, 256, 10**6, 10**8, 512, 8, cache=True)
    check_generation_resources(cfg, 256, 10**6, 4, 512, 8, cache=True)  # fits


@pytest.mark.parametrize("variant", [{}, pytest.param({"ode.solver": "rk4"}, marks=pytest.mark.slow),
                                     pytest.param({"ode.adjoint": "direct", "model.dropout": 0.1},
                                                  marks=pytest.mark.slow),
                                     pytest.param({"model.family": "standard"}, marks=pytest.mark.slow),
                                     pytest.param({"ode.checkpoint_saves": "matmuls"}, marks=pytest.mark.slow),
                                     pytest.param({"ode.solver": "heun", "ode.adaptive": True},
                                                  marks=pytest.mark.slow)])
def test_memory_estimate_is_a_lower_bound_of_xlas_analysis(tiny, variant):
    from ode_lm.data import BatchSampler, load_corpus
    from ode_lm.models import count_parameters
    from ode_lm.models.accounting import train_memory
    from ode_lm.train.steps import TrainStep
    from ode_lm.train.trainer import init_state

    cfg = tiny(**variant)  # the step other tests compile too (shared compilation cache)
    batch = BatchSampler(load_corpus(cfg.data), cfg.data.seq_len, cfg.train.batch_size, 0).train_batch(0)
    model, optimizer, opt_state = init_state(cfg, 256)
    xla = TrainStep(optimizer, cfg.ode).memory_bytes(model, opt_state, *batch, jax.random.key(0))
    estimate = train_memory(cfg, 256, count_parameters(model)).total
    assert xla is None or 0.25 * xla < estimate <= xla


def test_a_sample_prompt_the_char_alphabet_lacks_is_refused_before_training(tiny, monkeypatch):
    from ode_lm.train import trainer

    monkeypatch.setattr(trainer, "init_state", lambda *a: pytest.fail("trained first"))
    with pytest.raises(ConfigError, match=r"\[generate\] prompt = '☃x' has characters the char tokenizer .* '☃'"):
        train(tiny(**{"data.tokenizer": "char", "generate.prompt": "\u2603x"}), say=lambda m: None)


def tmpfs(path: Path, size: str) -> bool:
    """Mount a small tmpfs at ``path`` (needs the right to mount; False where it is denied)."""
    path.mkdir()
    if not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_at_the_first_writes_is_one_line_and_leaves_nothing(tiny, tmp_path):
    disk = tmp_path / "disk"
    if tmpfs(disk, "8k"):
        try:
            cfg = tiny(**{"train.runs_dir": str(disk / "runs"), "log.tensorboard": True})
            from ode_lm.train.resources import ResourceError
            with pytest.raises(ResourceError, match="KiB free, but a checkpoint of this model needs"):
                train(cfg, say=lambda m: None)  # refused before any work
            with pytest.raises(RunDirError, match="No space left on device"):  # found when writing
                train(cfg, say=lambda m: None, check_resources=False)
            assert list(disk.iterdir()) == []
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        return
    if os.geteuid() == 0:
        pytest.skip("cannot mount a tmpfs here, and root ignores a read-only directory")
    disk.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="cannot create run directory"):
            train(tiny(**{"train.runs_dir": str(disk / "runs")}), say=lambda m: None)
        assert list(disk.iterdir()) == []
    finally:
        disk.chmod(0o700)
