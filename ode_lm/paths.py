"""Paths ode-lm deletes or overwrites: the rules that keep a typo from destroying data.

ode-lm replaces run directories (``--overwrite``) and writes reports into output directories
(``ablate --out``, ``analyze --out``). Every such path is checked here before anything is
touched:

- a directory *name* (``train.run_name``) is one plain path component: not empty, not ``.``
  or ``..``, no ``/`` or ``\\``, no NUL or other control character, at most 255 bytes. So
  ``runs_dir / name`` is always a child of ``runs_dir``, never ``runs_dir`` itself, its parent
  or an absolute path elsewhere;
- an output *directory* may be relative or absolute, but its last component is a plain
  name (not ``.``, ``..`` or ``/``), it is not an existing file, and an existing non-empty
  directory must already be one of ode-lm's outputs (it holds :data:`OUTPUT_MARKER` or one
  of the ``markers`` files), so ``--out ~`` cannot scatter reports over a home directory.

Kept free of JAX so the config loader can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ode_lm.errors import RunDirError, UserError

# Written into every output directory ode-lm creates, so that a later run knows it is ode-lm's.
OUTPUT_MARKER = ".ode-lm-output"
NAME_MAX = 255  # bytes in one path component on common filesystems (ext4, xfs, apfs, tmpfs)


def plain_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain directory name, or None when it is one."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r} (the current or the parent directory, not a name)"
    bad = sorted({c for c in name if c in "/\\" or (os.altsep and c == os.altsep)})
    if bad:
        return f"contains the path separator {' '.join(map(repr, bad))}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character (e.g. a newline, tab or NUL)"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    return None


def check_dir_name(name: str, what: str) -> str:
    """``name`` if it is a plain directory name (see the module docstring), else UserError.

    ``what`` names the setting in the message, e.g. ``"[train] run_name"``.
    """
    problem = plain_name_problem(name)
    if problem:
        raise UserError(f"{what} = {name!r} {problem}; it must be one plain directory name "
                        "(letters, digits, '-', '_', '.'; no '/', not '.' or '..'), e.g. \"quickstart\"")
    return name


def child_dir(parent: str | Path, name: str, what: str) -> Path:
    """``parent / name`` for a checked plain ``name``: always strictly inside ``parent``."""
    return Path(parent) / check_dir_name(name, what)


def check_output_dir(path: str | Path, what: str, markers: Iterable[str] = ()) -> Path:
    """``path`` as a Path if ode-lm may write (and overwrite) its outputs there, else UserError.

    ``markers``: file names that only ode-lm's own output holds there (e.g. ``results.jsonl``
    of an ablation), besides :data:`OUTPUT_MARKER`; an existing non-empty directory without
    any of them is refused.
    """
    text = os.fspath(path)
    if not text.strip():
        raise UserError(f"{what} is empty; give a directory for the outputs, e.g. runs/ablations/mine")
    last = text.replace("\\", "/").rstrip("/").rpartition("/")[2]
    if plain_name_problem(last):  # ".", "..", "/", "runs/..": the outputs would land in a parent
        raise UserError(f"{what} = {text!r} does not end in a plain directory name (its last "
                        f"component {last!r} {plain_name_problem(last)}); name the directory itself, "
                        "e.g. runs/ablations/mine")
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} = {text!r} is an existing file, not a directory; choose another path")
    markers = (OUTPUT_MARKER, *markers)
    if out.is_dir():
        try:
            entries = {p.name for p in out.iterdir()}
        except OSError as e:
            raise UserError(f"{what} = {text!r} cannot be read: {e}") from None
        if entries and not entries & set(markers):
            raise UserError(f"{what} = {text!r} is a non-empty directory that is not an ode-lm output "
                            f"(it holds none of {', '.join(markers)}); choose a new or an empty directory")
    return out


def prepare_output_dir(path: str | Path, what: str, markers: Iterable[str] = ()) -> Path:
    """:func:`check_output_dir`, then create the directory and mark it as ode-lm's output."""
    out = check_output_dir(path, what, markers)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / OUTPUT_MARKER).touch()
    except OSError as e:
        raise RunDirError(f"cannot create the output directory {out}: {e}") from None
    return out
