"""Checkpoints: one self-describing file per step, written atomically.

Layout of ``checkpoints/step_00000100.ckpt``::

    MAGIC (12 bytes) | header length (8 bytes, little endian) | header (JSON) | payload

The header holds the step, the resolved config, the tokenizer and the payload's length and
SHA-256; the payload is ``equinox.tree_serialise_leaves`` of ``(model, opt_state)``. A file
is written to a temporary name, fsynced and renamed (``files.atomic_write``), so a reader only
ever sees complete checkpoints, even after SIGKILL or a full disk; the hash catches truncation
and corruption by anything else. Resuming takes the newest file that verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx

from ode_lm.errors import CheckpointError
from ode_lm.train.files import atomic_write, remove_stale_temporaries

MAGIC = b"ODE-LM-CKPT1"
_NAME = re.compile(r"^step_(\d{8})\.ckpt$")


@dataclass
class CheckpointHeader:
    step: int
    config_toml: str
    tokenizer: dict
    payload_bytes: int
    payload_sha256: str


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.ckpt"


def save_checkpoint(run_dir: Path, step: int, state: Any, config_toml: str, tokenizer: dict,
                    keep: int) -> Path:
    """Write ``state`` (a pytree of arrays) for ``step``; keep the ``keep`` newest files."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    payload = buffer.getvalue()
    header = json.dumps({"step": step, "config_toml": config_toml, "tokenizer": tokenizer,
                         "payload_bytes": len(payload),
                         "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode()
    path = checkpoint_path(run_dir, step)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, ".step_*.ckpt.tmp-*")
        atomic_write(path, MAGIC + struct.pack("<Q", len(header)) + header + payload)
    except OSError as e:
        previous = list_checkpoints(run_dir)
        raise CheckpointError(f"could not write checkpoint {path}: {e}; the previous checkpoint "
                              f"{previous[-1] if previous else '(none)'} is kept") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        with contextlib.suppress(OSError):  # an extra old file is harmless
            old.unlink()
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def read_checkpoint(path: Path) -> tuple[CheckpointHeader, bytes]:
    """Header and verified payload of a checkpoint file; CheckpointError if it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an ode-lm checkpoint (wrong file signature)")
    try:
        (n,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        raw = json.loads(data[start:start + n])
        header = CheckpointHeader(**raw)
    except (struct.error, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted (unreadable header: {e})") from None
    payload = data[start + n:]
    if len(payload) != header.payload_bytes or hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise CheckpointError(f"{path} is truncated or corrupted ({len(payload)} of "
                              f"{header.payload_bytes} payload bytes, hash mismatch)")
    return header, payload


def restore_state(path: Path, payload: bytes, template: Any) -> Any:
    """Deserialise a payload into arrays shaped like ``template``."""
    try:
        return eqx.tree_deserialise_leaves(io.BytesIO(payload), template)
    except Exception as e:  # shape/dtype/structure mismatch: the config changed
        raise CheckpointError(f"{path} does not fit the configured model: {e}") from None


def latest_checkpoint(run_dir: Path, warn=print, set_aside: bool = False
                      ) -> tuple[Path, CheckpointHeader, bytes] | None:
    """The newest complete checkpoint of a run, skipping broken ones with a warning.

    With ``set_aside`` (a resuming trainer), a broken file newer than the one returned is
    renamed to ``<name>.corrupt``: kept for inspection, but no longer counted among the
    ``checkpoint.keep`` newest, where it would push good checkpoints out.
    """
    broken: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            header, payload = read_checkpoint(path)
        except CheckpointError as e:
            broken.append((path, e))
            continue
        for bad, e in broken:
            note = ""
            if set_aside:
                with contextlib.suppress(OSError):
                    bad.rename(bad.with_name(bad.name + ".corrupt"))
                    note = f" (renamed to {bad.name}.corrupt)"
            warn(f"skipping {e}{note}")
        return path, header, payload
    for _, e in broken:
        warn(f"skipping {e}")
    return None
