"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one.

The bytes go to a temporary file in the same directory, are fsynced, and replace the target
with ``os.replace`` (atomic on POSIX); the directory is then fsynced so the rename itself
survives a power cut. A process killed half-way leaves only a ``.<name>.tmp-<pid>`` file,
which :func:`remove_stale_temporaries` clears on the next run.
"""

from __future__ import annotations

import os
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically; on OSError the old file is untouched and the
    temporary file is removed before the error propagates."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, pattern: str) -> list[Path]:
    """Delete temporary files matching ``pattern`` left by killed processes (not our own)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    mine = f".tmp-{os.getpid()}"
    stale = [p for p in directory.glob(pattern) if ".tmp-" in p.name and not p.name.endswith(mine)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
