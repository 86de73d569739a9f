"""Real corpora: one-file corpora, explicit validation files, dataset splits, BPE tokens,
and data inputs that must fail with one clear message (a damaged cache, a full disk,
binary or non-UTF-8 files)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from ode_lm import cli
from ode_lm.config import DataConfig
from ode_lm.data import BPETokenizer, load_corpus, tokenizer_from_file
from ode_lm.data import dataset as dataset_module
from ode_lm.data.tokenizers import END_OF_DOCUMENT, SEPARATOR
from ode_lm.errors import DataError

LINES = [f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(2000)]
NON_ASCII = "Grüße, 東京 — ∂x/∂t = f(t, x) 🙂\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Local datasets builders need no hub: keep them (and a later hub test) offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _text(corpus, side: str) -> str:
    return corpus.tokenizer.decode(np.asarray(getattr(corpus, side)))


def test_one_file_auto_split_is_a_contiguous_disjoint_tail(tmp_path):
    text = "".join(LINES)
    f = _write(tmp_path / "input.txt", text)
    cfg = DataConfig(source="text", paths=(str(f),), val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg)
    train, val = _text(corpus, "train"), _text(corpus, "val")
    assert "tail" in corpus.split and "auto" in corpus.split
    assert train + val == text  # contiguous and disjoint: the file, cut once
    assert train.endswith("\n")  # the cut falls after a line end
    assert len(val) / len(text) == pytest.approx(0.1, abs=len(LINES[0]) / len(text))
    line_len = max(map(len, LINES))
    assert 0.1 * len(text) - line_len <= len(val) <= 0.1 * len(text)


def test_explicit_split_documents_needs_held_out_documents(tmp_path):
    f = _write(tmp_path / "input.txt", "".join(LINES))
    cfg = DataConfig(source="text", paths=(str(f),), split="documents", cache_dir=str(tmp_path / "c"))
    # One document hashes to one side: none (or, by its name, all) of it is held out.
    with pytest.raises(DataError, match="held out (none|all) of the 1 documents.*split = \"tail\""):
        load_corpus(cfg)


def test_val_paths_are_used_verbatim_and_leave_the_training_side(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    train_text = _write(docs / "train.txt", "".join(LINES[:1500])).read_text()
    val_text = _write(docs / "val.txt", "".join(LINES[1500:]) + NON_ASCII).read_text()
    cfg = DataConfig(source="text", paths=(str(docs),), val_paths=(str(docs / "val.txt"),),
                     tokenizer="char", cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg)
    assert _text(corpus, "val") == val_text
    assert _text(corpus, "train") == train_text  # val.txt, also under docs/, is not trained on
    assert "val_paths" in corpus.split
    assert corpus.bytes_per_token == pytest.approx(len(val_text.encode()) / len(val_text))


def test_local_parquet_through_hf_uses_the_given_validation_split(tmp_path, offline):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = {"train": [f"training row {i} " * 5 for i in range(200)],
            "validation": [f"held-out row {i} {NON_ASCII}" for i in range(30)]}
    for split, texts in rows.items():
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / f"{split}.parquet")
    cfg = DataConfig(source="hf", hf_name="parquet", hf_val_split="validation",
                     hf_data_files=(f"train={tmp_path / 'train.parquet'}",
                                    f"validation={tmp_path / 'validation.parquet'}"),
                     cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg)
    assert _text(corpus, "val") == SEPARATOR.join(rows["validation"])
    assert _text(corpus, "train") == SEPARATOR.join(rows["train"])
    assert "hf_val_split" in corpus.split
    missing = DataConfig(**{**cfg.__dict__, "hf_val_split": "test"})
    with pytest.raises(DataError, match="split 'test' is not among hf_data_files' splits"):
        load_corpus(missing)


def test_hf_val_split_that_the_builder_lacks_is_named(tmp_path, offline):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    cfg = DataConfig(source="hf", hf_name="json", hf_data_files=(str(tmp_path / "rows.jsonl"),),
                     hf_val_split="validation", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="'validation' is not among hf_data_files' splits \\(train\\)"):
        load_corpus(cfg)
    cfg = DataConfig(source="hf", hf_name="json", hf_data_files=(str(tmp_path / "rows.jsonl"),),
                     text_field="body", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="text_field = \"body\" is not a column.*columns are text"):
        load_corpus(cfg)


def test_bpe_round_trips_and_learns_from_the_training_side_only(tmp_path):
    train = _write(tmp_path / "train.txt", "".join(LINES) + NON_ASCII * 20)
    # "qwqw" never occurs in training: no merge can join q and w.
    val = _write(tmp_path / "val.txt", "qwqwqw zxzx " * 400)
    cfg = DataConfig(source="text", paths=(str(train),), val_paths=(str(val),), tokenizer="bpe",
                     vocab_size=400, cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg)
    tok = corpus.tokenizer
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 400
    assert not any("qw" in t or "wq" in t or "zx" in t for t in tok._tok.get_vocab())
    held_out = "the lazy fox, 東京 and Grüße: ∂t 🙂 unseen-wörds\n"
    ids = tok.encode(held_out)
    assert ids.max() < tok.vocab_size and tok.decode(ids) == held_out
    assert _text(corpus, "val") == val.read_text()
    assert len(corpus.train) < len(train.read_bytes()) / 2  # merges compress the training text
    # bits per byte: bytes of validation text per validation token, measured
    assert corpus.bytes_per_token == pytest.approx(len(val.read_bytes()) / len(corpus.val))
    again = BPETokenizer.train(iter([train.read_text()]), 400)
    assert again.state() == BPETokenizer.train(iter([train.read_text()]), 400).state()  # deterministic


def test_bpe_puts_the_end_of_document_token_between_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        _write(docs / f"{i:02d}.txt", f"document {i}\n" + "".join(LINES[i * 20:(i + 1) * 20]))
    cfg = DataConfig(source="text", paths=(str(docs),), tokenizer="bpe", vocab_size=300,
                     split="documents", val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg)
    n_train_docs = len(corpus.train) and _text(corpus, "train").count(END_OF_DOCUMENT) + 1
    n_val_docs = _text(corpus, "val").count(END_OF_DOCUMENT) + 1
    assert n_train_docs + n_val_docs == 60 and n_val_docs >= 1
    assert np.asarray(corpus.train).dtype == np.uint16
    # A tokenizer file is used as is, and its settings key the cache.
    tok_file = _write(tmp_path / "tokenizer.json", corpus.tokenizer.to_json())
    loaded = load_corpus(DataConfig(**{**cfg.__dict__, "tokenizer_file": str(tok_file)}))
    assert loaded.path != corpus.path and np.array_equal(loaded.train, corpus.train)


def test_parallel_encoding_gives_the_serial_tokens(tmp_path, monkeypatch):
    f = _write(tmp_path / "input.txt", "".join(LINES) * 3 + NON_ASCII * 50)
    cfg = DataConfig(source="text", paths=(str(f),), tokenizer="char", cache_dir=str(tmp_path / "serial"))
    serial = load_corpus(cfg)
    monkeypatch.setattr(dataset_module, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(dataset_module, "BATCH_BYTES", 20_000)
    parallel = load_corpus(DataConfig(**{**cfg.__dict__, "workers": 2, "cache_dir": str(tmp_path / "par")}))
    assert np.array_equal(serial.train, parallel.train) and np.array_equal(serial.val, parallel.val)


def test_too_small_validation_split_says_which_and_how_to_fix(tmp_path):
    from ode_lm.data import BatchSampler

    f = _write(tmp_path / "input.txt", "".join(LINES[:40]))
    corpus = load_corpus(DataConfig(source="text", paths=(str(f),), val_fraction=0.01,
                                    cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="the val split has .* tokens.*split tail.*lower data.seq_len or "
                                        "raise data.val_fraction or give validation files"):
        BatchSampler(corpus, 256, 2, 0)


# --- bad data inputs: one line, exit 2 --------------------------------------------------------

def _cli_error(capsys, *args: str) -> str:
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ode-lm: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def info_args(tmp_path):
    # `train` reads the corpus before anything else; one step, should an input be accepted.
    dirs = (f"data.cache_dir=\"{tmp_path / 'c'}\"", f"train.runs_dir=\"{tmp_path / 'runs'}\"", "train.steps=1")
    return lambda *overrides: ("train", str(REPO / "configs" / "quickstart.toml"), *dirs, *overrides)


def test_bad_data_inputs_get_one_clear_line(tmp_path, capsys, info_args):
    empty = _write(tmp_path / "empty.txt", "")
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"text at first " * 10 + bytes(range(256)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("plain text, then caf".encode() + "é".encode("latin-1") + b"\n" * 300)
    text = "data.source=text"
    for paths, overrides, needle in [
        ([empty], ["data.tokenizer=char"], "corpus is empty: data.paths holds no text"),
        ([binary], [], "model.bin is a binary file (a NUL byte at byte offset 140)"),
        ([latin1], ["data.tokenizer=char"], "latin1.txt is not UTF-8 text: byte offset 20 holds"),
        ([latin1], ["data.tokenizer=bpe", "data.vocab_size=200"], "vocab_size = 200 is below the 256 byte"),
        ([latin1], ["data.tokenizer=bpe", f"data.tokenizer_file={tmp_path / 'none.json'}"],
         "tokenizer_file = \"" + str(tmp_path / "none.json") + "\": no such file"),
    ]:
        listed = "[" + ", ".join(f'"{p}"' for p in paths) + "]"
        err = _cli_error(capsys, *info_args(text, f"data.paths={listed}", *overrides))
        assert needle in err, err
    err = _cli_error(capsys, *info_args(text, f'data.paths=["{latin1}"]', "data.tokenizer=char"))
    assert 'data.tokenizer = "byte" reads any bytes' in err
    # The byte tokenizer reads those bytes as they are.
    corpus = load_corpus(DataConfig(source="text", paths=(str(latin1),), cache_dir=str(tmp_path / "b")))
    assert bytes(np.concatenate([corpus.train, corpus.val])) == latin1.read_bytes()


def test_damaged_token_cache_is_rebuilt(tmp_path, capsys):
    f = _write(tmp_path / "input.txt", "".join(LINES))
    cfg = DataConfig(source="text", paths=(str(f),), cache_dir=str(tmp_path / "c"))
    good = load_corpus(cfg)
    expected = np.array(good.train)
    with open(good.path / "train.bin", "r+b") as fh:  # truncated, as by a crash or a full disk
        fh.truncate(100)
    warnings = []
    rebuilt = load_corpus(cfg, warn=warnings.append)
    assert np.array_equal(rebuilt.train, expected)
    assert len(warnings) == 1 and "train.bin holds 100 bytes" in warnings[0] and "rebuilding" in warnings[0]
    (good.path / "meta.json").write_bytes(b"\x00garbage{")
    warnings.clear()
    assert np.array_equal(load_corpus(cfg, warn=warnings.append).train, expected)
    assert "meta.json unreadable" in warnings[0]


_FULL_DISK = """
import resource, signal, sys
from ode_lm import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_full_disk_while_building_the_cache_leaves_nothing(tmp_path):
    """A file-size limit makes the cache's writes fail as a full disk would (ENOSPC and
    EFBIG take the same path); a real tmpfs would need mount rights the tests lack."""
    f = _write(tmp_path / "input.txt", "".join(LINES))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, "info", str(REPO / "configs" / "quickstart.toml"),
                           "data.source=text", "data.tokenizer=char", f'data.paths=["{f}"]',
                           f'data.cache_dir="{cache}"'],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot write the token cache in" in lines[0] and "File too large" in lines[0]
    assert list(cache.iterdir()) == []  # no .building-* directory, no half cache


def _train_bpe_run(tiny):
    from ode_lm.train import train

    cfg = tiny(**{"data.tokenizer": "bpe", "data.vocab_size": 512, "train.steps": 20, "train.eval_every": 20,
                  "train.sample": False, "checkpoint.every": 20})
    return cfg, train(cfg, say=lambda m: None)


def test_bpe_run_lowers_the_loss_and_saves_its_tokenizer(tiny):
    from ode_lm.train import load_run
    from ode_lm.train.checkpoint import list_checkpoints, read_checkpoint

    cfg, result = _train_bpe_run(tiny)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train" and "loss" in r]
    assert losses[-1] < losses[0] - 0.3 and result.evaluation.loss < math.log(512) - 0.3
    corpus = load_corpus(cfg.data)
    text = "def main(argv):\n    return 'héllo ∂t 🙂'\n"
    ids = corpus.tokenizer.encode(text)
    run = load_run(result.run_dir)
    saved = tokenizer_from_file(result.run_dir / "tokenizer.json")
    assert np.array_equal(run.tokenizer.encode(text), ids) and np.array_equal(saved.encode(text), ids)
    assert list_checkpoints(result.run_dir)
    for ckpt in list_checkpoints(result.run_dir):
        assert read_checkpoint(ckpt)[0].tokenizer == corpus.tokenizer.state()
    assert run.tokenizer.decode(ids) == text


@pytest.mark.slow
def test_generate_from_a_bpe_run_prints_text(tiny):
    _, result = _train_bpe_run(tiny)
    proc = run_cli("generate", str(result.run_dir), "--prompt", "def ", "--max-new-tokens", "16", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def ") and len(proc.stdout.strip()) > len("def ") + 4


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_dir_is_one_clear_error(tmp_path):
    f = _write(tmp_path / "input.txt", "".join(LINES))
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.raises(DataError, match="cannot write the token cache in .*data.cache_dir"):
            load_corpus(DataConfig(source="text", paths=(str(f),), cache_dir=str(cache)))
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)
