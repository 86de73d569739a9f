"""The training loop, top to bottom.

    corpus -> batches(seed, step) -> model -> jitted step (loss, grads, AdamW) -> logs
           -> evaluation every N steps -> atomic checkpoints -> a sample at the end

Everything a step depends on is a function of ``(config, step)``: the batch is drawn from
``(seed, step)`` and the dropout key is ``fold_in(seed, step)``. A checkpoint therefore only
needs the model, the optimizer state and the step to continue the exact loss curve.

Ctrl-C / SIGTERM finish the step, checkpoint and raise TrainingInterrupted (interrupts.py);
a non-finite loss or gradient norm stops the run or skips the update (``train.on_nonfinite``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import equinox as eqx
import jax
import numpy as np
from tqdm.auto import tqdm

from ode_lm.config import ODE_FAMILIES, Config, config_from_toml
from ode_lm.data import BatchSampler, TokenizedCorpus, load_corpus
from ode_lm.errors import CheckpointError, ConfigError, RunDirError, UserError
from ode_lm.generate import generate
from ode_lm.models import LanguageModel, build_model, count_parameters
from ode_lm.train.checkpoint import all_checkpoints, checkpoint_writer, newest_checkpoint, resolved_format
from ode_lm.train.interrupts import (EarlyInterrupt, InterruptGuard, TrainingInterrupted, pending_signal,
                                     signals_deferred, startup_guard)
from ode_lm.train.logging import MetricsLog
from ode_lm.train.optim import build_optimizer, learning_rate_schedule
from ode_lm.train.parallel import (DataParallel, agreed_signal, barrier, is_lead, local_copy,
                                   maybe_initialize_distributed)
from ode_lm.train.precision import compute_dtype, param_dtype
from ode_lm.train.resources import check_training_resources
from ode_lm.train.rundir import RunDir
from ode_lm.train.sharding import place
from ode_lm.train.steps import EvalStep, TrainStep


class TrainingError(Exception):
    """Training cannot go on (non-finite loss, failed solve); the message says why and where."""


@dataclass
class Evaluation:
    loss: float  # nats per token
    bits_per_byte: float
    perplexity: float
    nfe: int


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    evaluation: Evaluation
    sample: str
    best_val_loss: float = math.nan  # lowest validation loss of the run's evaluations (this session)
    train_eval_loss: float = math.nan  # training windows in evaluation mode, at the last evaluation
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient (on_nonfinite = "skip")
    parameters: int = 0
    wall_s: float = 0.0  # wall-clock of this session, compilation and evaluation included
    ms_per_step: float = math.nan  # steady state: no step next to evaluation, checkpoint or compiling
    tokens_per_s: float = math.nan  # from ms_per_step
    train_nfe: float = math.nan  # mean NFE of this session's training forward solves
    step_memory_bytes: int | None = None  # XLA memory analysis of the compiled train step


def init_state(cfg: Config, vocab: int):
    """A fresh model and optimizer state for ``cfg``; also the template checkpoints load into."""
    model = build_model(cfg.model, vocab, jax.random.key(cfg.train.seed), param_dtype(cfg))
    optimizer = build_optimizer(cfg.optim, cfg.train.steps)
    return model, optimizer, optimizer.init(eqx.filter(model, eqx.is_inexact_array))


def regularisers(metrics: dict) -> dict[str, float]:
    """The training solve's regulariser values (``ode.kinetic_weight``, ``ode.jacobian_weight``)."""
    return {k: float(metrics[k]) for k in ("kinetic", "jacobian") if k in metrics}


def evaluate(model: LanguageModel, sampler: BatchSampler, eval_step: EvalStep, batches: int,
             bytes_per_token: float, place=lambda a: a, split: str = "val") -> Evaluation:
    """Mean loss over the first ``batches`` batches of ``split`` without dropout: held-out
    (``"val"``) or the fixed training windows of ``train_eval_batch`` (``"train"``), whose
    gap to the held-out loss shows overfitting."""
    batch = sampler.val_batch if split == "val" else sampler.train_eval_batch
    losses, nfe = [], 0
    for i in range(batches):
        loss, nfe, failed = eval_step(model, *map(place, batch(i)))
        if bool(failed):
            raise TrainingError(f"evaluation: the adaptive solve reached ode.max_steps = "
                                f"{eval_step.ode.max_steps} before t = 1; raise ode.max_steps or "
                                "loosen ode.rtol/ode.atol")
        losses.append(float(loss))
    loss = float(np.mean(losses))
    return Evaluation(loss, loss / math.log(2) / bytes_per_token, math.exp(min(loss, 50.0)), int(nfe))


def find_checkpoint(run_dir: Path, lead: bool, say: Callable[[str], None]):
    """``newest_checkpoint`` of the run (either format): the lead sets broken files aside
    first, then the other processes find the same checkpoint."""
    found = newest_checkpoint(run_dir, warn=say, set_aside=True) if lead else None
    barrier("ode-lm: checkpoints checked")
    return found if lead else newest_checkpoint(run_dir, warn=lambda message: None)


def check_compatible(saved: Config, cfg: Config, path: Path) -> None:
    """A checkpoint fits only a run with the same model and tokenizer."""
    diffs = [f"model.{k}: checkpoint {v!r} vs config {getattr(cfg.model, k)!r}"
             for k, v in saved.to_dict()["model"].items() if getattr(cfg.model, k) != v]
    for key in ("source", "tokenizer", "paths", "hf_name", "hf_config"):
        if getattr(saved.data, key) != getattr(cfg.data, key):
            diffs.append(f"data.{key}: checkpoint {getattr(saved.data, key)!r} vs config "
                         f"{getattr(cfg.data, key)!r}")
    if saved.train.dtype != cfg.train.dtype:
        diffs.append(f"train.dtype: checkpoint {saved.train.dtype!r} vs config {cfg.train.dtype!r}")
    if diffs:
        raise CheckpointError(f"{path} comes from an incompatible config ({'; '.join(diffs)}); "
                              "resume with the run's own config.toml or start a new run_name")


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          say: Callable[[str], None] = print, check_resources: bool = True) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes; see the README for what it writes.

    The run directory is locked for the whole call and left untouched until the first step
    has run (``rundir.py``); ``check_resources = False`` skips the memory and disk estimate
    (``resources.py``) that refuses sizes which cannot fit.
    """
    resume = resume or cfg.checkpoint.resume
    maybe_initialize_distributed(cfg)
    run = RunDir.claim(cfg, resume, overwrite, is_lead())
    precision = cfg.train.matmul_precision
    try:
        # Traced into every step compiled below; "default" leaves JAX's own setting alone.
        with contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision):
            return _train(cfg, run, resume, say, check_resources)
    except RunDirError:
        run.discard()
        raise
    finally:
        run.close()


def _train(cfg: Config, run: RunDir, resume: bool, say: Callable[[str], None],
           check_resources: bool) -> TrainResult:
    lead, run_dir = run.lead, run.path
    if not lead:  # one voice: the lead's
        say = lambda message: None  # noqa: E731
    corpus: TokenizedCorpus = load_corpus(cfg.data)
    check_sample_prompt(cfg, corpus.tokenizer)
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    say(f"data: {corpus.describe()}")
    if check_resources:
        check_training_resources(cfg, corpus.tokenizer.vocab_size, run_dir)
    model, optimizer, opt_state = init_state(cfg, corpus.tokenizer.vocab_size)

    parallel = DataParallel(cfg)
    shardings = parallel.state_shardings((model, opt_state))  # replicated, or sharded (train.fsdp)
    start = 0
    if resume:
        existing = all_checkpoints(run_dir)
        found = find_checkpoint(run_dir, lead, say)
        if found is None and existing:
            raise CheckpointError(f"none of the {len(existing)} checkpoints in {existing[0].parent} "
                                  "is readable (see above); move them away to start again from "
                                  "step 0, or pass --overwrite")
        if found is None:
            say(f"resume: no checkpoint in {run_dir}, starting from step 0")
        else:
            path, header = found.path, found
            saved = config_from_toml(header.config_toml, str(path))
            check_compatible(saved, cfg, path)
            if header.tokenizer != corpus.tokenizer.state():
                raise CheckpointError(f"{path} was trained with another {corpus.tokenizer.name} tokenizer "
                                      "than the corpus gives now; resume with the run's own config.toml "
                                      "(data.tokenizer_file = <run>/tokenizer.json for BPE) or start a new run_name")
            model, opt_state = found.restore((model, opt_state), shardings)
            start = header.step
            say(f"resume: continuing from {path} (step {start})")
    n_params = count_parameters(model)
    say(f"model: {cfg.model.family}, {n_params:,} parameters; ode: {cfg.ode.solver}, "
        f"{'adaptive' if cfg.ode.adaptive else f'{cfg.ode.steps} steps'}, {cfg.ode.adjoint}")
    if cfg.model.family not in ODE_FAMILIES:
        say(f"family '{cfg.model.family}' is discrete: [ode] settings are ignored")

    log: MetricsLog | None = None  # opened with the run directory, after the first step
    train_s = 0.0  # time in train steps, carried over a resume
    model, opt_state = place((model, opt_state), shardings)
    dtype = compute_dtype(cfg) if compute_dtype(cfg) != param_dtype(cfg) else None
    train_step = TrainStep(optimizer, cfg.ode, dtype, state_shardings=shardings if cfg.train.fsdp else None)
    eval_step = EvalStep(cfg.ode, dtype)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    base_key = jax.random.key(cfg.train.seed + 1)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    last_good = all_checkpoints(run_dir)[-1] if resume and all_checkpoints(run_dir) else None
    writer = checkpoint_writer(cfg, run_dir, lead)
    say(f"checkpoints: {resolved_format(cfg)} format; state "
        f"{'sharded (fsdp)' if cfg.train.fsdp else 'replicated'} over {parallel.devices} device(s)")
    saved_step, skipped = start, 0

    def checkpoint(step: int) -> Path:
        nonlocal last_good, saved_step
        last_good = writer.save(step, (model, opt_state), cfg.to_toml(), corpus.tokenizer.state())
        saved_step = step
        return last_good

    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.log.progress and lead),
               desc=cfg.train.run_name, unit="step", dynamic_ncols=True)
    # Lines printed above the progress bar, by the lead only (like ``say``).
    bar_say = bar.write if lead else lambda message, file=None: None
    loss, best_val = float("nan"), math.inf
    evaluation = train_eval = None
    window_start, window_tokens = None, 0
    interrupts = InterruptGuard()  # installed once the first step has run
    session_start = time.perf_counter()
    step_seconds, timed_steps, nfe_sum, step_memory = 0.0, 0, 0, None
    paused = 0.0  # seconds spent in evaluation, checkpoints and memory analysis since the last step

    @contextlib.contextmanager
    def pause():
        nonlocal paused
        begin = time.perf_counter()
        try:
            yield
        finally:
            paused += time.perf_counter() - begin

    def dropout_key(step: int):
        return jax.random.fold_in(base_key, step)

    def dispatch(step: int, model, opt_state, batch):
        return train_step(model, opt_state, *batch, dropout_key(step))

    try:
        # Step n + 1 is queued on the device before step n's metrics are read (and before
        # step n is logged, evaluated or checkpointed), so the device never waits for the
        # host. Nothing is lost by it: the model after step n stays at hand, and whatever
        # stops the run after step n simply drops step n + 1.
        batch = tuple(map(parallel.batch, sampler.train_batch(start)))
        ahead = dispatch(start, model, opt_state, batch) if start < cfg.train.steps else None
        mark = time.perf_counter()  # after the first step's compilation
        for step in range(start, cfg.train.steps):
            inputs, targets = batch
            stepped_model, stepped_opt_state, metrics = ahead
            if step + 1 < cfg.train.steps:
                batch = tuple(map(parallel.batch, sampler.train_batch(step + 1)))
                ahead = dispatch(step + 1, stepped_model, stepped_opt_state, batch)
            metrics = jax.device_get(metrics)  # one transfer; waits for step n only
            if log is None:  # the first step has run: from here on a signal saves a checkpoint
                log = start_run(run, cfg, corpus.tokenizer.to_json(), start, interrupts)
                train_s = log.last_value("train_s", 0.0)
            loss = float(metrics["loss"])
            model, opt_state = stepped_model, stepped_opt_state
            now = time.perf_counter()
            seconds, mark = now - mark, now
            if step > start:  # the session's first step follows its compilation: it is not timed
                train_s += seconds - paused
                if paused == 0.0:  # steady-state steps only: no evaluation or checkpoint in between
                    step_seconds, timed_steps = step_seconds + seconds, timed_steps + 1
                paused = 0.0
            else:
                with pause():
                    step_memory = train_step.memory_bytes(model, opt_state, inputs, targets,
                                                          dropout_key(step))
            nfe_sum += int(metrics["nfe"])
            done = step + 1
            if bool(metrics["solve_failed"]):
                raise TrainingError(f"step {done}: the adaptive solve reached ode.max_steps = "
                                    f"{cfg.ode.max_steps} before t = 1; raise ode.max_steps or loosen "
                                    f"ode.rtol = {cfg.ode.rtol} / ode.atol = {cfg.ode.atol}. "
                                    f"Last good checkpoint: {last_good or 'none'}")
            if not bool(metrics["finite"]):
                # The jitted step has already left the model and optimizer state unchanged.
                what = (f"loss {loss}" if not math.isfinite(loss)
                        else f"gradient norm {float(metrics['grad_norm'])}")
                if cfg.train.on_nonfinite == "stop":
                    raise TrainingError(f"step {done}: non-finite {what}; nothing written for this "
                                        "step. Lower optim.lr, check the data, or set "
                                        "train.on_nonfinite = \"skip\". Last good checkpoint: "
                                        f"{last_good or 'none'}")
                skipped += 1
                bar_say(f"warning: step {done}: non-finite {what}; update skipped "
                        f"({skipped} so far)", file=sys.stderr)
            # Throughput excludes the first step of a session, which includes compilation.
            if window_start is None:
                window_start = time.perf_counter()
            else:
                window_tokens += tokens_per_step
            tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            log.write("train", done, {"loss": loss, **({"skipped_steps": skipped}
                                                       if not bool(metrics["finite"]) else {})})
            if done % cfg.log.every == 0 or done == cfg.train.steps:
                log.write("train", done, {"lr": float(schedule(step)),
                                          "grad_norm": float(metrics["grad_norm"]),
                                          "nfe": int(metrics["nfe"]), "tokens_per_s": tok_s,
                                          "train_s": train_s, **regularisers(metrics)})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                with pause():
                    evaluation, train_eval = (evaluate(model, sampler, eval_step, cfg.train.eval_batches,
                                                       corpus.bytes_per_token, parallel.batch, split)
                                              for split in ("val", "train"))
                best_val = min(best_val, evaluation.loss)
                log.write("val", done, {"loss": evaluation.loss, "bits_per_byte": evaluation.bits_per_byte,
                                        "perplexity": evaluation.perplexity, "nfe": evaluation.nfe,
                                        "train_s": train_s})
                log.write("train_eval", done, {"loss": train_eval.loss})
                bar_say(f"step {done}: val loss {evaluation.loss:.4f} nats/token, "
                        f"{evaluation.bits_per_byte:.4f} bits/byte, ppl {evaluation.perplexity:.2f}; "
                        f"train loss (eval mode) {train_eval.loss:.4f}")
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                with pause():
                    checkpoint(done)
            stop = agreed_signal(interrupts.requested)
            if stop:
                saved = last_good if saved_step == done else checkpoint(done)
                raise TrainingInterrupted(stop, done, saved)
    finally:
        writer.close()  # an asynchronous save in flight completes before the run ends
        if startup_guard() is not None:
            startup_guard().forward = None
        interrupts.restore()
        bar.close()
        if log is not None:
            log.close(quiet=sys.exc_info()[1] is not None)
    if train_step.traces > 1:
        raise AssertionError(f"the train step was compiled {train_step.traces} times; it must compile once")
    if evaluation is None:  # resumed a finished run
        evaluation = evaluate(model, sampler, eval_step, cfg.train.eval_batches, corpus.bytes_per_token,
                              parallel.batch)
    local = local_copy(model)  # every process: gathering sharded (FSDP) weights is collective
    sample = end_of_training_sample(local, cfg, corpus) if lead else ""
    if sample:
        say(f"sample ({cfg.train.sample_tokens} tokens after {cfg.train.sample_prompt!r}):\n"
            f"{cfg.train.sample_prompt}{sample}")
    ms_per_step = 1000 * step_seconds / timed_steps if timed_steps else math.nan
    return TrainResult(run_dir, cfg.train.steps, loss, evaluation, sample,
                       best_val_loss=best_val if math.isfinite(best_val) else math.nan,
                       train_eval_loss=train_eval.loss if train_eval else math.nan,
                       skipped_steps=skipped, parameters=n_params,
                       wall_s=time.perf_counter() - session_start, ms_per_step=ms_per_step,
                       tokens_per_s=tokens_per_step * 1000 / ms_per_step if timed_steps else math.nan,
                       train_nfe=nfe_sum / (cfg.train.steps - start) if cfg.train.steps > start else math.nan,
                       step_memory_bytes=step_memory)


def start_run(run: RunDir, cfg: Config, tokenizer_json: str, start: int, interrupts: InterruptGuard
              ) -> MetricsLog:
    """After the first step: stop if a signal came before it; else hand signals to the
    training loop's guard and create (or replace) the run directory (``config.toml``,
    ``tokenizer.json``) with its logs."""
    guard = startup_guard()
    with signals_deferred():
        signum = pending_signal()
        if signum is not None:  # the start-up guard is ending the process already
            raise EarlyInterrupt(signum, before_start=True)
        interrupts.install()
        if guard is not None:
            guard.started, guard.forward = True, interrupts

    def open_logs() -> MetricsLog:
        log = MetricsLog(run.path, cfg.log.tensorboard, write=run.lead)
        log.truncate_after(start)
        return log
    return run.start(cfg.to_toml(), open_logs, {"tokenizer.json": tokenizer_json.encode()})


def check_sample_prompt(cfg: Config, tokenizer) -> None:
    """The end-of-training sample's prompt must encode, checked before training."""
    if cfg.train.sample_tokens == 0:
        return
    prompt = cfg.train.sample_prompt
    try:
        tokenizer.encode(prompt)
    except UserError as e:
        alphabet = set(getattr(tokenizer, "alphabet", ""))
        missing = ", ".join(repr(c) for c in sorted(set(prompt) - alphabet)) if alphabet else str(e)
        raise ConfigError(f"[train] sample_prompt = {prompt!r} has characters the {tokenizer.name} "
                          f"tokenizer of this corpus ({tokenizer.vocab_size} tokens) cannot encode: "
                          f"{missing}; change train.sample_prompt, set train.sample_tokens = 0, or use "
                          "data.tokenizer = \"byte\"") from None


def end_of_training_sample(model: LanguageModel, cfg: Config, corpus: TokenizedCorpus) -> str:
    if cfg.train.sample_tokens == 0:
        return ""
    prompt = corpus.tokenizer.encode(cfg.train.sample_prompt)
    n = min(cfg.train.sample_tokens, cfg.model.max_positions - len(prompt))
    if n <= 0 or len(prompt) == 0:
        return ""
    ids = generate(model, prompt, cfg.ode, max_new_tokens=n, temperature=cfg.train.sample_temperature,
                   seed=cfg.train.seed)
    return corpus.tokenizer.decode(ids[0])
