"""Run logs: ``metrics.jsonl`` (one JSON object per record, the source of truth for
comparisons and resume checks) and TensorBoard events through tensorboardX.

A process killed while appending can leave a torn last line; readers skip lines that do not
parse, and a resumed run rewrites the file (atomically) without them.
"""

from __future__ import annotations

import json
import os
import shutil
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
        self._events_dir = Path(run_dir) / "tensorboard"
        if tensorboard and write:
            self._writer = self._open_tensorboard()

    def _open_tensorboard(self):
        """A SummaryWriter whose first write (the file header) has reached the disk."""
        from tensorboardX import SummaryWriter

        made = not self._events_dir.exists()
        before = set(self._events_dir.iterdir()) if not made else set()
        try:
            writer = SummaryWriter(str(self._events_dir))
        except OSError as e:
            raise RunDirError(f"cannot create TensorBoard events in {self._events_dir}: {e}") from None
        try:
            writer.flush()
        except OSError as e:  # a full disk: take back what was made, without a traceback later
            new = set(self._events_dir.iterdir()) - before
            _abandon(writer, new)
            for path in new:
                path.unlink(missing_ok=True)
            if made:
                shutil.rmtree(self._events_dir, ignore_errors=True)
            raise RunDirError(f"cannot write TensorBoard events in {self._events_dir}: {e}") from None
        return writer

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

    def close(self, quiet: bool = False) -> None:
        """Flush and close the TensorBoard events; ``quiet``: a failure raises nothing (another
        error is already on its way)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as e:
            _abandon(writer, set(self._events_dir.glob("events.*")))
            if not quiet:
                raise RunDirError(f"cannot write TensorBoard events in {self._events_dir}: {e}") from None


def _abandon(writer, files: set[Path]) -> None:
    """Close a SummaryWriter that can no longer write: the descriptors of its event ``files``
    are pointed at a file in memory first, so that neither this close nor a later one (tensorboardX
    closes its writers again at exit) fails with a traceback."""
    targets = {str(p.resolve()) for p in files}
    # A file in memory (/dev/null cannot be fsynced, which tensorboardX does on every flush).
    null = os.memfd_create("ode-lm-discarded-events") if hasattr(os, "memfd_create") else \
        os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in Path("/proc/self/fd").iterdir():
            try:
                if os.readlink(fd) in targets:
                    os.dup2(null, int(fd.name))
            except (OSError, ValueError):
                continue
    except OSError:  # no /proc: nothing more can be done
        pass
    finally:
        os.close(null)
    try:
        writer.close()
    except OSError:
        pass


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
