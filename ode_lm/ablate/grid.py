"""Ablation files: a base config, a grid of dotted keys, a baseline cell.

An ablation file is TOML::

    base = "../quickstart.toml"      # relative to this file, else to the working directory
    out = "runs/ablations/solvers"   # optional; default runs/ablations/<file stem>
    compilation_cache = true         # optional; reuse compiled steps across runs (seeds)

    [overrides]                      # optional: keys fixed for every run of the grid
    "train.steps" = 300

    [grid]                           # every combination is one training run
    "ode.solver" = ["euler", "rk4", "tsit5"]
    "train.seed" = [0, 1, 2]         # the replicate axis: a cell is a point without its seed

    [baseline]                       # optional; the cell the others are tested against
    "ode.solver" = "euler"

    [analysis]                       # optional
    refinement = true                # add each finished run's discretisation gap (ode-lm analyze)

A baseline that names only some grid keys is a baseline per group: cell ``c`` is compared
with ``c`` where those keys take the baseline values. Without ``[baseline]`` the first value
of every key is the baseline. ``baseline = {...}`` inside ``[grid]`` is read the same way.

Every grid point's :class:`Config` is built and validated here, before any run starts, so a
typo in the last cell fails in a second rather than after hours of training.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ode_lm.config import Config, load_config, validate_key
from ode_lm.errors import ConfigError, suggest, unknown_name
from ode_lm.paths import check_output_dir

SEED_KEY = "train.seed"
# The runner owns where runs go: one run directory per grid point under <out>/runs/.
RESERVED_KEYS = ("train.run_name", "train.runs_dir", "checkpoint.resume")
TOP_LEVEL_KEYS = ("base", "out", "compilation_cache", "overrides", "grid", "baseline", "analysis")
ANALYSIS_KEYS = ("refinement",)

Cell = tuple[tuple[str, Any], ...]  # ((dotted key, value), ...) in grid order, seed excluded


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def with_values(config: Config, dotted: dict[str, Any], source: str) -> Config:
    """``config.replace(...)`` (its validation and aliases), with errors naming ``source``."""
    try:
        return config.replace(**dotted)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(source + message[len("replace()"):] if message.startswith("replace()")
                          else message) from None


def config_sha(config: Config) -> str:
    """Fingerprint of a resolved config: a finished run counts only for the config it ran."""
    return hashlib.sha256(config.to_toml().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GridPoint:
    name: str  # run directory name, e.g. "solver-rk4__seed-0"
    cell: Cell
    seed: int
    config: Config


@dataclass(frozen=True)
class Ablation:
    source: str  # the ablation file
    base: str  # the base config file it names
    out: Path
    compilation_cache: bool
    grid: dict[str, tuple]  # every grid key, seed included, in file order
    baseline: dict[str, Any]  # cell key -> baseline value
    points: tuple[GridPoint, ...]
    refinement: bool = False  # [analysis] refinement: the discretisation gap of every finished run

    @property
    def cell_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.grid if k != SEED_KEY)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.grid.get(SEED_KEY, ()))

    def cells(self) -> list[Cell]:
        """Distinct cells in grid order."""
        return list(dict.fromkeys(p.cell for p in self.points))

    def baseline_of(self, cell: Cell) -> Cell:
        return tuple((k, self.baseline.get(k, v)) for k, v in cell)

    def label(self, cell: Cell) -> str:
        """``"solver=rk4, adjoint=checkpoint"`` with the shortest unambiguous key names."""
        names = short_names(self.cell_keys)
        return ", ".join(f"{names[k]}={format_value(v)}" for k, v in cell) or "base"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``ode.steps`` -> ``steps`` unless two grid keys share the last part."""
    last = [k.partition(".")[2] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def point_name(values: dict[str, Any]) -> str:
    names = short_names(list(values))
    parts = [f"{names[k]}-{format_value(v)}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "__".join(parts)) or "base"


def _resolve_base(base: Any, path: Path) -> Path:
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must name a config file, e.g. base = \"../quickstart.toml\"")
    for candidate in (path.parent / base, Path(base)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path}: base = \"{base}\" not found (looked in {path.parent} and in the "
                      "working directory); name an existing config TOML")


def load_ablation(path: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None
                  ) -> Ablation:
    """Read and fully validate an ablation file; ``overrides`` apply to the base config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such ablation file (e.g. configs/ablations/solvers.toml)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_name(f"{path}: unknown top-level key '{key}'", key, TOP_LEVEL_KEYS)
    base_path = _resolve_base(raw.get("base"), path)
    base = load_config(base_path, overrides)
    fixed = raw.get("overrides", {})
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: 'overrides' must be a table of \"section.key\" = value")
    for key in fixed:
        if key in RESERVED_KEYS:
            raise ConfigError(f"{path} [overrides] \"{key}\": set by the ablation runner, not by the file")
    base = with_values(base, fixed, f"{path} [overrides]")
    cache = raw.get("compilation_cache", True)
    if not isinstance(cache, bool):
        raise ConfigError(f"{path}: compilation_cache = {cache!r}: expected true or false")
    out_value = out if out is not None else raw.get("out", f"runs/ablations/{path.stem}")
    if not isinstance(out_value, (str, Path)):
        raise ConfigError(f"{path}: out = {out_value!r}: expected a directory path (a string)")
    out_dir = check_output_dir(out_value, "--out" if out is not None else f"{path}: out",
                               markers=("results.jsonl",))

    grid_table = dict(raw.get("grid", {})) if isinstance(raw.get("grid", {}), dict) else None
    if not grid_table:
        raise ConfigError(f"{path}: [grid] is missing or empty; add e.g. [grid] \"ode.solver\" = "
                          "[\"euler\", \"rk4\"]")
    baseline_raw = raw.get("baseline", grid_table.pop("baseline", {}))
    grid = _check_grid(grid_table, base, path)
    baseline = _check_baseline(baseline_raw, grid, path)
    points = _build_points(grid, base, out_dir, path)
    return Ablation(str(path), str(base_path), out_dir, cache, grid, baseline, points,
                    refinement=_check_analysis(raw.get("analysis", {}), path))


def _check_analysis(table: Any, path: Path) -> bool:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'analysis' must be a table, e.g. [analysis] refinement = true")
    for key, value in table.items():
        if key not in ANALYSIS_KEYS:
            raise unknown_name(f"{path} [analysis]: unknown key '{key}'", key, ANALYSIS_KEYS)
        if not isinstance(value, bool):
            raise ConfigError(f"{path} [analysis] {key} = {value!r}: expected true or false")
    return table.get("refinement", False)


def _check_grid(table: dict[str, Any], base: Config, path: Path) -> dict[str, tuple]:
    grid = {}
    for key, values in table.items():
        source = f"{path} [grid] \"{key}\""
        if key in RESERVED_KEYS:
            raise ConfigError(f"{source}: set by the ablation runner (one run directory per "
                              "grid point); remove it from the grid")
        if not isinstance(values, list):
            raise ConfigError(f"{source}: expected a list of values, e.g. \"{key}\" = "
                              f"[{format_value(values)!r}, ...], got {values!r}")
        if not values:
            raise ConfigError(f"{source}: the list of values is empty; give at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{source}: values repeat in {values!r}; list each value once")
        for v in values:  # each value on its own; rules between keys are checked on every point's config
            validate_key(key, v, source)
        grid[key] = tuple(values)
    return grid


def _check_baseline(table: Any, grid: dict[str, tuple], path: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: baseline must be a table of \"section.key\" = value, got {table!r}")
    cell_keys = [k for k in grid if k != SEED_KEY]
    for key, value in table.items():
        if key not in cell_keys:
            raise ConfigError(f"{path} [baseline] \"{key}\": not a grid key (seeds excluded); "
                              f"grid keys are {', '.join(cell_keys) or 'none'}" + suggest(key, cell_keys))
        if value not in grid[key]:
            raise ConfigError(f"{path} [baseline] \"{key}\" = {value!r}: not among the grid values "
                              f"{', '.join(map(format_value, grid[key]))}")
    return dict(table) or {k: grid[k][0] for k in cell_keys}


def _build_points(grid: dict[str, tuple], base: Config, out: Path, path: Path) -> tuple[GridPoint, ...]:
    points, names = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = point_name(values)
        if name in names:
            raise ConfigError(f"{path} [grid]: points {names[name]} and {values} get the same run "
                              f"directory name '{name}'; make the values differ in letters or digits")
        names[name] = values
        runs = {"train.run_name": name, "train.runs_dir": str(out / "runs")}
        config = with_values(base, {**values, **runs}, f"{path} [grid] point {name}")
        cell = tuple((k, v) for k, v in values.items() if k != SEED_KEY)
        points.append(GridPoint(name, cell, config.train.seed, config))
    return tuple(points)


def parse_grid_args(items: Sequence[str], source: str = "--grid") -> dict[str, tuple]:
    """``["ode.solver=euler,rk4", "ode.steps=2,4"]`` -> ``{"ode.solver": ("euler", "rk4"), ...}``;
    values are TOML (bare words are strings), like command-line overrides."""
    grid: dict[str, tuple] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{source} '{item}': expected section.key=v1,v2,..., e.g. ode.steps=2,4,8")
        if key in grid:
            raise ConfigError(f"{source} '{item}': {key} is given twice; list all its values once")
        values = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise ConfigError(f"{source} '{item}': an empty value; write {key}=v1,v2,...")
            try:
                values.append(tomllib.loads(f"v = {part}")["v"])
            except tomllib.TOMLDecodeError:
                values.append(part)
        grid[key] = tuple(values)
    return grid
