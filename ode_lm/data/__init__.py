"""Corpora, tokenizers and batches."""

from ode_lm.data.dataset import BatchSampler, TokenizedCorpus, load_corpus
from ode_lm.data.tokenizers import (BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_file,
                                    tokenizer_from_state)

__all__ = ["BatchSampler", "TokenizedCorpus", "load_corpus", "BPETokenizer", "ByteTokenizer", "CharTokenizer",
           "Tokenizer", "tokenizer_from_file", "tokenizer_from_state"]
