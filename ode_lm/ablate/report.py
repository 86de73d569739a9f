"""The ablation report: ``summary.csv``, the figures and ``report.md``, from ``results.jsonl``.

Each cell (a grid point without its seed) gets, per metric, the mean +- sample std over its
finished seeds, the 95% Student-t confidence interval of the mean, and the p-value of
Welch's t-test against its baseline cell.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ode_lm.ablate.grid import Ablation, Cell, format_value, short_names
from ode_lm.ablate.plots import plot_bars, plot_curves, plot_series
from ode_lm.ablate.stats import Summary, summarize, welch_p_value
from ode_lm.train.logging import read_metrics


@dataclass(frozen=True)
class Metric:
    key: str  # field of a results row
    title: str
    unit: str
    digits: int


METRICS = (
    Metric("val_loss", "validation loss", "nats/token", 4),
    Metric("bits_per_byte", "validation bits per byte", "bits/byte", 4),
    Metric("best_val_loss", "best validation loss over the run", "nats/token", 4),
    Metric("train_eval_loss", "training loss in evaluation mode (fixed windows, no dropout)", "nats/token", 4),
    Metric("final_train_loss", "final training loss", "nats/token", 4),
    Metric("wall_s", "wall-clock per run, compilation included", "s", 1),
    Metric("ms_per_step", "time per training step", "ms", 1),
    Metric("tokens_per_s", "training throughput", "tokens/s", 0),
    Metric("nfe", "NFE per forward pass (held-out)", "evaluations", 1),
    Metric("peak_memory_mb", "memory of one training step", "MiB", 2),
    Metric("parameters", "parameters", "", 0),
)
# With [analysis] refinement = true (runner._add_gaps): trained grid against a converged solve.
GAP_METRICS = (
    Metric("discretisation_gap_pct", "discretisation gap: (trained grid - converged) / converged", "%", 2),
    Metric("converged_loss", "validation loss of a converged solve (RK4 x 64)", "nats/token", 4),
)
ODE_STEPS = "ode.steps"


def metrics_of(ablation: Ablation) -> tuple[Metric, ...]:
    return METRICS + (GAP_METRICS if ablation.refinement else ())


@dataclass
class CellResult:
    cell: Cell
    label: str
    is_baseline: bool
    runs: list[dict]  # rows with status "ok"
    failed: list[dict]
    stats: dict[str, Summary]
    p_values: dict[str, float]  # against the baseline cell; nan for the baseline itself


def cell_results(ablation: Ablation, rows: dict[str, dict]) -> list[CellResult]:
    """Per-cell statistics; ``rows`` maps point names to results rows (missing: not run)."""
    by_cell: dict[Cell, list[dict]] = {c: [] for c in ablation.cells()}
    for point in ablation.points:
        if point.name in rows:
            by_cell[point.cell].append(rows[point.name])
    ok = {c: [r for r in rs if r["status"] == "ok"] for c, rs in by_cell.items()}
    results = []
    for cell, rs in by_cell.items():
        base = ablation.baseline_of(cell)
        stats, p = {}, {}
        for m in metrics_of(ablation):
            values = [r.get(m.key) for r in ok[cell]]
            stats[m.key] = summarize(values)
            p[m.key] = (math.nan if base == cell else
                        welch_p_value(values, [r.get(m.key) for r in ok.get(base, [])]))
        results.append(CellResult(cell, ablation.label(cell), base == cell, ok[cell],
                                  [r for r in rs if r["status"] != "ok"], stats, p))
    return results


def describe_hardware() -> str:
    """CPU model and core count, and the JAX backend and device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    device = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__}, backend {jax.default_backend()} "
            f"({len(jax.devices())} x {device.device_kind})")


def _fmt(x: float, digits: int) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:,.{digits}f}"


def _p(x: float) -> str:
    return "—" if not math.isfinite(x) else (f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}")


def write_summary_csv(path: Path, ablation: Ablation, cells: list[CellResult]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = [*ablation.cell_keys, "baseline", "n_ok", "n_failed"]
        for m in metrics_of(ablation):
            header += [f"{m.key}_{s}" for s in ("mean", "std", "ci95_low", "ci95_high", "p_welch")]
        w.writerow(header)
        for c in cells:
            line = [format_value(v) for _, v in c.cell] + [c.is_baseline, len(c.runs), len(c.failed)]
            for m in metrics_of(ablation):
                s = c.stats[m.key]
                line += [s.mean, s.std, s.ci_low, s.ci_high, c.p_values[m.key]]
            w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in line])
    return path


def _val_curves(runs: list[dict]) -> list[list[dict]]:
    curves = [[r for r in read_metrics(Path(run["run_dir"]), "val") if "train_s" in r] for run in runs]
    return [c for c in curves if c]


def _groups(ablation: Ablation, cells: list[CellResult]) -> dict[str, list[CellResult]]:
    """Cells grouped by every key except ode.steps (a group is one line over step counts)."""
    keys = [k for k in ablation.cell_keys if k != ODE_STEPS]
    names = short_names(ablation.cell_keys)
    groups: dict[str, list[CellResult]] = {}
    for c in cells:
        label = ", ".join(f"{names[k]}={format_value(v)}" for k, v in c.cell if k in keys) or "all cells"
        groups.setdefault(label, []).append(c)
    return groups


def write_plots(out: Path, ablation: Ablation, cells: list[CellResult]) -> dict[str, Path]:
    curves = {c.label: _val_curves(c.runs) for c in cells if c.runs}
    plots = {
        "validation loss vs step": plot_curves(curves, "step", "training step",
                                               out / "val_loss_vs_step.png", "validation loss vs step"),
        "validation loss vs wall-clock": plot_curves(
            curves, "train_s", "training wall-clock (s): train steps, without compilation or evaluation",
            out / "val_loss_vs_wall_clock.png", "validation loss vs wall-clock"),
    }
    has_steps = ODE_STEPS in ablation.cell_keys
    names = short_names(ablation.cell_keys)

    def point(c: CellResult, metric: str) -> tuple[float, float, float, str]:
        note = f"{names[ODE_STEPS]}={dict(c.cell)[ODE_STEPS]}" if has_steps else (c.label if len(cells) > 1 else "")
        return (c.stats["nfe"].mean, c.stats[metric].mean, c.stats[metric].std, note)

    series = {g: [point(c, "val_loss") for c in cs] for g, cs in _groups(ablation, cells).items()}
    plots["validation loss vs NFE"] = plot_series(
        series, out / "loss_vs_nfe.png", xlabel="NFE per forward pass",
        ylabel="validation loss (nats/token)", title="validation loss vs NFE")
    if has_steps:
        series = {g: [(float(dict(c.cell)[ODE_STEPS]), c.stats["peak_memory_mb"].mean,
                       c.stats["peak_memory_mb"].std, "") for c in cs]
                  for g, cs in _groups(ablation, cells).items()}
        plots["memory vs ODE steps"] = plot_series(
            series, out / "memory_vs_steps.png", xlabel="ODE steps (ode.steps)",
            ylabel="training-step memory (MiB)", title="memory vs ODE steps", logx=True)
    else:
        plots["memory per cell"] = plot_bars(
            {c.label: (c.stats["peak_memory_mb"].mean, c.stats["peak_memory_mb"].std) for c in cells},
            out / "memory.png", ylabel="training-step memory (MiB)", title="memory per cell")
    return plots


def _cell_name(c: CellResult) -> str:
    return f"**{c.label}** (baseline)" if c.is_baseline else c.label


def write_report(ablation: Ablation, rows: dict[str, dict], hardware: str | None = None) -> Path:
    """Write ``summary.csv``, the PNGs and ``report.md`` into the ablation directory."""
    out = ablation.out
    cells = cell_results(ablation, rows)
    write_summary_csv(out / "summary.csv", ablation, cells)
    plots = write_plots(out, ablation, cells) if any(c.runs for c in cells) else {}
    lines = [*_header(ablation, cells, hardware), *_method(ablation), *_metric_tables(ablation, cells),
             *_figures(plots), *_failed_runs(cells), *_runs(ablation, rows)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _header(ablation: Ablation, cells: list[CellResult], hardware: str | None) -> list[str]:
    """The title, the files, the grid and its baseline, the hardware and what ran."""
    n_ok = sum(len(c.runs) for c in cells)
    n_failed = sum(len(c.failed) for c in cells)
    missing = len(ablation.points) - n_ok - n_failed
    names = short_names(ablation.cell_keys)
    grid = "; ".join(f"`{k}` ∈ {{{', '.join(format_value(v) for v in vs)}}}"
                     for k, vs in ablation.grid.items())
    base = ", ".join(f"{names[k]}={format_value(v)}" for k, v in ablation.baseline.items())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cfg = ablation.points[0].config
    return [
        f"# Ablation: {Path(ablation.source).stem}", "",
        f"- Ablation file: `{ablation.source}`; base config: `{ablation.base}` "
        f"({cfg.train.steps} training steps, batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens, "
        f"model dim {cfg.model.dim})",
        f"- Grid: {grid}",
        f"- Baseline: {base or 'the base config'} (each cell is tested against the cell with these values)",
        f"- Hardware: {hardware or describe_hardware()}",
        f"- Runs: {n_ok} finished, {n_failed} failed, {missing} not run; report written {now}", "",
    ]


def _method(ablation: Ablation) -> list[str]:
    """How the statistics, the memory, the times and the NFE are measured."""
    lines = [
        "Values are mean ± sample standard deviation (ddof = 1) over seeds; the 95% CI is the "
        "Student-t interval of the mean; p is the two-sided Welch t-test (unequal variances) "
        "against the baseline cell, — where undefined (fewer than 2 runs, or no variance).",
        "",
        "Memory is XLA's memory analysis of the compiled training step (arguments + outputs + "
        "temporaries − aliased buffers), the same on every backend; it is not an allocator peak. "
        "Time per step and the wall-clock axis of the curves exclude compilation (the first "
        "step) and evaluation; wall-clock per run is everything, compilation included (with the "
        "compilation cache on, the first seed of a cell compiles and later seeds mostly load). NFE is the number of "
        "vector-field evaluations of one held-out forward pass.", "",
    ]
    if ablation.refinement:
        lines += ["The discretisation gap ([analysis] refinement) compares each run's held-out loss on its "
                  "trained grid with the same weights solved to convergence (RK4 x 64, checked against "
                  "RK4 x 32); negative means the weights fit the grid rather than the ODE "
                  "(docs/analysis.md).", ""]
    return lines


def _metric_tables(ablation: Ablation, cells: list[CellResult]) -> list[str]:
    """One table per metric: every cell's n, mean ± std, confidence interval and p-value."""
    lines = []
    for m in metrics_of(ablation):
        unit = f" ({m.unit})" if m.unit else ""
        lines += [f"## {m.title}{unit}", "", "| cell | n | mean ± std | 95% CI | p vs baseline |",
                  "| --- | --- | --- | --- | --- |"]
        for c in cells:
            s = c.stats[m.key]
            ci = f"[{_fmt(s.ci_low, m.digits)}, {_fmt(s.ci_high, m.digits)}]" if s.n > 1 else "—"
            lines.append(f"| {_cell_name(c)} | {s.n} | {_fmt(s.mean, m.digits)} ± "
                         f"{_fmt(s.std, m.digits)} | {ci} | {_p(c.p_values[m.key])} |")
        lines.append("")
    return lines


def _figures(plots: dict[str, Path]) -> list[str]:
    if not plots:
        return []
    return ["## Figures", "", "Curves: mean over seeds, band from the lowest to the highest "
            "seed. Points (loss vs NFE, memory): mean over seeds, error bars ± std.", "",
            *(f"![{title}]({p.name})" for title, p in plots.items()), ""]


def _failed_runs(cells: list[CellResult]) -> list[str]:
    failed = [r for c in cells for r in c.failed]
    if not failed:
        return []
    return ["## Failed runs", "", "| run | error |", "| --- | --- |",
            *(f"| {r['name']} | {r['error']} |" for r in failed), ""]


def _runs(ablation: Ablation, rows: dict[str, dict]) -> list[str]:
    """Every run's row, in grid order."""
    lines = ["## Runs", "", "| run | val loss | bits/byte | ms/step | NFE | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in (rows[p.name] for p in ablation.points if p.name in rows):
        lines.append(f"| {r['name']} | {_fmt(r.get('val_loss'), 4)} | {_fmt(r.get('bits_per_byte'), 4)} "
                     f"| {_fmt(r.get('ms_per_step'), 1)} | {r.get('nfe', '—')} | {r['status']} |")
    return lines
