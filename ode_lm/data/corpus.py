"""Corpus sources and the train/validation split.

A source lists documents without reading them: each :class:`Document` knows its key (what
the hash split looks at), its size in bytes and how to read a byte range of itself in blocks,
so a corpus is streamed, never held whole.

- ``python-stdlib``: the ``.py`` files of the running interpreter's standard library, the
  embedded default corpus (real text present on every Python install, so training works
  offline). Files in sorted order; the key is the path relative to the stdlib root.
- ``text``: local text files, directories (all files below) or globs, one document per file;
  ``val_paths`` names validation files the same way.
- ``hf``: a Hugging Face dataset, one document per row: a hub dataset by name / config /
  split, or a ``datasets`` builder (``json``, ``parquet``, ``csv``, ``text``) on local
  ``hf_data_files``; ``hf_val_split`` names its validation split.

The split (:func:`plan_split`) is given (``val_paths``, ``hf_val_split``) or cut from the one
corpus: ``documents`` holds out whole documents by the hash of their key, ``tail`` the last
``val_fraction`` of every document (contiguous, so no window straddles the two sides), and
``auto`` picks ``documents`` when the hash split holds out about ``val_fraction`` of the
text (between half and twice of it, with documents on both sides), ``tail`` otherwise.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ode_lm.config import DataConfig
from ode_lm.errors import DataError

BLOCK = 1 << 20  # bytes read at a time
CUT_SEARCH = 4096  # a tail cut moves forward to the next line end within this many bytes
CACHE_VERSION = 2


@dataclass(frozen=True)
class Document:
    key: str  # decides the hash split; also names the document in messages
    nbytes: int
    read: Callable[[int, int], Iterator[bytes]]  # blocks of bytes [start, stop)
    user_text: bool = True  # False: stdlib files, some deliberately not UTF-8 (kept losslessly)
    is_file: bool = True  # a file of data.paths: NUL bytes mean it is binary


@dataclass(frozen=True)
class Part:
    """The bytes ``[start, stop)`` of one document, on one side of the split."""

    doc: Document
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SplitPlan:
    train: list[Part]
    val: list[Part]
    method: str  # documents | tail | val_paths | hf_val_split
    reason: str  # one clause for the log line

    def describe(self) -> str:
        return f"split {self.method} ({self.reason})"


def is_validation(key: str, val_fraction: float) -> bool:
    """Stable split: a document is held out iff the hash of its key falls below the fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted; installed packages (site-packages) left out."""
    root, found = stdlib_root(), []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "site-packages"]
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(p for p in found if p.is_file())


def text_files(patterns: tuple[str, ...], key: str = "paths") -> list[Path]:
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
            raise DataError(f"[data] {key}: '{pattern}' matches no file (give files, "
                            "directories or globs of text files)")
        files.extend(found)
    return files


def hf_data_files(cfg: DataConfig) -> dict[str, list[str]]:
    """``hf_data_files`` entries ``path`` / ``split=path`` as ``{split: [files]}``."""
    out: dict[str, list[str]] = {}
    for entry in cfg.hf_data_files:
        split, eq, pattern = entry.partition("=")
        split, pattern = (split.strip(), pattern.strip()) if eq else ("train", entry)
        files = text_files((pattern,), key="hf_data_files")
        out.setdefault(split, []).extend(str(f) for f in files)
    return out


def fingerprint(cfg: DataConfig) -> str:
    """What the token cache depends on: the source and its files (size, mtime), the split
    settings and the tokenizer settings. Also checks that every named path exists."""
    desc: dict = {"source": cfg.source, "tokenizer": cfg.tokenizer, "val": cfg.val_fraction,
                  "split": cfg.split, "max_bytes": cfg.max_bytes, "version": CACHE_VERSION}
    if cfg.tokenizer == "bpe":
        desc["vocab_size"] = cfg.vocab_size
        if cfg.tokenizer_file:
            p = Path(cfg.tokenizer_file).expanduser()
            if not p.is_file():
                raise DataError(f"[data] tokenizer_file = \"{cfg.tokenizer_file}\": no such file (give a "
                                "Hugging Face tokenizer.json, e.g. runs/<run>/tokenizer.json of a BPE run)")
            desc["tokenizer_file"] = hashlib.sha256(p.read_bytes()).hexdigest()
    if cfg.source == "python-stdlib":
        desc["files"] = [_stat(f) for f in stdlib_files()]
    elif cfg.source == "text":
        desc["files"] = [_stat(f) for f in text_files(cfg.paths)]
        desc["val_files"] = [_stat(f) for f in text_files(cfg.val_paths, "val_paths")]
    else:
        desc["hf"] = [cfg.hf_name, cfg.hf_config, cfg.hf_split, cfg.hf_val_split, cfg.text_field]
        desc["data_files"] = {s: [_stat(Path(f)) for f in fs] for s, fs in hf_data_files(cfg).items()}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def _stat(f: Path) -> tuple:
    st = f.stat()
    return (str(f.resolve()), st.st_size, st.st_mtime_ns)


def _file_reader(path: Path) -> Callable[[int, int], Iterator[bytes]]:
    def read(start: int, stop: int) -> Iterator[bytes]:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                while start < stop:
                    block = f.read(min(BLOCK, stop - start))
                    if not block:
                        return
                    start += len(block)
                    yield block
        except OSError as e:
            raise DataError(f"[data] cannot read {path}: {e.strerror or e}") from None
    return read


def _file_documents(files: list[Path], user_text: bool, root: Path | None = None) -> list[Document]:
    return [Document(str(f.relative_to(root)) if root else str(f), f.stat().st_size, _file_reader(f),
                     user_text=user_text) for f in files]


def _capped(docs: list[Document], max_bytes: int) -> list[Document]:
    """The first documents up to (and including) the one that reaches ``max_bytes``."""
    if not max_bytes:
        return docs
    out, total = [], 0
    for d in docs:
        out.append(d)
        total += d.nbytes
        if total >= max_bytes:
            break
    return out


def documents(cfg: DataConfig, side: str = "train") -> list[Document]:
    """The documents of the configured source; ``side = "val"`` for the given validation ones."""
    if cfg.source == "python-stdlib":
        files = stdlib_files()
        if not files:
            raise DataError(f"data.source = \"python-stdlib\": no .py files under {stdlib_root()}; "
                            "use data.source = \"text\" with your own files")
        return _capped(_file_documents(files, False, stdlib_root()), cfg.max_bytes)
    if cfg.source == "text":
        val = text_files(cfg.val_paths, "val_paths")
        if side == "val":
            return _capped(_file_documents(val, True), cfg.max_bytes)
        held_out = {f.resolve() for f in val}
        train = [f for f in text_files(cfg.paths) if f.resolve() not in held_out]
        if not train:
            raise DataError("[data] every file of paths is also in val_paths: no training text left")
        return _capped(_file_documents(train, True), cfg.max_bytes)
    from ode_lm.data.hub import hf_documents  # datasets is a heavy import: only for this source

    return _capped(hf_documents(cfg, cfg.hf_val_split if side == "val" else cfg.hf_split), cfg.max_bytes)


def plan_split(cfg: DataConfig) -> SplitPlan:
    """Which bytes of which documents are training and which validation text."""
    docs = documents(cfg)
    if cfg.val_paths or cfg.hf_val_split:
        given = "val_paths" if cfg.val_paths else "hf_val_split"
        val = documents(cfg, "val")
        _check_not_empty(cfg, docs, "training")
        _check_not_empty(cfg, val, "validation")
        what = (f"{len(val)} validation file(s)" if cfg.val_paths else f"'{cfg.hf_val_split}' split")
        return SplitPlan(_whole(docs), _whole(val), given, f"{what} as given, {len(docs)} training documents")
    _check_not_empty(cfg, docs, "")
    f = cfg.val_fraction
    held = [is_validation(d.key, f) for d in docs]
    share = sum(d.nbytes for d, h in zip(docs, held) if h) / sum(d.nbytes for d in docs)
    docs_with_text = [d for d in docs if d.nbytes]
    fits = any(held) and not all(held) and f / 2 <= share <= 2 * f
    if cfg.split == "documents" and (not any(held) or all(held)):
        which = "none" if not any(held) else "all"
        raise DataError(f"[data] split = \"documents\" held out {which} of the {len(docs)} documents at "
                        f"val_fraction = {f}; use split = \"tail\" (or \"auto\"), "
                        f"{'raise' if which == 'none' else 'lower'} val_fraction, "
                        "or give validation files (val_paths)")
    if cfg.split == "documents" or (cfg.split == "auto" and fits):
        train = [d for d, h in zip(docs, held) if not h]
        val = [d for d, h in zip(docs, held) if h]
        note = "auto: " if cfg.split == "auto" else ""
        return SplitPlan(_whole(train), _whole(val), "documents",
                         f"{note}{len(val)} of {len(docs)} documents held out by name, {share:.1%} of the bytes")
    train, val = [], []
    for d in docs_with_text:
        cut = _tail_cut(d, f)
        train.append(Part(d, 0, cut))
        val.append(Part(d, cut, d.nbytes))
    note = (f"auto: {len(docs_with_text)} document(s), too few to hold out whole ones; " if cfg.split == "auto" else "")
    return SplitPlan([p for p in train if p.nbytes], [p for p in val if p.nbytes], "tail",
                     f"{note}the last {f:.0%} of every document held out")


def _whole(docs: list[Document]) -> list[Part]:
    return [Part(d, 0, d.nbytes) for d in docs]


def _check_not_empty(cfg: DataConfig, docs: list[Document], side: str) -> None:
    if any(d.nbytes for d in docs):
        return
    where = {"python-stdlib": "the standard library", "text": "data.val_paths" if side == "validation"
             else "data.paths", "hf": f"the Hugging Face dataset '{cfg.hf_name}'"}[cfg.source]
    raise DataError(f"[data] the {side + ' ' if side else ''}corpus is empty: {where} holds no text "
                    "(every file or row has 0 bytes); give files or rows with text")


def _tail_cut(doc: Document, f: float) -> int:
    """Where the held-out tail of ``doc`` starts: ``(1 - f)`` of its bytes, moved forward to
    just after the next line end (or to the next UTF-8 character boundary)."""
    cut = int(doc.nbytes * (1 - f))
    ahead = b"".join(doc.read(cut, min(doc.nbytes, cut + CUT_SEARCH)))
    newline = ahead.find(b"\n")
    if newline >= 0 and cut + newline + 1 < doc.nbytes:
        return cut + newline + 1
    skip = 0
    while skip < len(ahead) and ahead[skip] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        skip += 1
    return cut + skip
