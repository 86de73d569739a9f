"""Streaming text out token by token."""

from __future__ import annotations

import codecs

from ode_lm.data import ByteTokenizer, Tokenizer


class TextStream:
    """Turns a stream of token ids into text as soon as it is complete.

    Byte tokens may cut a multi-byte UTF-8 character in two; an incremental decoder holds
    the partial bytes back until the character is whole (broken sequences become U+FFFD,
    as in ``ByteTokenizer.decode``). Byte-level BPE tokens may do the same: the ids since the
    last complete text are held back while their decoding ends in U+FFFD (at most
    ``HOLD`` of them, then shown as they are).
    """

    HOLD = 4  # a UTF-8 character spans at most four bytes, so at most four tokens

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = (codecs.getincrementaldecoder("utf-8")(errors="replace")
                        if isinstance(tokenizer, ByteTokenizer) else None)
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        if self.decoder is not None:
            return self.decoder.decode(bytes([token]))
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.HOLD:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        if self.decoder is not None:
            return self.decoder.decode(b"", final=True)
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text
