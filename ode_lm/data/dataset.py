"""Tokenize a corpus once, cache it as memory-mapped arrays, and sample training windows.

The cache lives under ``data.cache_dir/<fingerprint>/`` and is keyed by the corpus (files,
sizes, mtimes or the hub dataset), the tokenizer and the split, so a changed corpus is
re-tokenized. Batches are a pure function of ``(seed, step)``: the data iterator's whole
state is the step number, which makes resumed runs see exactly the batches they would have.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ode_lm.config import DataConfig
from ode_lm.data.corpus import fingerprint, is_validation, iter_documents
from ode_lm.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_state
from ode_lm.errors import DataError

SEPARATOR = "\n\n"  # between documents, so windows that span two files still read as text


@dataclass
class TokenizedCorpus:
    train: np.ndarray  # [n_train] token ids (memory-mapped)
    val: np.ndarray  # [n_val]
    tokenizer: Tokenizer
    bytes_per_token: float  # of the validation text, for bits per byte
    path: Path

    def describe(self) -> str:
        return (f"{len(self.train):,} train / {len(self.val):,} val tokens, vocab "
                f"{self.tokenizer.vocab_size} ({self.tokenizer.name}), cached at {self.path}")


def load_corpus(cfg: DataConfig) -> TokenizedCorpus:
    """Load the tokenized corpus from the cache, building it first if needed."""
    root = Path(cfg.cache_dir).expanduser()
    path = root / fingerprint(cfg)
    if not (path / "meta.json").is_file():
        _build(cfg, path)
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        arrays[split] = (np.memmap(path / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
                         if n else np.zeros((0,), dtype))
    corpus = TokenizedCorpus(arrays["train"], arrays["val"], tokenizer_from_state(meta["tokenizer"]),
                             meta["val_bytes"] / max(meta["val_tokens"], 1), path)
    return corpus


def _build(cfg: DataConfig, path: Path) -> None:
    train_docs, val_docs = [], []
    for doc in iter_documents(cfg):
        (val_docs if is_validation(doc.key, cfg.val_fraction) else train_docs).append(doc.text)
    if not train_docs and not val_docs:
        raise DataError(f"[data] source = \"{cfg.source}\" gave no documents: the corpus is empty")
    if not val_docs:  # tiny corpora: hold out the last document rather than have no validation
        val_docs.append(train_docs.pop())
    if not train_docs:
        train_docs.append(val_docs.pop(0))
    train_text, val_text = SEPARATOR.join(train_docs), SEPARATOR.join(val_docs)
    tokenizer: Tokenizer = (ByteTokenizer() if cfg.tokenizer == "byte"
                            else CharTokenizer.from_texts([train_text, val_text]))
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    except OSError as e:
        raise DataError(f"[data] cache_dir = \"{cfg.cache_dir}\" is not writable: {e}") from None
    meta = {"tokenizer": tokenizer.state(), "dtype": np.dtype(dtype).name,
            "val_bytes": len(val_text.encode("utf-8", "surrogateescape"))}
    for split, text in (("train", train_text), ("val", val_text)):
        ids = tokenizer.encode(text).astype(dtype)
        ids.tofile(tmp / f"{split}.bin")
        meta[f"{split}_tokens"] = int(ids.size)
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, path)  # atomic: a half-built cache is never seen
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; inputs are the first ``seq_len``, targets
    the last. Training batch ``step`` and evaluation batch ``i`` come from independent,
    seeded streams, so they are reproducible and never depend on call order."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, batch_size: int, seed: int):
        for split in ("train", "val"):
            n = len(getattr(corpus, split))
            if n < seq_len + 2:
                raise DataError(f"the {split} split has {n} tokens, too few for windows of "
                                f"data.seq_len = {seq_len}; lower seq_len or use a larger corpus")
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
