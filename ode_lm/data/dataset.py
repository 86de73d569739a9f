"""Tokenize a corpus once, cache it as memory-mapped arrays, and sample training windows.

The cache lives under ``data.cache_dir/<fingerprint>/`` (``train.bin``, ``val.bin``,
``meta.json``) and is keyed by the corpus (files, sizes, mtimes or the dataset), the split
and the tokenizer settings, so a changed corpus is re-tokenized. It is built in a
``.building-*`` directory renamed into place when complete (a reader never sees half a cache;
a failed build leaves nothing behind), and checked when opened: a damaged cache (short
``.bin`` files, unreadable ``meta.json``) is rebuilt.

Tokenization streams: documents are read in blocks of ``corpus.BLOCK`` bytes, encoded in
batches (in ``data.workers`` processes for a large corpus, char and BPE tokens) and appended
to the ``.bin`` files, ids stored as uint8 / uint16 / uint32 by vocabulary size.

Batches are a pure function of ``(seed, step)``: the data iterator's whole state is the step
number, which makes resumed runs see exactly the batches they would have.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ode_lm.config import DataConfig
from ode_lm.data.corpus import CACHE_VERSION, Part, SplitPlan, fingerprint, plan_split
from ode_lm.data.tokenizers import (SEPARATOR, BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer,
                                    tokenizer_from_state)
from ode_lm.data.workers import WorkerPool
from ode_lm.errors import DataError

BATCH_BYTES = 1 << 18  # text encoded per task: bounds the encoder's working memory (BPE: ~60 bytes per byte)
PIECE_CHARS = 1 << 16  # BPE text is encoded in pieces of about this size, cut at line ends
PARALLEL_BYTES = 64 * 2**20  # a split at least this large is encoded in several processes
MAX_WORKERS = 8
DTYPES = ("uint8", "uint16", "uint32")
Piece = bytes | str | None  # None: the boundary between two documents


@dataclass
class TokenizedCorpus:
    train: np.ndarray  # [n_train] token ids (memory-mapped)
    val: np.ndarray  # [n_val]
    tokenizer: Tokenizer
    bytes_per_token: float  # of the validation text, for bits per byte
    path: Path
    split: str = ""  # how train and validation were divided, for messages

    def describe(self) -> str:
        return (f"{len(self.train):,} train / {len(self.val):,} val tokens, {self.split}, vocab "
                f"{self.tokenizer.vocab_size} ({self.tokenizer.name}, {self.bytes_per_token:.2f} "
                f"bytes/token), cached at {self.path}")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None,
                warn: Callable[[str], None] = _warn) -> TokenizedCorpus:
    """The tokenized corpus from the cache, built first if needed. With ``tokenizer`` (a
    trained run's), the corpus is tokenized with it rather than with a new one."""
    root = Path(cfg.cache_dir).expanduser()
    path = root / fingerprint(cfg)
    corpus = _open_or_discard(path, warn)
    if tokenizer is not None and (corpus is None or corpus.tokenizer.state() != tokenizer.state()):
        digest = hashlib.sha256(json.dumps(tokenizer.state(), sort_keys=True).encode()).hexdigest()[:12]
        path = root / f"{path.name}-{digest}"
        corpus = _open_or_discard(path, warn)
    if corpus is None:
        _build(cfg, path, tokenizer)
        corpus = _open(path)
    return corpus


class _Damaged(Exception):
    """A cache directory whose files do not describe a whole tokenized corpus."""


def _open_or_discard(path: Path, warn: Callable[[str], None]) -> TokenizedCorpus | None:
    """The cached corpus at ``path``; None if there is none or it was damaged (then removed)."""
    if not path.exists():
        return None
    try:
        return _open(path)
    except _Damaged as e:
        warn(f"the token cache {path} is damaged ({e}); rebuilding it")
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise DataError(f"[data] the token cache {path} is damaged and cannot be removed ({e.strerror}); "
                        "delete it by hand or set data.cache_dir elsewhere") from None
    return None


def _open(path: Path) -> TokenizedCorpus:
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"]) if meta["dtype"] in DTYPES else None
        counts = {s: meta[f"{s}_tokens"] for s in ("train", "val")}
        bytes_per_token = meta["val_bytes"] / max(counts["val"], 1)
        tokenizer = tokenizer_from_state(meta["tokenizer"])
        split = str(meta["split"])
    except (OSError, ValueError, KeyError, TypeError, DataError) as e:
        raise _Damaged(f"meta.json unreadable: {type(e).__name__}: {str(e)[:80]}") from None
    if meta.get("version") != CACHE_VERSION or dtype is None or not all(
            isinstance(n, int) and n >= 0 for n in counts.values()):
        raise _Damaged("meta.json does not describe a version-%d cache" % CACHE_VERSION)
    arrays = {}
    for split_name, n in counts.items():
        file = path / f"{split_name}.bin"
        size = file.stat().st_size if file.is_file() else -1
        if size != n * dtype.itemsize:
            raise _Damaged(f"{file.name} holds {max(size, 0):,} bytes, meta.json says {n * dtype.itemsize:,}")
        arrays[split_name] = (np.memmap(file, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros((0,), dtype))
    return TokenizedCorpus(arrays["train"], arrays["val"], tokenizer, bytes_per_token, path, split)


def _build(cfg: DataConfig, path: Path, tokenizer: Tokenizer | None) -> None:
    plan = plan_split(cfg)
    tokenizer = tokenizer or _make_tokenizer(cfg, plan)
    vocab = tokenizer.vocab_size
    dtype = np.dtype("uint8" if vocab <= 2**8 else "uint16" if vocab <= 2**16 else "uint32")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
        meta: dict = {"version": CACHE_VERSION, "dtype": dtype.name, "split": plan.describe(),
                      "tokenizer": tokenizer.state()}
        total = sum(p.nbytes for p in plan.train + plan.val)
        with tqdm(total=total, desc="tokenizing", unit="B", unit_scale=True, dynamic_ncols=True,
                  disable=None, leave=False) as bar:
            for side, parts in (("train", plan.train), ("val", plan.val)):
                n, nbytes = _write_tokens(tmp / f"{side}.bin", tokenizer, parts, dtype, cfg.workers, bar)
                meta[f"{side}_tokens"], meta[f"{side}_bytes"] = n, nbytes
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.replace(tmp, path)  # atomic: a half-built cache is never seen
        except OSError:
            if not path.exists():
                raise
        # else another process built it first; ours is removed below
    except OSError as e:
        raise DataError(f"[data] cannot write the token cache in {path.parent}: {e.strerror or e}; free "
                        "disk space or set data.cache_dir to a writable directory with room") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_tokenizer(cfg: DataConfig, plan: SplitPlan) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "char":  # the alphabet of both sides, so no validation text is unknown
        return CharTokenizer.from_texts(itertools.chain([SEPARATOR], _texts(plan.train + plan.val)))
    if cfg.tokenizer_file:
        return BPETokenizer.from_file(cfg.tokenizer_file)
    total = sum(p.nbytes for p in plan.train)
    with tqdm(total=total, desc="training BPE", unit="B", unit_scale=True, dynamic_ncols=True,
              disable=None, leave=False) as bar:
        def texts():
            for text in _lines(_pieces(plan.train, as_text=True)):
                if text is not None:
                    bar.update(len(text.encode("utf-8", "surrogateescape")))
                    yield text
        return BPETokenizer.train(texts(), cfg.vocab_size)


def _texts(parts: list[Part]) -> Iterator[str]:
    return (p for p in _pieces(parts, as_text=True) if isinstance(p, str))


def _pieces(parts: list[Part], as_text: bool) -> Iterator[Piece]:
    """The parts' contents in blocks (bytes, or text when ``as_text``), None between parts."""
    for i, part in enumerate(parts):
        if i:
            yield None
        yield from _part_pieces(part, as_text)


def _part_pieces(part: Part, as_text: bool) -> Iterator[bytes | str]:
    doc, offset, carry = part.doc, part.start, b""
    for block in doc.read(part.start, part.stop):
        if doc.is_file and doc.user_text and (nul := block.find(b"\0")) >= 0:
            raise DataError(f"[data] {doc.key} is a binary file (a NUL byte at byte offset {offset + nul:,}), "
                            "not text; remove it from data.paths (or narrow the glob to text files)")
        offset += len(block)
        if not as_text:
            yield block
            continue
        data = carry + block
        text, used = _decode(part, data, offset - len(data), final=False)
        carry = data[used:]
        if text:
            yield text
    if carry:
        yield _decode(part, carry, offset - len(carry), final=True)[0]


def _decode(part: Part, data: bytes, at: int, final: bool) -> tuple[str, int]:
    """UTF-8 text of ``data`` (which starts at byte ``at`` of its document) and the bytes
    used; an incomplete character at the end waits for the next block unless ``final``."""
    try:
        return codecs.utf_8_decode(data, "strict" if part.doc.user_text else "surrogateescape", final)
    except UnicodeDecodeError as e:
        raise DataError(f"[data] {part.doc.key} is not UTF-8 text: byte offset {at + e.start:,} holds "
                        f"{data[e.start:e.start + 4]!r}; data.tokenizer = \"byte\" reads any bytes, or "
                        "convert the file to UTF-8") from None


def _lines(pieces: Iterable[Piece], size: int = PIECE_CHARS) -> Iterator[Piece]:
    """Text re-cut into pieces of about ``size`` characters that end at a line end (BPE
    merges never span one), or of ``4 * size`` in a text without line ends; one batch of
    pieces is encoded by several threads."""
    longest, buffer = 4 * size, ""
    for piece in pieces:
        if piece is None:
            if buffer:
                yield buffer
            buffer = ""
            yield None
            continue
        buffer += piece
        while len(buffer) >= size:
            end = buffer.rfind("\n", 0, size) + 1 or buffer.find("\n", size, longest) + 1
            if not end:
                if len(buffer) < longest:
                    break
                end = longest
            yield buffer[:end]
            buffer = buffer[end:]
    if buffer:
        yield buffer


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece) if piece is not None else 0
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_pieces(tokenizer: Tokenizer, batch: list[Piece]) -> tuple[np.ndarray, int]:
    """Token ids of a batch of pieces (document separators included) and its bytes of text."""
    separator, separator_bytes = tokenizer.separator()
    texts = [p for p in batch if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts) if isinstance(tokenizer, BPETokenizer)
                   else [tokenizer.encode(t) for t in texts])
    arrays, nbytes = [], 0
    for piece in batch:
        if piece is None:
            arrays.append(separator)
            nbytes += separator_bytes
        elif isinstance(piece, bytes):
            arrays.append(tokenizer.encode(piece))
            nbytes += len(piece)
        else:
            arrays.append(next(encoded))
            nbytes += len(piece.encode("utf-8", "surrogateescape"))
    return (np.concatenate(arrays) if arrays else np.zeros((0,), np.int32)), nbytes


def _write_tokens(file: Path, tokenizer: Tokenizer, parts: list[Part], dtype: np.dtype, workers: int,
                  bar) -> tuple[int, int]:
    """Encode ``parts`` into ``file``; the number of tokens and of bytes of text."""
    as_text = not isinstance(tokenizer, ByteTokenizer)
    pieces = _pieces(parts, as_text)
    if isinstance(tokenizer, BPETokenizer):
        pieces = _lines(pieces)
    size = sum(p.nbytes for p in parts)
    n = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    parallel = as_text and n > 1 and size >= PARALLEL_BYTES
    with WorkerPool(tokenizer.state(), n) if parallel else contextlib.nullcontext() as pool:
        encoded = (pool.map(_batches(pieces)) if pool is not None
                   else (encode_pieces(tokenizer, b) for b in _batches(pieces)))
        tokens = nbytes = 0
        with open(file, "wb") as f:
            for ids, k in encoded:
                f.write(ids.astype(dtype).tobytes())
                tokens, nbytes = tokens + ids.size, nbytes + k
                bar.update(k)
    return tokens, nbytes


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; inputs are the first ``seq_len``, targets
    the last. Training batch ``step`` and evaluation batch ``i`` come from independent,
    seeded streams, so they are reproducible and never depend on call order."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, batch_size: int, seed: int):
        for split, fix in (("train", "give more training text"),
                           ("val", "raise data.val_fraction or give validation files (data.val_paths, "
                                   "data.hf_val_split)")):
            n = len(getattr(corpus, split))
            if n < seq_len + 2:
                raise DataError(f"the {split} split has {n:,} tokens, fewer than the data.seq_len + 2 = "
                                f"{seq_len + 2} a window needs ({corpus.split or 'split as cached'}); "
                                f"lower data.seq_len or {fix}")
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed

    def _windows(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        starts = rng.integers(0, len(tokens) - self.seq_len - 1, size=self.batch_size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = np.asarray(tokens[idx], dtype=np.int32)
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self._windows(self.corpus.train, np.random.default_rng([self.seed, 0, step]))

    def val_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._windows(self.corpus.val, np.random.default_rng([self.seed, 1, index]))

    def train_eval_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training windows evaluated like ``val_batch``: the same ones at every evaluation."""
        return self._windows(self.corpus.train, np.random.default_rng([self.seed, 2, index]))
