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
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ode_lm.ablate.grid import format_value, short_names, with_values
from ode_lm.ablate.plots import plot_series
from ode_lm.ablate.report import describe_hardware
from ode_lm.config import ODE_FAMILIES, ODEConfig, validate_key
from ode_lm.data import BatchSampler, load_corpus
from ode_lm.errors import ConfigError, UserError
from ode_lm.paths import prepare_output_dir
from ode_lm.train import load_run
from ode_lm.train.precision import compute_dtype, param_dtype
from ode_lm.train.steps import EvalStep

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


def _evaluate(model, sampler: BatchSampler, ode: ODEConfig, dtype, batches: int,
              bytes_per_token: float) -> dict:
    """Held-out loss over ``batches`` batches; the first batch compiles and is not timed."""
    step = EvalStep(ode, dtype)
    losses, nfes, seconds = [], [], []
    for i in range(batches):
        t = time.perf_counter()
        loss, nfe, failed = step(model, *sampler.val_batch(i))
        loss = float(loss)
        if i:
            seconds.append(time.perf_counter() - t)
        if bool(failed):
            return {"status": "failed", "error": f"the adaptive solve reached ode.max_steps = "
                    f"{ode.max_steps} before t = 1 on batch {i}"}
        losses.append(loss)
        nfes.append(int(nfe))
    loss = float(np.mean(losses))
    return {"status": "ok", "error": None, "val_loss": loss,
            "bits_per_byte": loss / math.log(2) / bytes_per_token,
            "perplexity": math.exp(min(loss, 50.0)), "nfe": float(np.mean(nfes)),
            "ms_per_batch": 1000 * float(np.mean(seconds)) if seconds else None}


def eval_ablation(run: str | Path, grid: dict[str, tuple], *, out: str | Path | None = None,
                  batches: int | None = None, say: Callable[[str], None] = print,
                  progress: bool = True) -> Path:
    """Evaluate ``run`` under every combination of ``grid`` (``[ode]`` keys only); write
    ``results.jsonl``, ``summary.csv``, ``loss_vs_nfe.png`` and ``report.md``; return the report."""
    _check_keys(grid)
    if batches is not None and batches < 1:
        raise UserError(f"--batches {batches}: must be >= 1")
    loaded = load_run(run, warn=say)
    cfg = loaded.config
    if cfg.model.family not in ODE_FAMILIES:
        raise UserError(f"{run}: family '{cfg.model.family}' is not an ODE model, so it has no solver "
                        f"or step count to change; the depth ablation needs one of {', '.join(ODE_FAMILIES)}")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    names = short_names(list(grid))
    # Validate every combination before evaluating any (e.g. adaptive needs an error estimate).
    odes = [with_values(cfg, combo, "--grid " + ", ".join(f"{k}={format_value(v)}" for k, v in combo.items())).ode
            for combo in combos]
    run_dir = loaded.checkpoint.parent.parent
    out = prepare_output_dir(out if out is not None else run_dir / "depth_ablation",
                             "--out" if out is not None else "the depth ablation directory",
                             markers=("results.jsonl",))
    corpus = load_corpus(cfg.data, tokenizer=loaded.tokenizer)  # the run's own tokens, whatever the cache holds
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    dtype = compute_dtype(cfg) if compute_dtype(cfg) != param_dtype(cfg) else None
    batches = batches or cfg.train.eval_batches
    say(f"depth ablation of {loaded.checkpoint} (step {loaded.step}, trained with {cfg.ode.solver}, "
        f"{cfg.ode.steps} steps): {len(combos)} settings x {batches} held-out batches")

    rows = []
    for combo, ode in tqdm(list(zip(combos, odes)), desc="depth ablation", unit="setting",
                           disable=not progress, dynamic_ncols=True):
        row = {"values": combo, "trained": ode == cfg.ode,
               **_evaluate(loaded.model, sampler, ode, dtype, batches, corpus.bytes_per_token)}
        rows.append(row)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _write_csv(out / "summary.csv", list(grid), rows)

    group_keys = [k for k in grid if k != ODE_STEPS]
    series: dict[str, list] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        label = ", ".join(f"{names[k]}={format_value(r['values'][k])}" for k in group_keys) or "all settings"
        note = f"{names[ODE_STEPS]}={r['values'][ODE_STEPS]}" if ODE_STEPS in grid else ""
        series.setdefault(label, []).append((r["nfe"], r["val_loss"], math.nan, note))
    plot = plot_series(series, out / "loss_vs_nfe.png", xlabel="NFE per forward pass",
                       ylabel="validation loss (nats/token)", logx=True,
                       title=f"one model trained with {cfg.ode.solver}, {cfg.ode.steps} steps")
    lines = [f"# Inference-time depth ablation: {run_dir.name}", "",
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
    lines += ["", f"![validation loss vs NFE]({plot.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


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
    results = {name: _evaluate(model, sampler, o, dtype, batches, bytes_per_token)
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
    dtype = compute_dtype(cfg) if compute_dtype(cfg) != param_dtype(cfg) else None
    gap = discretisation_gap(loaded.model, sampler, cfg.ode, dtype, batches or cfg.train.eval_batches,
                             corpus.bytes_per_token)
    return {**gap, "step": loaded.step}
