"""Run an ablation grid: one ordinary training run per grid point, resumable.

``<out>/results.jsonl`` is the ledger: one row per finished point (``status`` "ok" or
"failed"), appended as soon as the point ends. A restarted runner skips every point whose
row exists for the same resolved config, and reruns the others from scratch (a run killed
half way is trained again, so its timings are those of one clean session). A run that raises
is retried once; if it fails again its row says "failed" with the error and the grid goes on.
Bad input (:class:`~ode_lm.errors.UserError`) stops the grid instead: it would fail every run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ode_lm.ablate.depth import run_gap
from ode_lm.ablate.grid import Ablation, GridPoint, config_sha
from ode_lm.config import ODE_FAMILIES
from ode_lm.errors import RunDirError, UserError
from ode_lm.generate import training_sample
from ode_lm.paths import prepare_output_dir
from ode_lm.train import train

ATTEMPTS = 2  # a crashed run is retried once


def results_path(out: Path) -> Path:
    return Path(out) / "results.jsonl"


def read_results(out: Path) -> dict[str, dict]:
    """The newest row of every point name in ``<out>/results.jsonl``; a line cut short by a
    killed process is not a row (its point runs again)."""
    path = results_path(out)
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["name"]] = row
    return rows


def _append(out: Path, row: dict) -> None:
    path = results_path(out)
    cut = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def enable_compilation_cache(directory: Path) -> None:
    """JAX's persistent compilation cache: the seeds of a cell compile the same programs, so
    every seed after the first loads them instead of compiling. Call before anything compiles."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def run_point(point: GridPoint, say: Callable[[str], None]) -> dict:
    """Train one grid point (retrying once) and return its results row."""
    row = {"name": point.name, "cell": dict(point.cell), "seed": point.seed,
           "config_sha": config_sha(point.config),
           "run_dir": str(Path(point.config.train.runs_dir) / point.config.train.run_name)}
    errors = []
    for attempt in range(1, ATTEMPTS + 1):
        try:
            result = train(point.config, overwrite=True, say=say, sample=training_sample)
        except UserError:
            raise
        except Exception as e:  # a crash of this run: retry, then record it and go on
            errors.append(f"attempt {attempt}: {type(e).__name__}: {e}")
            say(f"{point.name}: {errors[-1]}")
            continue
        ev = result.evaluation
        memory = result.step_memory_bytes
        row.update(status="ok", attempts=attempt, error=None, steps=result.steps,
                   final_train_loss=_finite(result.final_train_loss), val_loss=_finite(ev.loss),
                   best_val_loss=_finite(result.best_val_loss), train_eval_loss=_finite(result.train_eval_loss),
                   bits_per_byte=_finite(ev.bits_per_byte), perplexity=_finite(ev.perplexity),
                   nfe=ev.nfe, train_nfe=_finite(result.train_nfe), wall_s=result.wall_s,
                   ms_per_step=_finite(result.ms_per_step), tokens_per_s=_finite(result.tokens_per_s),
                   peak_memory_mb=None if memory is None else memory / 2**20,
                   parameters=result.parameters)
        break
    else:
        row.update(status="failed", attempts=ATTEMPTS, error="; ".join(errors))
    row["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return row


def run_ablation(ablation: Ablation, *, retry_failed: bool = False,
                 say: Callable[[str], None] | None = None, progress: bool = True) -> dict[str, dict]:
    """Run every missing point of the grid; return the results rows of its points by name."""
    out = prepare_output_dir(ablation.out, "the ablation directory", markers=("results.jsonl",))
    say = say or tqdm.write
    rows = read_results(out)
    todo = []
    for point in ablation.points:
        row = rows.get(point.name)
        if row is not None and row["config_sha"] != config_sha(point.config):
            raise RunDirError(f"{out} holds a finished run '{point.name}' trained with another "
                              "config (the base config or its overrides changed); pass --out to "
                              "start a new ablation directory, or delete the old one")
        if row is None or (row["status"] == "failed" and retry_failed):
            todo.append(point)
    bar = tqdm(total=len(ablation.points), initial=len(ablation.points) - len(todo),
               desc=f"ablation {Path(ablation.source).stem}", unit="run", disable=not progress,
               dynamic_ncols=True)
    try:
        for point in todo:
            bar.set_postfix_str(point.name)
            row = run_point(point, say)
            _append(out, row)
            rows[point.name] = row
            if row["status"] == "failed":
                say(f"{point.name}: recorded as failed after {ATTEMPTS} attempts")
            bar.update(1)
    finally:
        bar.close()
    if ablation.refinement:
        _add_gaps(ablation, rows, say)
    return {p.name: rows[p.name] for p in ablation.points}


def _add_gaps(ablation: Ablation, rows: dict[str, dict], say: Callable[[str], None]) -> None:
    """``[analysis] refinement``: each finished run's discretisation gap (trained grid against
    one converged solve, ``depth.run_gap``), appended to the ledger once."""
    for point in ablation.points:
        row = rows.get(point.name)
        if (row is None or row["status"] != "ok" or "discretisation_gap_pct" in row
                or point.config.model.family not in ODE_FAMILIES):
            continue
        gap = run_gap(row["run_dir"])
        if gap["status"] != "ok":
            say(f"{point.name}: no discretisation gap: {gap['error']}")
            continue
        row = {**row, "discretisation_gap_pct": 100 * gap["gap"], "converged_loss": gap["converged_loss"],
               "trained_grid_loss": gap["trained_loss"], "converged_check_pct": 100 * gap["converged_check"]}
        _append(ablation.out, row)
        rows[point.name] = row
