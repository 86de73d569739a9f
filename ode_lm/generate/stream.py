"""Streaming text out token by token."""

from __future__ import annotations

import codecs

from ode_lm.data import ByteTokenizer, Tokenizer


class TextStream:
    """Turns a stream of token ids into text as soon as it is complete.

    Byte tokens may cut a multi-byte UTF-8 character in two; an incremental decoder holds
    the partial bytes back until the character is whole (broken sequences become U+FFFD,
    as in ``ByteTokenizer.decode``).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = (codecs.getincrementaldecoder("utf-8")(errors="replace")
                        if isinstance(tokenizer, ByteTokenizer) else None)

    def push(self, token: int) -> str:
        if self.decoder is None:
            return self.tokenizer.decode([token])
        return self.decoder.decode(bytes([token]))

    def flush(self) -> str:
        return "" if self.decoder is None else self.decoder.decode(b"", final=True)
