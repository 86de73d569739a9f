"""Corpus sources. Each yields documents ``(key, text)``; ``key`` decides the train/val split.

- ``python-stdlib``: the ``.py`` files of the running interpreter's standard library, the
  embedded default corpus (real text present on every Python install, so training works
  offline). Files in sorted order; the key is the path relative to the stdlib root.
- ``text``: local text files, directories (all files below) or globs, read through the
  ``datasets`` text loader, one document per file.
- ``hf``: a Hugging Face hub dataset by name / config / split, one document per row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ode_lm.config import DataConfig
from ode_lm.errors import DataError


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def is_validation(key: str, val_fraction: float) -> bool:
    """Stable split: a document is held out iff the hash of its key falls below the fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.relative_to(root).parts and p.is_file())


def text_files(patterns: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
        if not found:
            raise DataError(f"[data] paths: '{pattern}' matches no file (give files, "
                            "directories or globs of text files)")
        files.extend(found)
    return files


def fingerprint(cfg: DataConfig) -> str:
    """What the tokenized cache depends on: the source, its files (size, mtime) and split."""
    desc: dict = {"source": cfg.source, "tokenizer": cfg.tokenizer, "val": cfg.val_fraction,
                  "max_bytes": cfg.max_bytes, "version": 1}
    if cfg.source == "python-stdlib":
        files = stdlib_files()
        desc["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    elif cfg.source == "text":
        desc["files"] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in text_files(cfg.paths)]
        desc["field"] = cfg.text_field
    else:
        desc["hf"] = [cfg.hf_name, cfg.hf_config, cfg.hf_split, cfg.text_field]
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Documents of the configured source, stopping once ``max_bytes`` have been read."""
    total = 0
    for doc in _SOURCES[cfg.source](cfg):
        yield doc
        total += len(doc.text.encode("utf-8", "surrogateescape"))
        if cfg.max_bytes and total >= cfg.max_bytes:
            return


def _python_stdlib(cfg: DataConfig) -> Iterator[Document]:
    root = stdlib_root()
    files = stdlib_files()
    if not files:
        raise DataError(f"data.source = \"python-stdlib\": no .py files under {root}; "
                        "use data.source = \"text\" with your own files")
    for f in files:
        # Some stdlib test files are deliberately not UTF-8; keep their bytes losslessly.
        yield Document(str(f.relative_to(root)), f.read_bytes().decode("utf-8", "surrogateescape"))


def _text(cfg: DataConfig) -> Iterator[Document]:
    files = text_files(cfg.paths)
    import datasets  # heavy import, only for this source

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("text", data_files={"train": [str(f) for f in files]},
                                   sample_by="document", split="train")
    except Exception as e:  # datasets raises many types; all mean "cannot read these files"
        raise DataError(f"[data] paths: could not read the text files through datasets: {e}") from None
    rows = ds["text"]
    keys = [str(f) for f in files] if len(rows) == len(files) else [r for r in rows]
    for key, text in zip(keys, rows):
        yield Document(key, text)


def _hf(cfg: DataConfig) -> Iterator[Document]:
    import datasets

    datasets.disable_progress_bars()
    name = f"'{cfg.hf_name}'" + (f" config '{cfg.hf_config}'" if cfg.hf_config else "")
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=cfg.hf_split)
    except Exception as e:
        raise DataError(f"[data] could not load the Hugging Face dataset {name} split "
                        f"'{cfg.hf_split}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                        "The hub needs network access (or a filled local cache); offline, use "
                        "data.source = \"python-stdlib\" or \"text\"") from None
    if cfg.text_field not in ds.column_names:
        raise DataError(f"[data] text_field = \"{cfg.text_field}\" is not a column of {name}; "
                        f"columns are {', '.join(ds.column_names)}")
    for i, text in enumerate(ds[cfg.text_field]):
        yield Document(f"{cfg.hf_name}/{cfg.hf_config}/{cfg.hf_split}/{i}:{text[:64]}", text)


_SOURCES = {"python-stdlib": _python_stdlib, "text": _text, "hf": _hf}
