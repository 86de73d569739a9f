"""Inference-time depth ablation: one trained model under other solvers and step counts.

A continuous-depth model is a vector field, not a stack of layers, so the same weights can
be integrated at test time with another solver or another number of steps. This evaluates
the held-out loss of one trained run under every combination of the ``[ode]`` values given
(no retraining) and reports loss against NFE, the cost of a forward pass; and the
*discretisation gap* of a run, its trained grid's loss against a converged solve
(``run_gap``; docs/analysis.md).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ode_lm.ablate.grid import format_value, short_names, with_values
from ode_lm.ablate.plots import plot_series
from ode_lm.ablate.report import describe_hardware
from ode_lm.config import ODE_FAMILIES, ODEConfig, validate_key
from ode_lm.data import BatchSampler, load_corpus
from ode_lm.errors import ConfigError, UserError
from ode_lm.paths import prepare_output_dir
from ode_lm.train import load_run
from ode_lm.train.evaluation import SolveFailed, evaluate
from ode_lm.train.steps import EvalStep, build_eval_step, cast_dtype

ODE_STEPS = "ode.steps"
# The converged solve of the (cheap) discretisation gap: RK4 on 64 steps, checked against 32.
CONVERGED = {"solver": "rk4", "steps": 64, "adaptive": False}


def _check_keys(grid: dict[str, tuple]) -> None:
    if not grid:
        raise ConfigError("--grid is empty; give e.g. --grid \"ode.solver=euler,rk4\" \"ode.steps=2,4,8\"")
    for key in grid:
        if key.partition(".")[0] != "ode":
            raise ConfigError(f"--grid {key}: only [ode] keys can change at evaluation time "
                              f"(e.g. ode.solver, ode.steps, ode.adaptive, ode.rtol); the trained "
                              f"weights fix everything else, so {key} needs a training ablation")
        for value in grid[key]:
            validate_key(key, value, f"--grid {key}")


def _evaluate(model, sampler: BatchSampler, step: EvalStep, batches: int, bytes_per_token: float) -> dict:
    """``evaluate`` on held-out data as a row: the first batch compiles and is not timed; a
    failed adaptive solve is the row's error."""
    try:
        ev = evaluate(model, step, sampler.val_batch, batches, bytes_per_token)
    except SolveFailed as error:
        return {"status": "failed", "error": str(error)}
    return {"status": "ok", "error": None, "val_loss": ev.loss, "bits_per_byte": ev.bits_per_byte,
            "perplexity": ev.perplexity, "nfe": float(ev.nfe), "ms_per_batch": ev.ms_per_batch}


def eval_ablation(run: str | Path, grid: dict[str, tuple], *, out: str | Path | None = None,
                  batches: int | None = None, say: Callable[[str], None] = print,
                  progress: bool = True) -> Path:
    """Evaluate ``run`` under every combination of ``grid`` (``[ode]`` keys only); write
    ``results.jsonl``, ``summary.csv``, ``loss_vs_nfe.png`` and ``report.md``; return the report."""
    _check_keys(grid)
    if batches is not None and batches < 1:
        raise UserError(f"--batches {batches}: must be >= 1")
    loaded = _load_ode_run(run, say)
    cfg = loaded.config
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Validate every combination before evaluating any (e.g. adaptive needs an error estimate).
    odes = [with_values(cfg, combo, "--grid " + ", ".join(f"{k}={format_value(v)}" for k, v in combo.items())).ode
            for combo in combos]
    run_dir = loaded.checkpoint.parent.parent
    out = prepare_output_dir(out if out is not None else run_dir / "depth_ablation",
                             "--out" if out is not None else "the depth ablation directory",
                             markers=("results.jsonl",))
    corpus = load_corpus(cfg.data, tokenizer=loaded.tokenizer)  # the run's own tokens, whatever the cache holds
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    batches = batches or cfg.train.eval_batches
    say(f"depth ablation of {loaded.checkpoint} (step {loaded.step}, trained with {cfg.ode.solver}, "
        f"{cfg.ode.steps} steps): {len(combos)} settings x {batches} held-out batches")
    rows = [{"values": combo, "trained": ode == cfg.ode,
             **_evaluate(loaded.model, sampler, build_eval_step(cfg, ode), batches, corpus.bytes_per_token)}
            for combo, ode in tqdm(list(zip(combos, odes)), desc="depth ablation", unit="setting",
                                   disable=not progress, dynamic_ncols=True)]
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _write_csv(out / "summary.csv", list(grid), rows)
    plot = _plot(out / "loss_vs_nfe.png", grid, rows, cfg)
    report = out / "report.md"
    report.write_text("\n".join(_report_lines(loaded, grid, rows, batches, plot)))
    return report


def _load_ode_run(run: str | Path, say: Callable[[str], None]):
    """The run's newest checkpoint (``load_run``); a discrete family has no solve to change."""
    loaded = load_run(run, warn=say)
    family = loaded.config.model.family
    if family not in ODE_FAMILIES:
        raise UserError(f"{run}: family '{family}' is not an ODE model, so it has no solver "
                        f"or step count to change; the depth ablation needs one of {', '.join(ODE_FAMILIES)}")
    return loaded


def _plot(path: Path, grid: dict[str, tuple], rows: list[dict], cfg) -> Path:
    """Validation loss against NFE, one series per setting of the keys other than ``ode.steps``."""
    names = short_names(list(grid))
    group_keys = [k for k in grid if k != ODE_STEPS]
    series: dict[str, list] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        label = ", ".join(f"{names[k]}={format_value(r['values'][k])}" for k in group_keys) or "all settings"
        note = f"{names[ODE_STEPS]}={r['values'][ODE_STEPS]}" if ODE_STEPS in grid else ""
        series.setdefault(label, []).append((r["nfe"], r["val_loss"], math.nan, note))
    return plot_series(series, path, xlabel="NFE per forward pass", ylabel="validation loss (nats/token)",
                       logx=True, title=f"one model trained with {cfg.ode.solver}, {cfg.ode.steps} steps")


def _report_lines(loaded, grid: dict[str, tuple], rows: list[dict], batches: int, plot: Path) -> list[str]:
    """``report.md``: what was evaluated, on what, and one table row per setting."""
    cfg, names = loaded.config, short_names(list(grid))
    lines = [f"# Inference-time depth ablation: {loaded.checkpoint.parent.parent.name}", "",
             f"- Checkpoint: `{loaded.checkpoint}` (step {loaded.step}); family {cfg.model.family}; "
             f"trained with solver {cfg.ode.solver}, {cfg.ode.steps} steps"
             f"{' (adaptive)' if cfg.ode.adaptive else ''}",
             f"- Held-out data: {batches} batches of {cfg.train.batch_size} x {cfg.data.seq_len} tokens",
             f"- Hardware: {describe_hardware()}", "",
             "The same weights, integrated with other solvers and step counts; no retraining. "
             "NFE is the mean number of vector-field evaluations per forward pass; ms/batch "
             "excludes the first (compiling) batch.", "",
             "| " + " | ".join(names[k] for k in grid) + " | NFE | val loss | bits/byte | ms/batch | |",
             "| " + " | ".join("---" for _ in grid) + " | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = " | ".join(format_value(r["values"][k]) for k in grid)
        if r["status"] != "ok":
            lines.append(f"| {cells} | — | — | — | — | failed: {r['error']} |")
            continue
        ms = "—" if r["ms_per_batch"] is None else f"{r['ms_per_batch']:.1f}"
        lines.append(f"| {cells} | {r['nfe']:.1f} | {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} "
                     f"| {ms} | {'as trained' if r['trained'] else ''} |")
    return lines + ["", f"![validation loss vs NFE]({plot.name})", ""]


def _write_csv(path: Path, keys: list[str], rows: list[dict]) -> None:
    fields = ["status", "val_loss", "bits_per_byte", "perplexity", "nfe", "ms_per_batch", "trained", "error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, *fields])
        for r in rows:
            w.writerow([format_value(r["values"][k]) for k in keys] + [r.get(k, "") for k in fields])


def eval_ode(ode: ODEConfig, **values) -> ODEConfig:
    """``ode`` with ``values`` for an evaluation solve: no training-only options, a forward-only
    sensitivity (the trained one may not apply to another solver)."""
    return dataclasses.replace(ode, adjoint="checkpoint", reversible=False, unroll=False,
                               checkpoint_saves="states", grid_jitter=0.0, kinetic_weight=0.0,
                               jacobian_weight=0.0, **values)


def discretisation_gap(model, sampler: BatchSampler, ode: ODEConfig, dtype, batches: int,
                       bytes_per_token: float) -> dict:
    """The cheap gap: the trained grid's held-out loss against one converged solve
    (``CONVERGED``); ``converged_check`` is the converged solve's own change from half its steps."""
    results = {name: _evaluate(model, sampler, EvalStep(o, dtype), batches, bytes_per_token)
               for name, o in (("trained", eval_ode(ode)), ("converged", eval_ode(ode, **CONVERGED)),
                               ("half", eval_ode(ode, **{**CONVERGED, "steps": CONVERGED["steps"] // 2})))}
    if any(r["status"] != "ok" for r in results.values()):
        return {"status": "failed", "error": "; ".join(r["error"] for r in results.values() if r["error"])}
    trained, converged = results["trained"]["val_loss"], results["converged"]["val_loss"]
    return {"status": "ok", "trained_loss": trained, "converged_loss": converged,
            "gap": (trained - converged) / converged,
            "converged_check": abs(converged - results["half"]["val_loss"]) / converged,
            "converged_solve": f"{CONVERGED['solver']} x {CONVERGED['steps']}"}


def run_gap(run_dir, batches: int | None = None) -> dict:
    """``discretisation_gap`` of the newest checkpoint of ``run_dir`` on its own held-out data
    (``train.eval_batches`` batches unless ``batches``), plus the checkpoint's step."""
    loaded = load_run(run_dir, warn=lambda m: None)
    cfg = loaded.config
    corpus = load_corpus(cfg.data)
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    gap = discretisation_gap(loaded.model, sampler, cfg.ode, cast_dtype(cfg), batches or cfg.train.eval_batches,
                             corpus.bytes_per_token)
    return {**gap, "step": loaded.step}
