"""Tokenizers: bytes (the default, vocab 256, nothing unknown) and characters seen in a corpus."""

from __future__ import annotations

import abc

import numpy as np

from ode_lm.errors import DataError


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


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens. Any text encodes; decoding replaces broken UTF-8 sequences."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

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

    def __init__(self, alphabet: str):
        if not alphabet:
            raise DataError("char tokenizer: the corpus has no characters to build an alphabet from")
        self.alphabet = "".join(sorted(set(alphabet)))
        self._index = {c: i for i, c in enumerate(self.alphabet)}

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
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise DataError(f"char tokenizer: character {e.args[0]!r} is not in the corpus alphabet "
                            f"of {self.vocab_size} characters; use data.tokenizer = \"byte\" for "
                            "open-vocabulary text") from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in np.asarray(ids).reshape(-1))

    def state(self) -> dict:
        return {"name": self.name, "alphabet": self.alphabet}


def tokenizer_from_state(state: dict) -> Tokenizer:
    if state.get("name") == "byte":
        return ByteTokenizer()
    if state.get("name") == "char":
        return CharTokenizer(state["alphabet"])
    raise DataError(f"unknown tokenizer state {state!r}; allowed tokenizers are byte, char")
