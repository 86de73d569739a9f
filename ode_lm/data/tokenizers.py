"""Tokenizers: bytes (the default, vocab 256, nothing unknown), the characters seen in a
corpus, and byte-level BPE (Hugging Face ``tokenizers``, trained on the training split)."""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ode_lm.errors import DataError

SEPARATOR = "\n\n"  # between documents for byte and char tokens, so joined files still read as text
END_OF_DOCUMENT = "<|endoftext|>"  # the BPE special token between documents
# Names other tokenizer.json files give their end-of-document token, tried in this order.
END_OF_DOCUMENT_NAMES = (END_OF_DOCUMENT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BYTE_ALPHABET = 256


class Tokenizer(abc.ABC):
    """Maps text to integer ids in ``[0, vocab_size)`` and back."""

    name: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray: ...

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    @abc.abstractmethod
    def state(self) -> dict:
        """JSON-able state; ``tokenizer_from_state`` rebuilds the tokenizer from it."""

    def separator(self) -> tuple[np.ndarray, int]:
        """Token ids put between two documents, and how many bytes of text they stand for."""
        return self.encode(SEPARATOR), len(SEPARATOR.encode())

    def to_json(self) -> str:
        """The tokenizer as a JSON file's text (a run's ``tokenizer.json``; ``tokenizer_from_file``
        reads it back)."""
        return json.dumps(self.state())


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens. Any text encodes; decoding replaces broken UTF-8 sequences."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return BYTE_ALPHABET

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"name": self.name}


class CharTokenizer(Tokenizer):
    """One token per character of a fixed alphabet, built from the corpus."""

    name = "char"
    CHUNK = 1 << 16  # characters encoded at a time

    def __init__(self, alphabet: str):
        if not alphabet:
            raise DataError("char tokenizer: the corpus has no characters to build an alphabet from")
        self.alphabet = "".join(sorted(set(alphabet)))
        self._index = {c: i for i, c in enumerate(self.alphabet)}
        # Sorted code points, for a vectorised encode (searchsorted) of long texts.
        self._points = np.array([ord(c) for c in self.alphabet], dtype=np.int64)

    @classmethod
    def from_texts(cls, texts) -> "CharTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls("".join(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if len(text) > self.CHUNK:  # bounds the temporary arrays (8 bytes per character each)
            return np.concatenate([self.encode(text[i:i + self.CHUNK]) for i in range(0, len(text), self.CHUNK)])
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        ids = np.minimum(np.searchsorted(self._points, points), len(self._points) - 1)
        unknown = np.flatnonzero(self._points[ids] != points)
        if unknown.size:
            raise DataError(f"char tokenizer: character {text[unknown[0]]!r} is not in the corpus alphabet "
                            f"of {self.vocab_size} characters; use data.tokenizer = \"byte\" for "
                            "open-vocabulary text")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in np.asarray(ids).reshape(-1))

    def state(self) -> dict:
        return {"name": self.name, "alphabet": self.alphabet}


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise DataError("data.tokenizer = \"bpe\" needs the Hugging Face tokenizers package: "
                        "pip install tokenizers") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """Byte-level BPE: text is mapped to bytes, bytes to 256 base symbols, and learned merges
    join frequent neighbours (GPT-2's scheme). Every text encodes; an end-of-document
    special token separates documents. Wraps a Hugging Face ``tokenizers.Tokenizer``."""

    name = "bpe"

    def __init__(self, tokenizer_json: str, source: str = "tokenizer.json"):
        tokenizers = _tokenizers_module()
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise DataError(f"{source} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]}); "
                            "give one saved by tokenizers (e.g. GPT-2's tokenizer.json)") from None
        self._json = tokenizer_json
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eod = next((vocab[n] for n in END_OF_DOCUMENT_NAMES if n in vocab), None)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: int | None = None) -> "BPETokenizer":
        """Learn merges on ``texts`` (an iterator: the corpus is never held whole) up to a
        vocabulary of ``vocab_size`` (the 256 byte symbols and the special token included)."""
        tk = _tokenizers_module()
        if vocab_size <= BYTE_ALPHABET:
            raise DataError(f"[data] vocab_size = {vocab_size} is below the {BYTE_ALPHABET} byte symbols "
                            f"plus the end-of-document token of byte-level BPE; use at least {BYTE_ALPHABET + 1}")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT],
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        tok.train_from_iterator((_valid_utf8(t) for t in texts), trainer=trainer, length=length)
        return cls(tok.to_str())

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"[data] tokenizer_file = \"{path}\": no such file (give a Hugging Face "
                            "tokenizer.json, e.g. runs/<run>/tokenizer.json of a BPE run)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"[data] tokenizer_file = \"{path}\" cannot be read: {e}") from None
        return cls(text, source=f"[data] tokenizer_file = \"{path}\"")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(_valid_utf8(text), add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self._tok.encode_batch([_valid_utf8(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encoded]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def separator(self) -> tuple[np.ndarray, int]:
        if self.eod is None:  # a loaded tokenizer without an end-of-document token
            return super().separator()
        return np.array([self.eod], np.int32), 0

    def state(self) -> dict:
        return {"name": self.name, "json": self._json}

    def to_json(self) -> str:
        """The Hugging Face tokenizer.json itself: loadable by ``tokenizers`` and by
        ``data.tokenizer_file``."""
        return self._json


def _valid_utf8(text: str) -> str:
    """Lone surrogates (undecodable bytes kept by ``surrogateescape``) become U+FFFD: the
    Rust tokenizer takes valid Unicode only."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


TOKENIZER_CLASSES = {cls.name: cls for cls in (ByteTokenizer, CharTokenizer, BPETokenizer)}


def tokenizer_from_state(state: dict) -> Tokenizer:
    name = state.get("name") if isinstance(state, dict) else None
    if name == "byte":
        return ByteTokenizer()
    if name == "char" and isinstance(state.get("alphabet"), str):
        return CharTokenizer(state["alphabet"])
    if name == "bpe" and isinstance(state.get("json"), str):
        return BPETokenizer(state["json"])
    raise DataError(f"unknown tokenizer state {str(state)[:80]!r}; allowed tokenizers are "
                    f"{', '.join(TOKENIZER_CLASSES)}")


def tokenizer_from_file(path: str | Path) -> Tokenizer:
    """A tokenizer written by ``Tokenizer.to_json`` (a run's ``tokenizer.json``)."""
    text = Path(path).read_text(encoding="utf-8")
    state = json.loads(text)
    if isinstance(state, dict) and "model" in state:  # a Hugging Face tokenizer.json
        return BPETokenizer(text, source=str(path))
    return tokenizer_from_state(state)
