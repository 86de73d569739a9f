"""The ablation runner: grid validation, resumable runs, statistics, reports, depth ablation."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from ode_lm import ablate
from ode_lm.ablate import runner
from ode_lm.errors import ConfigError, UserError
from ode_lm.train import Evaluation, TrainingError, TrainResult
from ode_lm.train.logging import read_metrics
from tests.conftest import REPO, run_cli, tiny_config

GRID = """
base = "tiny.toml"
[grid]
"ode.solver" = ["euler", "heun"]
"data.max_bytes" = [200000, 300000]
"train.seed" = [0, 1]
[baseline]
"ode.solver" = "euler"
"""
CELLS = [("euler", 200000), ("euler", 300000), ("heun", 200000), ("heun", 300000)]


def write_tiny_base(directory: Path) -> Path:
    # 8 steps, evaluated at 4 and 8; data.max_bytes changes the data, not the compiled step,
    # so the 8 runs compile 2 programs (once, through the compilation cache).
    cfg = tiny_config(directory, **{"train.steps": 8, "train.eval_every": 4, "checkpoint.every": 4,
                                    "train.sample": False})
    path = directory / "tiny.toml"
    path.write_text(cfg.to_toml())
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ode_lm.cli", *args]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2x2x2 ablation, killed (SIGKILL) after 3 finished runs, then restarted."""
    root = tmp_path_factory.mktemp("ablation")
    write_tiny_base(root)
    (root / "grid.toml").write_text(GRID)
    out = root / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cli("ablate", str(root / "grid.toml"), "--out", str(out)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        rows = runner.read_results(out)
        if len(rows) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = runner.read_results(out)
    assert 3 <= len(before) < 8, proc.stderr.read()
    stamps = {name: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for name, r in before.items()}
    again = run_cli("ablate", str(root / "grid.toml"), "--out", str(out))
    assert again.returncode == 0, again.stderr
    return root, out, before, stamps, again


def test_killed_ablation_restarts_with_only_the_missing_runs(finished):
    root, out, before, stamps, again = finished
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # Every point ran exactly once: the restart skipped the finished ones...
    assert len(lines) == 8 and len({r["name"] for r in lines}) == 8
    assert [r["name"] for r in lines[:len(before)]] == list(before)
    for name, row in before.items():
        assert (Path(row["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns == stamps[name]
    assert "8 runs finished, 0 failed" in again.stdout
    # ...and the run killed half way was trained again from scratch: one record per step.
    for row in lines:
        assert row["status"] == "ok"
        steps = [r["step"] for r in read_metrics(Path(row["run_dir"]), "train") if "lr" not in r]
        assert steps == list(range(1, 9))


def test_results_rows_hold_the_run_metrics(finished):
    _, out, *_ = finished
    for row in runner.read_results(out).values():
        val = read_metrics(Path(row["run_dir"]), "val")
        assert [r["step"] for r in val] == [4, 8]
        assert row["val_loss"] == val[-1]["loss"] and row["bits_per_byte"] == val[-1]["bits_per_byte"]
        # Fixed steps: euler evaluates the field once per step, heun twice (tiny: 2 steps).
        assert row["nfe"] == {"euler": 2, "heun": 4}[row["cell"]["ode.solver"]]
        assert row["parameters"] > 0 and row["peak_memory_mb"] > 0
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] == pytest.approx(4 * 16 * 1000 / row["ms_per_step"])
        assert 0 < val[0]["train_s"] < val[1]["train_s"]
    # Memory is a property of the compiled step: the same for every run of one solver.
    for solver in ("euler", "heun"):
        same = {r["peak_memory_mb"] for r in runner.read_results(out).values() if r["cell"]["ode.solver"] == solver}
        assert len(same) == 1


def test_report_has_every_cell_with_its_statistics(finished):
    root, out, *_ = finished
    rows = runner.read_results(out)
    report = (out / "report.md").read_text()
    for solver, max_bytes in CELLS:
        label = f"solver={solver}, max_bytes={max_bytes}"
        assert label in report
        values = [r["val_loss"] for r in rows.values()
                  if r["cell"] == {"ode.solver": solver, "data.max_bytes": max_bytes}]
        assert len(values) == 2
        assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in report
    # The baseline names only the solver: heun cells are tested against euler at the same max_bytes.
    assert "**solver=euler, max_bytes=200000** (baseline)" in report
    assert "**solver=euler, max_bytes=300000** (baseline)" in report
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["ode.solver"], int(t["data.max_bytes"])) for t in table] == CELLS
    heun = next(t for t in table if t["ode.solver"] == "heun" and t["data.max_bytes"] == "300000")
    a = [r["val_loss"] for r in rows.values() if r["cell"] == {"ode.solver": "heun", "data.max_bytes": 300000}]
    b = [r["val_loss"] for r in rows.values() if r["cell"] == {"ode.solver": "euler", "data.max_bytes": 300000}]
    assert float(heun["val_loss_p_welch"]) == pytest.approx(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
    for png in ("val_loss_vs_step.png", "val_loss_vs_wall_clock.png", "loss_vs_nfe.png", "memory.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Intel" in report or "cores" in report  # the hardware line


def test_statistics_match_scipy_on_hand_made_numbers():
    a = [2.10, 2.14, 2.08, 2.12, 2.11]
    b = [2.20, 2.31, 2.05, 2.26]
    s = ablate.summarize(a)
    assert s.n == 5 and s.mean == pytest.approx(2.11) and s.std == pytest.approx(np.std(a, ddof=1))
    # t_{0.975, 4} = 2.7764451...
    half = 2.7764451051977987 * np.std(a, ddof=1) / math.sqrt(5)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.11 - half, 2.11 + half))
    lo, hi = scipy.stats.t.interval(0.95, 4, loc=np.mean(a), scale=scipy.stats.sem(a))
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi))
    # Welch by hand: t and the Welch-Satterthwaite degrees of freedom.
    va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 4
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 4 + vb**2 / 3)
    p = ablate.welch_p_value(a, b)
    assert p == pytest.approx(2 * scipy.stats.t.sf(abs(t), df))
    assert p != pytest.approx(scipy.stats.ttest_ind(a, b).pvalue)  # not Student's pooled test
    assert math.isnan(ablate.welch_p_value(a, [2.0]))  # one run: undefined
    one = ablate.summarize([3.0])
    assert one.mean == 3.0 and math.isnan(one.std) and math.isnan(one.ci_low)


BAD = {
    "unknown key": ('"ode.solvr" = ["euler"]', ConfigError, ["ode.solvr", 'did you mean "solver"']),
    "unknown section": ('"odd.steps" = [2]', ConfigError, ["odd.steps", "unknown section"]),
    "empty list": ('"ode.steps" = []', ConfigError, ["ode.steps", "empty"]),
    "bad value": ('"ode.steps" = [2, 0]', ConfigError, ["ode.steps", ">= 1"]),
    "bad choice": ('"ode.solver" = ["euler", "rk5"]', ConfigError, ["ode.solver", "rk4"]),
    "not a list": ('"ode.steps" = 4', ConfigError, ["ode.steps", "list"]),
    "reserved key": ('"train.run_name" = ["a", "b"]', ConfigError, ["train.run_name", "runner"]),
    "repeated value": ('"ode.steps" = [2, 2]', ConfigError, ["ode.steps", "repeat"]),
    "inconsistent point": ('"ode.solver" = ["rk4", "euler"]\n"ode.adaptive" = [false, true]', ConfigError,
                           ["solver-euler__adaptive-true", "adaptive = true is not possible"]),
    "baseline not in grid": ('"ode.steps" = [2, 4]\n[baseline]\n"ode.steps" = 8', ConfigError,
                             ["ode.steps", "not among"]),
    "baseline key not in grid": ('"ode.steps" = [2, 4]\n[baseline]\n"ode.solver" = "rk4"', ConfigError,
                                 ["ode.solver", "not a grid key"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_grid_fails_before_any_run(tmp_path, case):
    grid, error, words = BAD[case]
    write_tiny_base(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text(f'base = "tiny.toml"\nout = "{tmp_path / "out"}"\n[grid]\n{grid}\n')
    with pytest.raises(error) as e:
        ablate.load_ablation(path)
    for word in words:
        assert word in str(e.value)
    assert not (tmp_path / "out").exists()


def test_malformed_ablation_on_the_command_line(tmp_path):
    write_tiny_base(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text(f'base = "tiny.toml"\nout = "{tmp_path / "out"}"\n[grid]\n"ode.steps" = [4, 8]\n'
                    '"model.dim" = [32, -1]\n')
    proc = run_cli("ablate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.dim" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    missing = tmp_path / "nobase.toml"
    missing.write_text('base = "nowhere.toml"\n[grid]\n"ode.steps" = [4]\n')
    with pytest.raises(ConfigError, match="nowhere.toml"):
        ablate.load_ablation(missing)


def _fake_train(fail: dict[str, int], calls: list[str]):
    """``train`` that fails the first ``fail[name]`` attempts of a point."""
    def train(cfg, *, overwrite=False, say=print, resume=False, sample=None):
        name = cfg.train.run_name
        calls.append(name)
        if calls.count(name) <= fail.get(name, 0):
            raise TrainingError(f"step 3: non-finite loss nan in {name}")
        ev = Evaluation(1.0 + cfg.train.seed / 10, 1.5, math.e, cfg.ode.steps)
        return TrainResult(Path(cfg.train.runs_dir) / name, cfg.train.steps, 1.2, ev, "", parameters=10,
                           wall_s=1.0, ms_per_step=2.0, tokens_per_s=3.0, train_nfe=4.0,
                           step_memory_bytes=2**20)
    return train


def test_a_crashed_run_is_retried_once_then_recorded_as_failed(tmp_path, monkeypatch):
    write_tiny_base(tmp_path)
    path = tmp_path / "grid.toml"
    path.write_text(f'base = "tiny.toml"\nout = "{tmp_path / "out"}"\n[grid]\n"ode.steps" = [2, 4]\n'
                    '"train.seed" = [0, 1]\n')
    spec = ablate.load_ablation(path)
    calls: list[str] = []
    flaky, broken = "steps-2__seed-1", "steps-4__seed-0"
    monkeypatch.setattr(runner, "train", _fake_train({flaky: 1, broken: 5}, calls))
    rows = ablate.run_ablation(spec, say=lambda m: None, progress=False)
    assert calls == ["steps-2__seed-0", flaky, flaky, broken, broken, "steps-4__seed-1"]
    assert rows[flaky]["status"] == "ok" and rows[flaky]["attempts"] == 2
    assert rows[broken]["status"] == "failed" and "non-finite loss" in rows[broken]["error"]
    report = ablate.write_report(spec, rows, hardware="test machine").read_text()
    assert "## Failed runs" in report and broken in report
    assert "| steps=4 | 1 | 1.1000 ± — | — | — |" in report  # the one finished seed of the cell
    # A restart runs nothing (the failed point is recorded) unless asked to retry failures;
    # a ledger line cut short by a kill is ignored.
    with open(spec.out / "results.jsonl", "a") as f:
        f.write('{"name": "steps-2__seed-0", "sta')
    calls.clear()
    ablate.run_ablation(spec, say=lambda m: None, progress=False)
    assert calls == []
    rows = ablate.run_ablation(spec, retry_failed=True, say=lambda m: None, progress=False)
    assert calls == [broken, broken] and len(runner.read_results(spec.out)) == 4
    assert rows[broken]["status"] == "failed"
    # Bad input is not a crash: it stops the grid.
    def bad(cfg, **kw):
        raise UserError("data: corpus not found")
    monkeypatch.setattr(runner, "train", bad)
    with pytest.raises(UserError, match="corpus"):
        ablate.run_ablation(ablate.load_ablation(path, out=tmp_path / "other"), say=lambda m: None,
                            progress=False)


def test_a_changed_base_config_is_not_mixed_with_old_results(tmp_path, monkeypatch):
    write_tiny_base(tmp_path)
    path = tmp_path / "grid.toml"
    path.write_text(f'base = "tiny.toml"\nout = "{tmp_path / "out"}"\n[grid]\n"ode.steps" = [2]\n')
    monkeypatch.setattr(runner, "train", _fake_train({}, []))
    ablate.run_ablation(ablate.load_ablation(path), say=lambda m: None, progress=False)
    with pytest.raises(UserError, match="another config"):
        ablate.run_ablation(ablate.load_ablation(path, ["optim.lr=0.01"]), say=lambda m: None, progress=False)


def test_eval_only_depth_ablation_reuses_one_trained_model(finished, tmp_path):
    _, out, *_ = finished
    run = out / "runs" / "solver-euler__max_bytes-300000__seed-0"
    report = ablate.eval_ablation(run, ablate.parse_grid_args(["ode.solver=euler", "ode.steps=1,2,4"]),
                                  out=tmp_path / "depth", say=lambda m: None, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "depth" / "results.jsonl").read_text().splitlines()]
    assert [(r["values"]["ode.steps"], r["nfe"]) for r in rows] == [(1, 1), (2, 2), (4, 4)]
    trained = [r for r in rows if r["trained"]]
    assert len(trained) == 1 and trained[0]["values"] == {"ode.solver": "euler", "ode.steps": 2}
    # As trained, the held-out loss is the training run's own final evaluation.
    assert trained[0]["val_loss"] == pytest.approx(read_metrics(run, "val")[-1]["loss"], rel=1e-6)
    assert len({round(r["val_loss"], 6) for r in rows}) == 3  # other depths give other losses
    text = report.read_text()
    assert "as trained" in text and "](loss_vs_nfe.png)" in text
    assert (tmp_path / "depth" / "loss_vs_nfe.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="only \\[ode\\] keys"):
        ablate.eval_ablation(run, {"optim.lr": (0.1,)}, out=tmp_path / "x", say=lambda m: None)
    with pytest.raises(ConfigError, match="adaptive"):
        ablate.eval_ablation(run, {"ode.adaptive": (True,)}, out=tmp_path / "x", say=lambda m: None)
    proc = run_cli("ablate", "--eval-only", str(run), "--grid", "ode.solver=euler,rk5")
    assert proc.returncode == 2 and "rk4" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "ablations").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_ablations_are_valid(path):
    spec = ablate.load_ablation(path)  # an unknown family, solver or key is a ConfigError: a failure
    assert len(spec.points) >= 2 and spec.seeds
