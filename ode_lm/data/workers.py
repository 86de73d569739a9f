"""Tokenizing a large corpus in several processes.

Each worker is a ``python -c`` process running :func:`serve`: it reads a tokenizer state, then batches of
pieces, from its stdin and writes ``encode_pieces``'s result for each to its stdout (length-
prefixed pickles). Workers are plain subprocesses, so nothing of the calling program (its
``__main__``, JAX, threads) is re-imported or forked. Batches go round-robin with one in flight
per worker, and each worker's previous result is read before it is sent the next batch, so
results come back in order, memory stays bounded, and no pipe can fill both ways.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator


def _send(f: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _receive(f: BinaryIO) -> Any:
    header = f.read(8)
    if len(header) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", header)
    return pickle.loads(f.read(n))


class WorkerPool:
    """``workers`` tokenizer processes; ``map`` encodes batches in order."""

    def __init__(self, tokenizer_state: dict, workers: int):
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",  # the processes are the parallelism
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", "from ode_lm.data.workers import serve; serve()"]
        self.procs = [subprocess.Popen(command, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(workers)]
        for p in self.procs:
            _send(p.stdin, tokenizer_state)

    def map(self, batches: Iterable) -> Iterator:
        pending: deque = deque()
        for i, batch in enumerate(batches):
            worker = self.procs[i % len(self.procs)]
            if len(pending) == len(self.procs):  # this worker's previous batch, the oldest one
                yield self._result(pending.popleft())
            _send(worker.stdin, batch)
            pending.append(worker)
        while pending:
            yield self._result(pending.popleft())

    @staticmethod
    def _result(worker: subprocess.Popen) -> Any:
        try:
            return _receive(worker.stdout)
        except EOFError:
            raise RuntimeError(f"tokenizer worker {worker.pid} exited with status {worker.wait()} "
                               "(its error is printed above)") from None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if exc[0] is None:
                p.stdin.close()
            else:
                p.kill()
        for p in self.procs:
            p.wait()
            p.stdout.close()
            if not p.stdin.closed:
                p.stdin.close()


def serve() -> None:
    from ode_lm.data.dataset import encode_pieces
    from ode_lm.data.tokenizers import tokenizer_from_state

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    tokenizer = tokenizer_from_state(_receive(stdin))
    while True:
        try:
            batch = _receive(stdin)
        except EOFError:
            return
        _send(stdout, encode_pieces(tokenizer, batch))

