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


# --- both formats: "file" (above) and "orbax" (orbax_checkpoint.py) ----------------------


def resolved_format(cfg) -> str:
    """``checkpoint.format`` with ``auto`` decided: orbax for an FSDP run, else file."""
    if cfg.checkpoint.format != "auto":
        return cfg.checkpoint.format
    return "orbax" if cfg.train.fsdp else "file"


@dataclass
class StoredCheckpoint:
    """A complete checkpoint of either format: where it is, what it records, how to load it."""

    path: Path
    format: str  # "file" or "orbax"
    step: int
    config_toml: str
    tokenizer: dict
    payload: bytes | None = None  # a file's verified payload
    leaves: list | None = None  # an orbax record's key paths

    def restore(self, template: Any, shardings: Any = None) -> Any:
        """The stored state in the structure of ``template``; with ``shardings`` (a matching
        tree of ``jax.sharding.Sharding``) laid out as they say, re-cut for this device count."""
        if self.format == "orbax":
            from ode_lm.train.orbax_checkpoint import restore_orbax
            return restore_orbax(self.path, {"leaves": self.leaves}, template, shardings)
        state = restore_state(self.path, self.payload, template)
        if shardings is None:
            return state
        from ode_lm.train.sharding import place
        return place(state, shardings)


def _from_file(path: Path, header: CheckpointHeader, payload: bytes) -> StoredCheckpoint:
    return StoredCheckpoint(path, "file", header.step, header.config_toml, header.tokenizer, payload=payload)


def _from_orbax(path: Path) -> StoredCheckpoint:
    from ode_lm.train.orbax_checkpoint import read_orbax_meta
    meta = read_orbax_meta(path)
    return StoredCheckpoint(path, "orbax", meta["step"], meta["config_toml"], meta["tokenizer"],
                            leaves=meta["leaves"])


def open_checkpoint(path: Path) -> StoredCheckpoint:
    """A checkpoint file or orbax step directory named by the user; CheckpointError if it is neither."""
    from ode_lm.train.orbax_checkpoint import is_orbax_step
    path = Path(path)
    if is_orbax_step(path):
        return _from_orbax(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory but no orbax checkpoint step "
                              "(expected checkpoints/orbax/step_NNNNNNNN or a step_NNNNNNNN.ckpt file)")
    return _from_file(path, *read_checkpoint(path))


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run in both formats (files, complete orbax steps), oldest step first."""
    from ode_lm.train.orbax_checkpoint import list_orbax
    return sorted(list_checkpoints(run_dir) + list_orbax(run_dir), key=lambda p: int(p.name[5:13]))


def newest_checkpoint(run_dir: Path, warn=print, set_aside: bool = False) -> StoredCheckpoint | None:
    """The newest complete checkpoint of a run in either format (``latest_checkpoint`` for
    files, the newest orbax step whose record reads); a run can switch formats on resume."""
    from ode_lm.train.orbax_checkpoint import list_orbax
    found = latest_checkpoint(run_dir, warn=warn, set_aside=set_aside)
    best = _from_file(*found) if found else None
    for path in reversed(list_orbax(run_dir)):
        if best is not None and int(path.name[5:]) <= best.step:
            break
        try:
            return _from_orbax(path)
        except CheckpointError as e:
            warn(f"skipping {e}")
    return best


class FileWriter:
    """``checkpoint.format = "file"``: process 0 writes the whole state into one file; the
    others wait. Sharded (FSDP) arrays of a multi-process run are gathered first."""

    def __init__(self, run_dir: Path, keep: int, lead: bool):
        self.run_dir, self.keep, self.lead = Path(run_dir), keep, lead

    def save(self, step: int, state: Any, config_toml: str, tokenizer: dict) -> Path:
        from ode_lm.train.parallel import barrier, local_copy
        state = local_copy(state)  # every process takes part in gathering sharded arrays
        path = checkpoint_path(self.run_dir, step)
        if self.lead:
            path = save_checkpoint(self.run_dir, step, state, config_toml, tokenizer, self.keep)
        barrier(f"ode-lm: checkpoint {step} written")  # before any process moves on or exits
        return path

    def wait(self) -> None:
        """Saves are complete when ``save`` returns."""

    def close(self) -> None:
        """Nothing in flight."""


def checkpoint_writer(cfg, run_dir: Path, lead: bool):
    """The writer of ``resolved_format(cfg)``: ``FileWriter`` or ``OrbaxWriter``."""
    if resolved_format(cfg) == "orbax":
        from ode_lm.train.orbax_checkpoint import OrbaxWriter
        return OrbaxWriter(run_dir, cfg.checkpoint.keep)
    return FileWriter(run_dir, cfg.checkpoint.keep, lead)
