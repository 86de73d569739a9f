"""A run's directory: claimed (checked and locked) before any work, written only once the
first step has run.

``claim`` checks ``runs_dir / run_name`` (a plain name, see ``ode_lm.paths``; not an existing
file; an existing run needs ``--resume`` or ``--overwrite``) and takes an exclusive lock for
the run. Nothing in the run directory changes until :meth:`RunDir.start`, which the trainer
calls after its first step, when the config, the data, the tokenizer, the checkpoint, the
memory check and the compilation have all succeeded. With ``--overwrite`` it then moves the
old run aside (a rename), creates the new directory, writes ``config.toml`` and opens the
logs, and deletes the old run only when all of that worked; on any failure the old run is
renamed back. A stop before that (Ctrl-C, an error) leaves the run directory as it was.

The lock is ``fcntl.flock`` on ``runs_dir/.<run_name>.lock``, a sibling of the run directory
rather than a file inside it, so that it covers the moment the old directory is renamed away
and the new one appears. The kernel drops it when its holder exits, however it exits; a
second trainer is refused with the holder's PID, which the holder writes into the file.
Readers (``generate``, ``analyze``) take no lock. In a multi-process run only the lead
(process 0) writes, so only it locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, TypeVar

from ode_lm.config import Config
from ode_lm.errors import RunDirError
from ode_lm.paths import child_dir
from ode_lm.train.files import atomic_write
from ode_lm.train.interrupts import signals_deferred, startup_guard
from ode_lm.train.parallel import all_agree

T = TypeVar("T")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``path``, holding the owner's PID."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, run_dir: Path) -> None:
        while True:  # until the file we lock is the one at ``path`` (a releaser may unlink it)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunDirError(f"run directory {run_dir} is in use by another ode-lm train "
                                  f"({'PID ' + holder if holder else 'PID unknown'}, lock {self.path}); "
                                  "wait for it to finish or stop it, or choose another "
                                  "train.run_name") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody else can hold this file
        except OSError:
            pass
        os.close(fd)


def _restore(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError:
        pass


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


class RunDir:
    """The run directory of one ``train()`` call; see the module docstring."""

    def __init__(self, path: Path, replace: bool, lead: bool):
        self.path, self.replace, self.lead = path, replace, lead
        self.started = self.made = False
        self.lock: RunLock | None = None
        self._created: list[Path] = []  # directories made to hold the lock, removed if unused
        self._closing = threading.Lock()

    @classmethod
    def claim(cls, cfg: Config, resume: bool, overwrite: bool, lead: bool = True) -> "RunDir":
        """Check the run directory and (lead) lock it; nothing is written but the lock file."""
        runs_dir = Path(cfg.train.runs_dir)
        path = child_dir(runs_dir, cfg.train.run_name, "[train] run_name")
        run = cls(path, False, lead)
        error = None
        try:
            with signals_deferred():
                if lead:
                    run._lock(runs_dir)
                run.replace = _check_existing(path, resume, overwrite)
        except RunDirError as e:
            error = e
        except BaseException:  # a signal: let go of the lock before stopping
            run.close()
            raise
        if not all_agree(error is None):  # every process stops if any cannot go on
            run.close()
            raise error or RunDirError(f"another process of this run could not use {path}; "
                                       "see its message")
        return run

    def _lock(self, runs_dir: Path) -> None:
        missing = [p for p in (runs_dir, *runs_dir.parents) if not p.exists()]
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
            self._created = [p for p in missing if p.is_dir()]
            guard = startup_guard()
            if guard is not None:
                guard.add_cleanup(self.close)
            self.lock = RunLock(runs_dir / f".{self.path.name}.lock")
            self.lock.acquire(self.path)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.path}: {e}") from None

    def start(self, config_toml: str, open_logs: Callable[[], T], files: dict[str, bytes] | None = None) -> T:
        """Create (or replace) the run directory, write ``config.toml`` and ``files`` (name ->
        contents, e.g. the tokenizer), ``open_logs()``; undo all of it if any step fails. The
        lead does the work; others only open logs."""
        if not self.lead:
            self.started = True
            return open_logs()
        aside = self.path.with_name(f".{self.path.name}.replaced-{os.getpid()}")
        config = self.path / "config.toml"
        old_config = config.read_bytes() if not self.replace and config.is_file() else None
        moved = made = False
        try:
            if self.replace:
                os.rename(self.path, aside)
                moved = True
            if not self.path.exists():
                self.path.mkdir()
                made = True
            atomic_write(config, config_toml.encode())
            for name, data in (files or {}).items():
                atomic_write(self.path / name, data)
            logs = open_logs()
        except (OSError, RunDirError) as e:
            if made:  # only what this call created; an old run is renamed back below
                shutil.rmtree(self.path, ignore_errors=True)
            elif old_config is not None:
                _restore(config, old_config)
            else:
                config.unlink(missing_ok=True)
            if moved:
                os.rename(aside, self.path)
            if isinstance(e, RunDirError):
                raise
            raise RunDirError(f"cannot write to the run directory {self.path}: {e}") from None
        self.started, self.made = True, made
        # The old run, and any left by a replacement that was killed half way (we hold the lock).
        for old in self.path.parent.glob(f".{self.path.name}.replaced-*"):
            shutil.rmtree(old, ignore_errors=True)
        return logs

    def discard(self) -> None:
        """After a write failed (a full disk): remove the run directory this call created if
        it holds no checkpoint yet, so that no partial run is left."""
        if self.lead and self.made and not any((self.path / "checkpoints").glob("step_*.ckpt")):
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        """Release the lock; if the run never started, remove the directories made for it."""
        with self._closing:
            guard = startup_guard()
            if guard is not None:
                guard.remove_cleanup(self.close)
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            if not self.started:
                for p in self._created:  # deepest first
                    try:
                        p.rmdir()
                    except OSError:
                        pass
                self._created = []


def _check_existing(path: Path, resume: bool, overwrite: bool) -> bool:
    """Whether an existing run at ``path`` is to be replaced; raise if it may not be touched."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} is an existing file, not a directory; move it "
                          "away or choose another train.run_name")
    try:
        existing = path.is_dir() and any(path.iterdir())
    except OSError as e:
        raise RunDirError(f"cannot read run directory {path}: {e}") from None
    if existing and not resume and not overwrite:
        raise RunDirError(f"run directory {path} already exists; pass --resume to continue "
                          "it, --overwrite to replace it, or choose another train.run_name")
    return existing and not resume
