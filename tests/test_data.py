import numpy as np
import pytest

from ode_lm.config import DataConfig
from ode_lm.data import BatchSampler, ByteTokenizer, CharTokenizer, load_corpus
from ode_lm.data.corpus import documents, is_validation, stdlib_files
from ode_lm.errors import DataError


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ∂x/∂t' 🙂\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text).max() < 256


def test_char_tokenizer_round_trips_and_rejects_unknown():
    tok = CharTokenizer.from_texts(["abc", "cab d"])
    assert tok.vocab_size == 5 and tok.decode(tok.encode("bad cab")) == "bad cab"
    with pytest.raises(DataError, match="not in the corpus alphabet"):
        tok.encode("z")


def test_stdlib_corpus_is_sorted_and_split_disjointly(tmp_path):
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    cfg = DataConfig(max_bytes=2_000_000, cache_dir=str(tmp_path))
    keys = [d.key for d in documents(cfg)]
    val = {k for k in keys if is_validation(k, cfg.val_fraction)}
    train = set(keys) - val
    assert val and train and not (val & train)
    # The split is a property of the path alone, stable across runs and machines.
    assert all(is_validation(k, cfg.val_fraction) for k in val)


def test_batches_are_deterministic_and_shifted(tmp_path):
    corpus = load_corpus(DataConfig(max_bytes=300_000, cache_dir=str(tmp_path)))
    a = BatchSampler(corpus, 32, 4, seed=7)
    b = BatchSampler(corpus, 32, 4, seed=7)
    for step in (0, 5, 123):
        xa, ya = a.train_batch(step)
        xb, yb = b.train_batch(step)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])
    assert not np.array_equal(a.train_batch(0)[0], a.train_batch(1)[0])
    assert not np.array_equal(a.train_batch(0)[0], BatchSampler(corpus, 32, 4, seed=8).train_batch(0)[0])


def test_cache_is_reused_and_keyed_by_corpus(tmp_path):
    cfg = DataConfig(max_bytes=300_000, cache_dir=str(tmp_path))
    first = load_corpus(cfg)
    assert load_corpus(cfg).path == first.path
    assert load_corpus(DataConfig(max_bytes=200_000, cache_dir=str(tmp_path))).path != first.path


def test_text_files_through_datasets(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"document {i}\n" + "lorem ipsum " * 30)
    cfg = DataConfig(source="text", paths=(str(docs),), tokenizer="char", cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg)
    text = corpus.tokenizer.decode(np.asarray(corpus.train))
    assert "lorem ipsum" in text and len(corpus.val) > 0
    assert corpus.bytes_per_token == pytest.approx(1.0)


def test_missing_text_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        load_corpus(DataConfig(source="text", paths=(str(tmp_path / "none*.txt"),), cache_dir=str(tmp_path)))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "empty.txt"),), seq_len=8, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="too few|empty"):
        BatchSampler(load_corpus(cfg), 8, 2, 0)


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = DataConfig(source="hf", hf_name="ode-lm-tests/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="network access"):
        load_corpus(cfg)
