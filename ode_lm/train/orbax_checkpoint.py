"""Sharded checkpoints with orbax-checkpoint (``checkpoint.format = "orbax"``).

Layout of ``checkpoints/orbax/step_00000100/``::

    state/   the arrays of (model, opt_state), leaf i under the name "%05d" % i; every
             process writes the slices its devices own (tensorstore, OCDBT)
    meta/    JSON: step, the resolved config, the tokenizer and the leaves' key paths

A save copies the arrays to host memory and returns; the files are written by a background
thread while training goes on (the next save, and the end of the run, wait for it). Orbax
writes into ``step_00000100.orbax-checkpoint-tmp`` and renames it to its final name only when
every process has written everything, so a step directory under its final name is complete:
a SIGKILL mid-save leaves the temporary directory (removed by the next run's writer), and the
previous step restores. A restore reads each array straight into the shardings asked for, so
a run saved on N devices resumes on any other number (the slices are re-cut on load).

Unlike a checkpoint file, the payload carries no hash: a step directory damaged after it
was written fails on restore with a CheckpointError naming it.
"""

from __future__ import annotations

import gc
import io
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax

from ode_lm.errors import CheckpointError, ConfigError

_NAME = re.compile(r"^step_(\d{8})$")
_ITEMS = ("state", "meta")


def orbax_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "orbax"


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ConfigError("[checkpoint] format = \"orbax\" (the default with train.fsdp = true) needs "
                          "orbax-checkpoint: pip install 'ode-lm[fsdp]', or set "
                          "checkpoint.format = \"file\"") from None
    return ocp


def _options(ocp, **kw):
    return ocp.CheckpointManagerOptions(step_prefix="step", step_format_fixed_length=8, **kw)


def list_orbax(run_dir: Path) -> list[Path]:
    """Complete orbax step directories of a run, oldest first (temporaries are not listed)."""
    d = orbax_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name) and p.is_dir()), key=lambda p: p.name)


def is_orbax_step(path: Path) -> bool:
    return Path(path).is_dir() and bool(_NAME.match(Path(path).name))


def _reason(e: Exception) -> str:
    """The first line of an orbax / tensorstore error, without the store specs it appends."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    for tail in (" [tensorstore_spec", " See full TensorStore details"):
        text = text.split(tail)[0]
    return f"{type(e).__name__}: {text[:300]}"


class _Quiet:
    """Keeps orbax's side channels out of the terminal while it reads a step: absl's notices
    about the read-only options it adjusts and, when a damaged step fails, the errors of the
    reads it leaves behind: "Exception ignored in <coroutine>" as they are collected, and the
    tracebacks tensorstore's threads print when they complete into the closed event loop.
    What reaches ``sys.stderr`` in the meantime is kept and written out after a successful
    read; after a failed one it is dropped (the failure reaches the caller as one exception),
    once the leftover reads have gone quiet, and the filter of orbax's coroutines stays
    installed: orbax's reading thread may release them after the caller has moved on."""

    DRAIN_S = 0.2  # a failed read is over once nothing more was printed for this long
    failed = False  # set by the reader when orbax raised

    def __enter__(self):
        self.loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
        self.levels = [logger.level for logger in self.loggers]
        self.stderr, self.hook = sys.stderr, sys.unraisablehook
        for logger in self.loggers:
            logger.setLevel(logging.CRITICAL)
        sys.stderr, sys.unraisablehook = io.StringIO(), self._unraisable
        return self

    def _unraisable(self, unraisable):
        if "orbax" not in getattr(getattr(unraisable.object, "cr_code", None), "co_filename", ""):
            self.hook(unraisable)

    def _drain(self):
        seen = -1
        while seen != len(sys.stderr.getvalue()):
            seen = len(sys.stderr.getvalue())
            gc.collect()
            time.sleep(self.DRAIN_S)

    def __exit__(self, kind, error, trace):
        failed = kind is not None or self.failed
        if failed:
            self._drain()
        captured, sys.stderr = sys.stderr.getvalue(), self.stderr
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
        if not failed:
            sys.unraisablehook = self.hook
            sys.stderr.write(captured)
        return False


class _ReadFailed(Exception):
    """orbax could not read a step; the message is ``_reason`` of its error."""


def _restore(path: Path, args) -> dict:
    """Items of step directory ``path`` by ``args`` (an ``ocp.args.Composite``), read only;
    raises ``_ReadFailed`` once orbax's own exception (and the reads it holds) is released."""
    ocp = _ocp()
    reason = None
    with _Quiet() as quiet:
        # orbax takes absolute directories only; a run named relative to the working
        # directory (`ode-lm generate runs/quickstart`) is resolved here.
        manager = ocp.CheckpointManager(path.parent.absolute(), options=_options(ocp, read_only=True),
                                        item_names=_ITEMS)
        try:
            return manager.restore(int(_NAME.match(path.name).group(1)), args=args)
        except Exception as e:  # orbax raises many kinds for a damaged directory
            reason, quiet.failed = _reason(e), True
        finally:
            manager.close()
    raise _ReadFailed(reason)


def _leaf_names(state: Any) -> list[str]:
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def read_orbax_meta(path: Path) -> dict:
    """The JSON record of a step directory: step, config_toml, tokenizer, leaves."""
    ocp = _ocp()
    path = Path(path)
    step = int(_NAME.match(path.name).group(1))
    try:
        meta = _restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except _ReadFailed as e:
        raise CheckpointError(f"{path} is not a readable orbax checkpoint ({e})") from None
    if not isinstance(meta, dict) or meta.get("step") != step:
        raise CheckpointError(f"{path} is not an ode-lm orbax checkpoint (its record names no step {step})")
    return meta


def restore_orbax(path: Path, meta: dict, template: Any, shardings: Any) -> Any:
    """The arrays of step directory ``path`` in the structure of ``template``, each read
    directly into its sharding of ``shardings`` (a matching tree; ``None``: this process's
    first device)."""
    ocp = _ocp()
    path = Path(path)
    leaves, treedef = jax.tree.flatten(template)
    names = _leaf_names(template)
    if meta.get("leaves") != names:
        raise CheckpointError(f"{path} does not fit the configured model: it holds "
                              f"{len(meta.get('leaves', []))} arrays, the model and optimizer "
                              f"{len(names)} (or other ones)")
    if shardings is None:
        targets = [jax.sharding.SingleDeviceSharding(jax.local_devices()[0])] * len(leaves)
    else:
        targets = jax.tree.leaves(shardings)
    abstract = {f"{i:05d}": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)
                for i, (leaf, target) in enumerate(zip(leaves, targets))}
    try:
        arrays = _restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except _ReadFailed as e:
        raise CheckpointError(f"{path} does not fit the configured model or is damaged ({e}); "
                              "move it away to use the previous step") from None
    for i, leaf in enumerate(leaves):
        got = arrays[f"{i:05d}"]
        if got.shape != leaf.shape or got.dtype != leaf.dtype:
            raise CheckpointError(f"{path} does not fit the configured model: {names[i]} is "
                                  f"{got.dtype}{list(got.shape)}, the model's {leaf.dtype}{list(leaf.shape)}")
    return jax.tree.unflatten(treedef, [arrays[f"{i:05d}"] for i in range(len(leaves))])


class OrbaxWriter:
    """Asynchronous sharded saves into ``checkpoints/orbax``; every process calls ``save``
    with the same step (each writes its own slices), and ``close`` at the end."""

    def __init__(self, run_dir: Path, keep: int):
        self._ocp, self.directory, self.keep = _ocp(), orbax_dir(run_dir), keep
        self._manager = None  # made by the first save: the run directory is not touched before

    def save(self, step: int, state: Any, config_toml: str, tokenizer: dict) -> Path:
        """Start saving ``state`` for ``step`` (waits for the previous save first); returns the
        step directory it will have once complete."""
        ocp = self._ocp
        if self._manager is None:  # creating it removes the temporaries of saves a SIGKILL cut short
            self._manager = ocp.CheckpointManager(
                self.directory.absolute(), item_names=_ITEMS,  # orbax takes absolute paths only
                options=_options(ocp, max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
                                 enable_async_checkpointing=True))
        arrays = {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}
        meta = {"step": step, "config_toml": config_toml, "tokenizer": tokenizer, "format": "orbax",
                "leaves": _leaf_names(state)}
        try:
            self._manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {self.directory}/step_{step:08d}: {e}; "
                                  "the previous checkpoint is kept") from None
        return self.directory / f"step_{step:08d}"

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete and renamed into place."""
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"could not finish writing a checkpoint in {self.directory}: {e}; "
                                  "the previous checkpoint is kept") from None

    def close(self) -> None:
        self.wait()
        if self._manager is not None:
            self._manager.close()
            self._manager = None
