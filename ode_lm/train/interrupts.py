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
