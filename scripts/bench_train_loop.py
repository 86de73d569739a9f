"""Where a training run's time goes beyond the compiled step: the trainer's loop overhead.

Times, in one process and compile excluded, ms per step of:

- ``step``: ode-lm's jitted train step on one fixed batch, each step synchronised
  (``bench_gpu.py``'s "synced"), and the same steps queued back to back (its headline);
- ``step+data``: the same step fed the trainer's way (a fresh dropout key every step, the
  next sampled batch placed on the devices while the step runs, the loss read back);
- ``train()``: the real trainer (``TrainResult.ms_per_step``), logging and progress bar on,
  evaluation and checkpoints out of the timed window; it queues step n + 1 before reading
  step n's loss.

Early and late medians (first and last fifth of the steps) show whether steps slow down as
a run goes on.

    python scripts/bench_train_loop.py configs/time_indexed.toml train.dtype=bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

from _timing import machine, print_table, renamed_flag, write_json


def per_step_ms(step, n: int) -> list[float]:
    step(0)  # compile
    times = []
    for i in range(1, n + 1):
        start = time.perf_counter()
        step(i)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--train-steps", dest="steps", type=int, default=300, help="timed training steps per variant")
    renamed_flag(ap, "--steps", "--train-steps")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/train_loop_<backend>.json)")
    return ap.parse_args()


def time_the_step(cfg, steps: int) -> tuple[dict[str, list[float]], float]:
    """Per-step ms of the bare step and of the step fed the trainer's way, and the mean ms of
    the bare step queued back to back."""
    from ode_lm.data import BatchSampler, load_corpus
    from ode_lm.train.parallel import DataParallel
    from ode_lm.train.steps import build_train_step, init_state

    corpus = load_corpus(cfg.data)
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    parallel = DataParallel(cfg)
    model, _, opt_state = init_state(cfg, corpus.tokenizer.vocab_size)
    state = dict(zip(("model", "opt"), parallel.replicate((model, opt_state))))
    train_step = build_train_step(cfg)
    fixed = [parallel.batch(a) for a in sampler.train_batch(0)]
    base_key = jax.random.key(0)

    def queue():
        state["model"], state["opt"], metrics = train_step(state["model"], state["opt"], *fixed, base_key)
        return metrics["loss"]

    def bare(i):
        jax.block_until_ready(queue())

    state["batch"] = tuple(map(parallel.batch, sampler.train_batch(0)))

    def fed(i):
        inputs, targets = state["batch"]
        state["model"], state["opt"], metrics = train_step(state["model"], state["opt"], inputs, targets,
                                                           jax.random.fold_in(base_key, i))
        state["batch"] = tuple(map(parallel.batch, sampler.train_batch(i + 1)))  # overlaps the step
        float(metrics["loss"])

    series = {"step": per_step_ms(bare, steps), "step+data": per_step_ms(fed, steps)}
    start = time.perf_counter()
    for _ in range(steps):
        loss = queue()
    jax.block_until_ready(loss)
    return series, 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    args = parse_args()
    from ode_lm.config import load_config
    from ode_lm.train.trainer import train

    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(args.config, [*args.overrides, f"train.steps={args.steps + 1}",
                                        f"train.eval_every={10 * args.steps}", "train.sample=false",
                                        f"checkpoint.every={10 * args.steps}", f"train.runs_dir={runs}"])
        series, back_to_back = time_the_step(cfg, args.steps)
        result = train(cfg)
    fifth = max(1, args.steps // 5)
    rows, records = [], []
    for name, times in series.items():
        rec = {"variant": name, "median_ms": statistics.median(times),
               "early_ms": statistics.median(times[:fifth]), "late_ms": statistics.median(times[-fifth:])}
        records.append(rec)
        rows.append([name, rec["median_ms"], rec["early_ms"], rec["late_ms"]])
    records.append({"variant": "step back to back", "mean_ms": back_to_back})
    rows.append(["step back to back (mean)", back_to_back, "", ""])
    records.append({"variant": "train()", "mean_ms": result.ms_per_step})
    rows.append(["train() (mean)", result.ms_per_step, "", ""])
    info = machine()
    print(f"{args.config} {' '.join(args.overrides)}; {args.steps} steps; {info['device']}")
    print_table(["variant", "ms/step", "early ms", "late ms"], rows)
    write_json(args.out or f"docs/results/train_loop_{info['backend']}.json",
               {"benchmark": "train_loop", "machine": info, "config": args.config,
                "overrides": args.overrides, "steps": args.steps, "results": records})


if __name__ == "__main__":
    main()
