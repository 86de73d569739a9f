"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, exit cleanly.

The first SIGINT or SIGTERM only sets a flag; the training loop finishes its current step,
writes a checkpoint at that step and raises :class:`TrainingInterrupted`. The first signal
also puts both signals back to the operating system's default action, so a second one ends
the process at once, even inside a long XLA computation. That is safe because checkpoints
only ever appear through atomic renames: the worst a second signal leaves behind is a
temporary file, removed by the next run.

The CLI exits with status 128 + the signal number (130 for SIGINT, 143 for SIGTERM), the
shell convention for "ended by this signal".
"""

from __future__ import annotations

import os
import signal
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
    ``train()``) the guard does nothing and signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.requested = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        # os.write, not print: the handler may run in the middle of a print to stderr.
        os.write(2, (f"\nreceived {signal.Signals(signum).name}: finishing the current step and "
                     "saving a checkpoint; send it again to quit at once\n").encode())
