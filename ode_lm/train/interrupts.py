"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, exit cleanly.

The first SIGINT or SIGTERM only sets a flag; the training loop finishes its current step,
writes a checkpoint at that step and raises :class:`TrainingInterrupted`. A second signal
ends the process at once with ``os._exit``, even while the main thread is inside a long XLA
computation (where Python signal handlers cannot run): the signal numbers also reach a
watcher thread through ``signal.set_wakeup_fd``, and that thread does the exit. Quitting
mid-write is safe because checkpoints only ever appear through atomic renames; the worst it
leaves is a temporary file, removed by the next run.

The exit status is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), the shell
convention for "ended by this signal", for a clean stop and an immediate one alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``.

    A KeyboardInterrupt, so code that catches ``Exception`` around ``train()`` (a grid of
    runs, say) stops too instead of carrying on with the next run.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint "
                         f"{checkpoint or '(none)'}")


class InterruptGuard:
    """Catches SIGINT/SIGTERM while installed; ``requested`` is the first signal or None.

    Handlers can only be installed from the main thread; elsewhere (a worker thread running
    ``train()``) the guard does nothing and signals keep their usual effect. A signal the
    process was started ignoring (``nohup``, a background job) stays ignored.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None

    def install(self) -> "InterruptGuard":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)
        self._watcher = threading.Thread(target=self._watch, args=(reader, set(self._previous)),
                                         daemon=True, name="ode-lm-interrupts")
        self._watcher.start()
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            reader, writer = self._wakeup
            writer.close()  # the watcher handles what is pending (maybe a second signal), then returns
            self._watcher.join(timeout=5)
            reader.close()
            self._wakeup = self._watcher = None

    def _handle(self, signum: int, frame) -> None:
        self.requested = self.requested or signum

    def _watch(self, reader: socket.socket, caught: set[int]) -> None:
        seen = 0
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in caught:
                    continue
                seen += 1
                name = signal.Signals(signum).name
                if seen == 1:
                    # os.write, not print: the main thread may be printing to stderr too.
                    os.write(2, f"\nreceived {name}: finishing the current step and saving a "
                                "checkpoint; send it again to quit at once\n".encode())
                else:
                    os.write(2, f"\nreceived {name} again: quitting now; the checkpoints "
                                "already written are intact\n".encode())
                    os._exit(128 + signum)


# ---- outside the training loop ----------------------------------------------------------------
#
# Before a run's first step has finished there is nothing to save, so a signal then ends the
# process at once (exit 128 + signal) and leaves the run directory as it was. The command line
# installs a StartupGuard before its heavy imports. Its Python handler only records the signal:
# an exception raised at an arbitrary point (inside a C extension's import, a garbage-collection
# callback, XLA's compiler) can be swallowed, turned into an ImportError or even crash the
# interpreter. The signal number also reaches a watcher thread through ``signal.set_wakeup_fd``,
# at once even while the main thread sits in a long compilation; the watcher waits for any
# ``critical()`` section of the main thread (a few file operations on the run directory), runs
# the registered cleanups (releasing the run's lock, removing directories made for it), prints
# one line and ends the process with ``os._exit``: the same guarantees as a SIGKILL, which every
# writer in ode-lm already survives (atomic renames, torn lines skipped). While the training
# loop's InterruptGuard is installed the signals go to it instead (finish the step, checkpoint).


class EarlyInterrupt(KeyboardInterrupt):
    """A signal outside the training loop: before the first step (nothing written) or after it."""

    def __init__(self, signum: int, before_start: bool):
        self.signum, self.exit_status, self.before_start = signum, 128 + signum, before_start
        super().__init__(signal.Signals(signum).name)

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.before_start:
            return f"ode-lm: interrupted by {name} before the first training step; nothing was written"
        return f"ode-lm: interrupted by {name}"


class StartupGuard:
    """SIGINT/SIGTERM outside the training loop, for the command line (main thread only)."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.started = False  # a run's first step is done: a stop now is no longer "before it"
        self.forward: InterruptGuard | None = None  # the training loop's guard, while installed
        self._cleanups: list = []
        self._critical = threading.RLock()  # held by the main thread around file operations
        self._announce_lock = threading.Lock()
        self._announced = False
        self._wakeup: socket.socket | None = None
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    def install(self) -> "StartupGuard":
        global _startup
        if threading.current_thread() is not threading.main_thread():
            return self
        caught = set()
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup / background jobs: keep ignoring
                self._previous[signum] = signal.signal(signum, self._handle)
                caught.add(signum)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = writer
        threading.Thread(target=self._watch, args=(reader, caught), daemon=True,
                         name="ode-lm-startup-signals").start()
        _startup = self
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back (``main()`` called from Python, e.g. a test)."""
        global _startup
        if self._wakeup is None:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        self._wakeup.close()  # the watcher sees the end of its socket and returns
        self._wakeup, _startup = None, None

    def critical(self):
        """A block the watcher lets finish before it ends the process."""
        return self._critical

    def add_cleanup(self, fn) -> None:
        """Run ``fn()`` before the watcher ends the process (it must be safe from any thread)."""
        self._cleanups.append(fn)

    def remove_cleanup(self, fn) -> None:
        if fn in self._cleanups:
            self._cleanups.remove(fn)

    def announce(self, line: str) -> None:
        """Print the one line about the interruption (once, whichever thread gets here first)."""
        with self._announce_lock:
            if not self._announced:
                self._announced = True
                os.write(2, (line + "\n").encode())

    def _handle(self, signum: int, frame) -> None:
        self.pending = self.pending or signum  # the watcher acts on it

    def _watch(self, reader: socket.socket, caught: set[int]) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:  # uninstalled
                return
            signums = [s for s in data if s in caught]
            if signums:
                with self._critical:
                    if self.forward is not None:  # just handed over to the training loop's guard
                        self.forward.requested = self.forward.requested or signums[0]
                    else:
                        self._end(signums[0])

    def _end(self, signum: int) -> None:
        for fn in list(self._cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 - the process ends anyway; its lock dies with it
                pass
        self.announce(EarlyInterrupt(signum, before_start=not self.started).message())
        os._exit(128 + signum)


_startup: StartupGuard | None = None


def startup_guard() -> StartupGuard | None:
    """The StartupGuard the command line installed, if any (None in library use)."""
    return _startup


def pending_signal() -> int | None:
    """A signal received outside the training loop, if any (the process is stopping)."""
    return _startup.pending if _startup is not None else None


def signals_deferred():
    """``StartupGuard.critical`` of the installed guard; nothing to defer without one."""
    return _startup.critical() if _startup is not None else contextlib.nullcontext()
