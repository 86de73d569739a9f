"""Corpus preparation speed and memory: ode-lm's streamed tokenization against Hugging Face
``tokenizers`` encoding the same text directly.

1. Speed, on the embedded corpus (the standard library's ``.py`` files): MB/s of
   ``load_corpus`` building the token cache from nothing (reading the files, splitting,
   encoding, writing ``train.bin``/``val.bin``) with a given BPE ``tokenizer.json`` (trained
   once beforehand on the same corpus, ``--vocab-size``), against
   ``tokenizers.Tokenizer.encode_batch`` on the same documents already in memory; the ratio
   of the two in one run. The byte and char tokenizers' preparation speeds and the BPE
   training time are reported alongside.
2. Memory: peak resident set size of a fresh process preparing a text corpus of ``--scales``
   copies of the embedded one (its files written that many times to a temporary folder), for
   each tokenizer, next to the corpus size (it must stay far below it, and not grow with it), and
   of a process that only imports ode-lm, for reference (Linux: ``VmHWM``). Worker
   processes (BPE on a large corpus) are reported separately (their ``ru_maxrss``, an upper
   bound: it includes the parent's size when they were started).

    python scripts/bench_tokenize.py                        # writes docs/results/tokenize_cpu.json
    python scripts/bench_tokenize.py --max-bytes 2000000 --scales 1 2 --out /tmp/t.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ode_lm.config import DataConfig  # noqa: E402
from ode_lm.data import load_corpus  # noqa: E402
from ode_lm.data.corpus import documents  # noqa: E402

MB = 1e6

_PREPARE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from ode_lm.config import DataConfig
from ode_lm.data import load_corpus
cfg = DataConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
corpus = load_corpus(cfg)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would include the parent's at the fork before exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "tokens": len(corpus.train) + len(corpus.val), "self_kib": hwm,
                  "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""


def prepare(cfg: DataConfig) -> tuple[float, object]:
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    return time.perf_counter() - start, corpus


def in_fresh_process(fields: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PREPARE.format(root=str(ROOT)), json.dumps(fields)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(args, work: Path) -> tuple[dict, list[list], str]:
    import tokenizers

    base = {"max_bytes": args.max_bytes}
    docs = documents(DataConfig(**base))
    texts = [b"".join(d.read(0, d.nbytes)).decode("utf-8", "surrogateescape") for d in docs]
    texts = [t.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for t in texts]
    size = sum(d.nbytes for d in docs)
    train_s, trained = prepare(DataConfig(**base, tokenizer="bpe", vocab_size=args.vocab_size,
                                          cache_dir=str(work / "train-bpe")))
    tokenizer_file = work / "tokenizer.json"
    tokenizer_file.write_text(trained.tokenizer.to_json())
    rows, result = [], {"corpus_bytes": size, "documents": len(docs), "vocab_size": trained.tokenizer.vocab_size}
    for name, extra in (("byte", {}), ("char", {}), ("bpe", {"tokenizer_file": str(tokenizer_file)})):
        seconds, corpus = prepare(DataConfig(**base, tokenizer=name, cache_dir=str(work / f"speed-{name}"), **extra))
        result[f"ode_lm_{name}_mb_s"] = size / MB / seconds
        rows.append([f"ode-lm load_corpus, {name}", seconds, size / MB / seconds])
    hf = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    start = time.perf_counter()
    encoded = hf.encode_batch(texts, add_special_tokens=False)
    direct_s = time.perf_counter() - start
    hf_tokens = sum(len(e.ids) for e in encoded)
    result.update(hf_encode_batch_mb_s=size / MB / direct_s, hf_tokens=hf_tokens,
                  ode_lm_bpe_tokens=len(corpus.train) + len(corpus.val),
                  ratio_ode_lm_bpe_to_hf=result["ode_lm_bpe_mb_s"] / (size / MB / direct_s),
                  bpe_train_and_prepare_s=train_s)
    rows.append(["tokenizers encode_batch (in memory)", direct_s, size / MB / direct_s])
    rows.append(["ode-lm BPE training + preparation", train_s, size / MB / train_s])
    return result, rows, str(tokenizer_file)


def write_copies(docs, folder: Path, copies: int) -> int:
    """The embedded corpus's UTF-8 files written ``copies`` times into ``folder``; its bytes."""
    folder.mkdir()
    size = 0
    for copy in range(copies):
        for i, d in enumerate(docs):
            data = b"".join(d.read(0, d.nbytes))
            try:  # the text source takes UTF-8 files; a few stdlib test files are not
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            (folder / f"{copy:02d}_{i:05d}.py").write_bytes(data)
            size += len(data)
    return size


def memory(args, work: Path, tokenizer_file: str) -> tuple[dict, list[list]]:
    docs = documents(DataConfig(max_bytes=args.max_bytes))
    baseline = in_fresh_process({"max_bytes": 1, "cache_dir": str(work / "tiny")})
    result = {"import_only_peak_rss_mib": baseline["self_kib"] / 1024, "scales": args.scales, "runs": []}
    rows = [["import + a 1-byte corpus", "", baseline["seconds"], baseline["self_kib"] / 1024, 0.0, ""]]
    for scale in args.scales:
        folder = work / f"corpus-{scale}x"
        size = write_copies(docs, folder, scale)
        for name, extra in (("byte", {}), ("char", {}), ("bpe", {"tokenizer_file": tokenizer_file})):
            fields = {"source": "text", "paths": [str(folder)], "tokenizer": name,
                      "cache_dir": str(work / f"mem-{scale}-{name}"), **extra}
            out = in_fresh_process(fields)
            peak, workers = out["self_kib"] / 1024, out["workers_kib"] / 1024
            result["runs"].append({"scale": scale, "corpus_bytes": size, "tokenizer": name, "seconds": out["seconds"],
                                   "mb_s": size / MB / out["seconds"], "peak_rss_mib": peak,
                                   "worker_peak_rss_mib": workers, "peak_over_corpus": peak * 2**20 / size})
            rows.append([f"{scale}x: {size / MB:.0f} MB", name, out["seconds"], peak, workers,
                         f"{peak * 2**20 / size:.1%}"])
        shutil.rmtree(folder)
    return result, rows


def main() -> None:
    from _timing import print_table, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-bytes", type=int, default=0, help="cap on the embedded corpus (0: all of it)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 5],
                   help="memory: corpora of this many copies of the embedded one")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "tokenize_cpu.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ode-lm-bench-tokenize-") as tmp:
        work = Path(tmp)
        speed_result, speed_rows, tokenizer_file = speed(args, work)
        print(f"\nspeed: embedded corpus, {speed_result['corpus_bytes'] / MB:.1f} MB in "
              f"{speed_result['documents']} documents, BPE vocab {speed_result['vocab_size']}")
        print_table(["what", "seconds", "MB/s"], speed_rows)
        print(f"ode-lm BPE preparation / tokenizers encode_batch: {speed_result['ratio_ode_lm_bpe_to_hf']:.2f}x")
        memory_result, memory_rows = memory(args, work, tokenizer_file)
        print("\nmemory: preparing copies of the embedded corpus in a fresh process")
        print_table(["corpus", "tokenizer", "seconds", "peak RSS MiB", "workers' peak MiB", "peak / corpus"],
                    memory_rows)
    write_json(args.out, {"speed": speed_result, "memory": memory_result, "cpus": os.cpu_count(),
                          "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                          "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
