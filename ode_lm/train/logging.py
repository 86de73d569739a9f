"""Run logs: ``metrics.jsonl`` (one JSON object per record, the source of truth for
comparisons and resume checks) and TensorBoard events through tensorboardX.

A process killed while appending can leave a torn last line; readers skip lines that do not
parse, and a resumed run rewrites the file (atomically) without them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ode_lm.errors import RunDirError
from ode_lm.train.files import atomic_write


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard events) of a run; with ``write = False`` (a process
    other than the lead of a multi-process run) it only reads."""

    def __init__(self, run_dir: Path, tensorboard: bool, write: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._write = write
        self._writer = None
        if tensorboard and write:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: after a resume from ``step`` they are written again."""
        if not self._write or not self.path.exists():
            return
        keep = [json.dumps(row) for row in _parse(self.path) if row["step"] <= step]
        try:
            atomic_write(self.path, "".join(line + "\n" for line in keep).encode())
        except OSError as e:
            raise RunDirError(f"cannot rewrite {self.path}: {e}") from None

    def last_value(self, name: str, default: float) -> float:
        """The newest logged value of ``name`` (e.g. ``wall_s`` when resuming)."""
        rows = [r for r in read_metrics(self.path.parent) if name in r]
        return rows[-1][name] if rows else default

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self._write:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        except OSError as e:
            raise RunDirError(f"cannot write {self.path}: {e}") from None
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in _parse(path) if kind is None or r["kind"] == kind]


def _parse(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a killed process
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and "kind" in row:
            rows.append(row)
    return rows
