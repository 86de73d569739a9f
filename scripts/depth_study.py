"""Is the trained model a resolved ODE? The discretisation gap of each training option.

Trains one model per variant (a named list of config overrides on top of a base config) and
measures, on held-out data, the loss on the trained grid, the loss of a converged solve of
the same weights (RK4 x 64, checked against RK4 x 32) and the discretisation gap
``(trained - converged) / converged`` (``ode_lm.ablate.run_gap``). Writes JSON
and a markdown table; the goal is a gap within 1% with a trained-grid loss within 1% of the
``default`` variant's.

    # CPU, quickstart size (~2-4 min per variant on 2 idle cores):
    python scripts/depth_study.py --config configs/quickstart.toml --runs-dir /tmp/depth_runs \\
        --out docs/results/continuous_depth_cpu.json
    # other families, chosen variants only:
    python scripts/depth_study.py --families hypernetwork time_indexed_ssm --variants default kinetic

A variant is a name from VARIANTS or ``name:section.key=value,section.key=value``. With
``--reuse`` a run directory that already holds its final checkpoint is measured, not
retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from _timing import machine, print_table, write_json
from ode_lm.ablate import run_gap
from ode_lm.config import FAMILIES, load_config
from ode_lm.train import train

VARIANTS = {
    "default": (),
    "time_max_frequency": ("model.time_max_frequency=3.0",),
    "grid_jitter": ("ode.grid_jitter=1.0",),
    "kinetic": ("ode.kinetic_weight=0.01",),
    "jacobian": ("ode.jacobian_weight=0.01",),
    "kinetic+jitter": ("ode.kinetic_weight=0.01", "ode.grid_jitter=1.0"),
    "kinetic0.1+jitter": ("ode.kinetic_weight=0.1", "ode.grid_jitter=1.0"),
    "kinetic1+jitter": ("ode.kinetic_weight=1.0", "ode.grid_jitter=1.0"),
    "steps_range": ("ode.steps_range=[2,8]",),
    "steps_range+kinetic": ("ode.steps_range=[2,8]", "ode.kinetic_weight=0.01"),
    "steps_range+kinetic0.1": ("ode.steps_range=[2,8]", "ode.kinetic_weight=0.1"),
    "steps_range16+kinetic": ("ode.steps_range=[2,16]", "ode.kinetic_weight=0.01"),
}


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    if ":" in text:
        name, _, items = text.partition(":")
        return name, tuple(i for i in items.split(",") if i)
    if text not in VARIANTS:
        sys.exit(f"unknown variant {text!r}; choose among {', '.join(VARIANTS)} or write name:key=value,...")
    return text, VARIANTS[text]


def final_train_seconds(run_dir: Path) -> float | None:
    """Training seconds (compilation and evaluation excluded) from the run's metrics log."""
    seconds = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and "train_s" in record:
            seconds = record["train_s"]
    return seconds


def measure(run_dir: Path, batches: int) -> dict:
    return {**run_gap(run_dir, batches), "train_s": final_train_seconds(run_dir)}


def run_variant(args, family: str, name: str, overrides: tuple[str, ...]) -> dict:
    run_name = f"{family}__{name}".replace("+", "_")
    common = [f"model.family={family}", f"train.runs_dir={args.runs_dir}", f"train.run_name={run_name}",
              "train.sample=false", *args.overrides]
    cfg = load_config(args.config, [*common, *overrides])
    run_dir = Path(cfg.train.runs_dir) / cfg.train.run_name
    final = run_dir / "checkpoints" / f"step_{cfg.train.steps:08d}.ckpt"
    if not (args.reuse and final.is_file()):
        train(cfg, overwrite=True, say=lambda m: None)
    row = {"family": family, "variant": name, "overrides": list(overrides), **measure(run_dir, args.batches)}
    print(f"{family} {name}: {json.dumps(row)}", flush=True)
    return row


def markdown(rows: list[dict], base: dict[str, float]) -> str:
    lines = ["| family | variant | overrides | trained-grid loss | vs default | converged loss | gap | "
             "converged check | train s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['family']} | {r['variant']} | {' '.join(r['overrides'])} | failed: {r['error']} |"
                         " | | | | |")
            continue
        ref = base.get(r["family"])
        rel = "—" if ref is None else f"{100 * (r['trained_loss'] - ref) / ref:+.2f}%"
        secs = "—" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['family']} | {r['variant']} | {' '.join(r['overrides']) or '(none)'} | "
                     f"{r['trained_loss']:.4f} | {rel} | {r['converged_loss']:.4f} | {100 * r['gap']:+.2f}% | "
                     f"{100 * r['converged_check']:.2f}% | {secs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.toml")
    p.add_argument("--runs-dir", default="runs/depth_study")
    p.add_argument("--families", nargs="+", default=["time_indexed"], choices=FAMILIES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--batches", type=int, default=20, help="held-out batches per measurement")
    p.add_argument("--reuse", action="store_true", help="measure finished runs instead of retraining")
    p.add_argument("--out", default="docs/results/continuous_depth_cpu.json")
    p.add_argument("--append", action="store_true", help="keep the rows of --out for variants not run now")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every variant")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    rows = [run_variant(args, family, name, overrides) for family in args.families for name, overrides in variants]
    if args.append and Path(args.out).is_file():  # keep the rows of variants not measured now
        done = {(r["family"], r["variant"]) for r in rows}
        old = [r for r in json.loads(Path(args.out).read_text())["rows"] if (r["family"], r["variant"]) not in done]
        rows = old + rows
    base = {r["family"]: r["trained_loss"] for r in rows if r["variant"] == "default" and r["status"] == "ok"}
    table = markdown(rows, base)
    print_table(["family", "variant", "trained", "converged", "gap %"],
                [[r["family"], r["variant"], r.get("trained_loss", math.nan), r.get("converged_loss", math.nan),
                  100 * r.get("gap", math.nan)] for r in rows])
    write_json(args.out, {"machine": machine(), "config": args.config, "overrides": args.overrides,
                          "batches": args.batches, "rows": rows})
    Path(args.out).with_suffix(".md").write_text(table)
    print(f"wrote {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
