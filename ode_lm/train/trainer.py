"""The training loop, top to bottom.

    corpus -> batches(seed, step) -> model -> jitted step (loss, grads, AdamW) -> logs
           -> evaluation every N steps -> atomic checkpoints -> a sample at the end

Everything a step depends on is a function of ``(config, step)``: the batch is drawn from
``(seed, step)`` and the dropout key is ``fold_in(seed, step)``. A checkpoint therefore only
needs the model, the optimizer state and the step to continue the exact loss curve.

``_train`` reads as the loop it is: ``dispatched_steps`` yields the steps as they finish, and
a ``Session`` consumes each one (the run directory after the first step, the failure policy,
logs, evaluation, checkpoints, signals). Ctrl-C / SIGTERM finish the step, checkpoint and
raise TrainingInterrupted (interrupts.py); a non-finite loss or gradient norm stops the run
or skips the update (``train.on_nonfinite``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
from tqdm.auto import tqdm

from ode_lm.config import ODE_FAMILIES, Config, config_from_toml
from ode_lm.data import BatchSampler, TokenizedCorpus, Tokenizer, load_corpus
from ode_lm.errors import CheckpointError, ConfigError, RunDirError, UserError
from ode_lm.models import LanguageModel, count_parameters
from ode_lm.train.checkpoint import all_checkpoints, checkpoint_writer, newest_checkpoint, resolved_format
from ode_lm.train.evaluation import Evaluation, TrainingError, evaluate
from ode_lm.train.interrupts import (EarlyInterrupt, InterruptGuard, TrainingInterrupted, pending_signal,
                                     signals_deferred, startup_guard)
from ode_lm.train.logging import MetricsLog
from ode_lm.train.optim import learning_rate_schedule
from ode_lm.train.parallel import (DataParallel, agreed_signal, barrier, is_lead, local_copy,
                                   maybe_initialize_distributed)
from ode_lm.train.resources import check_training_resources
from ode_lm.train.rundir import RunDir
from ode_lm.train.sharding import place
from ode_lm.train.steps import TrainStep, build_eval_step, build_train_step, init_state

__all__ = ["Evaluation", "TrainResult", "TrainingError", "evaluate", "init_state", "train"]


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
    compilations: int = 0  # times this session compiled the train step (1 whenever a step ran)


def regularisers(metrics: dict) -> dict[str, float]:
    """The training solve's regulariser values (``ode.kinetic_weight``, ``ode.jacobian_weight``)."""
    return {k: float(metrics[k]) for k in ("kinetic", "jacobian") if k in metrics}


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


def resume_state(cfg: Config, run: RunDir, corpus: TokenizedCorpus, template: Any, shardings: Any,
                 say: Callable[[str], None]) -> tuple[Any, int]:
    """The newest readable checkpoint's ``(state, step)`` restored into ``template`` laid out
    as ``shardings`` (either format; an orbax checkpoint reshards on load), or
    ``(template, 0)`` when the run has none yet."""
    existing = all_checkpoints(run.path)
    found = find_checkpoint(run.path, run.lead, say)
    if found is None and existing:
        raise CheckpointError(f"none of the {len(existing)} checkpoints in {existing[0].parent} "
                              "is readable (see above); move them away to start again from "
                              "step 0, or pass --overwrite")
    if found is None:
        say(f"resume: no checkpoint in {run.path}, starting from step 0")
        return template, 0
    path = found.path
    check_compatible(config_from_toml(found.config_toml, str(path)), cfg, path)
    if found.tokenizer != corpus.tokenizer.state():
        raise CheckpointError(f"{path} was trained with another {corpus.tokenizer.name} tokenizer "
                              "than the corpus gives now; resume with the run's own config.toml "
                              "(data.tokenizer_file = <run>/tokenizer.json for BPE) or start a new run_name")
    state = found.restore(template, shardings)
    say(f"resume: continuing from {path} (step {found.step})")
    return state, found.step


# The end-of-training sample: (model, config, tokenizer) -> text; ode_lm.generate.training_sample.
Sampler = Callable[[LanguageModel, Config, Tokenizer], str]


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          say: Callable[[str], None] = print, check_resources: bool = True,
          sample: Sampler | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes; see the README for what it writes.

    The run directory is locked for the whole call and left untouched until the first step
    has run (``rundir.py``); ``check_resources = False`` skips the memory and disk estimate
    (``resources.py``) that refuses sizes which cannot fit. With ``train.sample`` on,
    ``sample`` (``ode_lm.generate.training_sample`` from the command line and ablations)
    writes the end-of-training sample; training does not import the generation package.
    """
    resume = resume or cfg.checkpoint.resume
    maybe_initialize_distributed(cfg)
    run = RunDir.claim(cfg, resume, overwrite, is_lead())
    precision = cfg.train.matmul_precision
    try:
        # Traced into every step compiled below; "default" leaves JAX's own setting alone.
        with contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision):
            return _train(cfg, run, resume, say if run.lead else _quiet, check_resources, sample)
    except RunDirError:
        run.discard()
        raise
    finally:
        run.close()


def _quiet(message: str) -> None:
    """``say`` of the processes other than the lead: one voice, the lead's."""


def _train(cfg: Config, run: RunDir, resume: bool, say: Callable[[str], None],
           check_resources: bool, sample: Sampler | None) -> TrainResult:
    """Data and checks; the state made (``init_state``), restored (``resume_state``) and put
    on the devices (``place``: replicated, or sharded with ``train.fsdp``); then the loop,
    one finished step at a time."""
    corpus: TokenizedCorpus = load_corpus(cfg.data)
    check_sample_prompt(cfg, corpus.tokenizer)
    sampler = BatchSampler(corpus, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    say(f"data: {corpus.describe()}")
    if check_resources:
        check_training_resources(cfg, corpus.tokenizer.vocab_size, run.path)
    model, _, opt_state = init_state(cfg, corpus.tokenizer.vocab_size)
    parallel = DataParallel(cfg)
    shardings = parallel.state_shardings((model, opt_state))  # replicated, or sharded (train.fsdp)
    state, start = (resume_state(cfg, run, corpus, (model, opt_state), shardings, say) if resume
                    else ((model, opt_state), 0))
    parameters = count_parameters(state[0])
    say(f"model: {cfg.model.family}, {parameters:,} parameters; ode: {cfg.ode.solver}, "
        f"{'adaptive' if cfg.ode.adaptive else f'{cfg.ode.steps} steps'}, {cfg.ode.adjoint}")
    if cfg.model.family not in ODE_FAMILIES:
        say(f"family '{cfg.model.family}' is discrete: [ode] settings are ignored")
    state = place(state, shardings)
    say(f"checkpoints: {resolved_format(cfg)} format; state "
        f"{'sharded (fsdp)' if cfg.train.fsdp else 'replicated'} over {parallel.devices} device(s)")
    train_step = build_train_step(cfg, state_shardings=shardings if cfg.train.fsdp else None)
    base_key = jax.random.key(cfg.train.seed + 1)

    def batch(step: int) -> tuple[jax.Array, jax.Array]:
        return tuple(map(parallel.batch, sampler.train_batch(step)))

    def dropout_key(step: int) -> jax.Array:
        return jax.random.fold_in(base_key, step)

    with Session(cfg, run, corpus, sampler, parallel, train_step, start, state, resume, say) as session:
        for step in dispatched_steps(train_step, state, batch, dropout_key, start, cfg.train.steps):
            done = step.index + 1  # steps done once this one is
            session.started(step)  # the first step: run directory, logs and signals; timing
            session.check(done, step.metrics)  # the failure policy
            session.log(done, step)
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                session.evaluate(done)
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                session.checkpoint(done)
            session.stop_if_signalled(done)
    return session.result(parameters, sample)


@dataclass
class Step:
    """One finished training step, as ``dispatched_steps`` yields it."""

    index: int  # 0-based: the step that makes ``index + 1`` steps done
    state: tuple  # (model, optimizer state) after it
    metrics: dict  # on the host
    batch: tuple  # its (inputs, targets), on the devices
    key: jax.Array  # its dropout key


def dispatched_steps(train_step: TrainStep, state: tuple, batch: Callable[[int], tuple],
                     key: Callable[[int], jax.Array], start: int, end: int) -> Iterator[Step]:
    """Steps ``start .. end - 1`` from ``state``, each yielded once its metrics are on the host.

    Step n + 1 is queued on the device before step n's metrics are read (and before step n
    is logged, evaluated or checkpointed), so the device never waits for the host. Nothing is
    lost by it: the state after step n is in step n's record, and whatever stops the run
    after step n simply drops step n + 1.
    """
    def dispatch(n: int, state: tuple):
        inputs_targets = batch(n)
        return inputs_targets, train_step(*state, *inputs_targets, key(n))

    if start >= end:
        return
    queued = dispatch(start, state)
    for n in range(start, end):
        inputs_targets, (model, opt_state, metrics) = queued
        if n + 1 < end:
            queued = dispatch(n + 1, (model, opt_state))
        yield Step(n, (model, opt_state), jax.device_get(metrics), inputs_targets, key(n))


class StepClock:
    """The session's timing meters. The first step of a session follows its compilation and
    is not timed. ``train_s`` sums the time in steps (evaluation, checkpoints and memory
    analysis, run in ``pause()``, left out; carried over a resume); ``ms_per_step`` is the
    mean of the steady-state steps only (nothing paused since the last step); ``tokens_per_s``
    is the progress bar's throughput since the session's first step."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.train_s, self.paused = tokens_per_step, 0.0, 0.0
        self.step_seconds, self.timed_steps = 0.0, 0
        self._last: float | None = None
        self._window_start: float | None = None
        self._window_tokens = 0

    @contextlib.contextmanager
    def pause(self):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - begin

    def tick(self) -> None:
        """A step's metrics have arrived."""
        now = time.perf_counter()
        if self._last is not None:
            seconds = now - self._last
            self.train_s += seconds - self.paused
            if self.paused == 0.0:
                self.step_seconds, self.timed_steps = self.step_seconds + seconds, self.timed_steps + 1
            self.paused = 0.0
        self._last = now

    def tokens_per_s(self) -> float:
        if self._window_start is None:
            self._window_start = time.perf_counter()
        else:
            self._window_tokens += self.tokens_per_step
        return self._window_tokens / max(time.perf_counter() - self._window_start, 1e-9)

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.step_seconds / self.timed_steps if self.timed_steps else math.nan


class Checkpoints:
    """The run's checkpoints in ``checkpoint.format``: ``save`` writes one atomically (a
    file by the lead, or every process's orbax shards, asynchronously) and keeps every
    process in step; ``last_good`` is the newest one written, for error messages; ``close``
    waits for a save in flight."""

    def __init__(self, cfg: Config, run: RunDir, tokenizer_state: dict, start: int, resume: bool):
        self.cfg, self.tokenizer_state, self.saved_step = cfg, tokenizer_state, start
        self.writer = checkpoint_writer(cfg, run.path, run.lead)
        existing = all_checkpoints(run.path) if resume else []
        self.last_good: Path | None = existing[-1] if existing else None

    def save(self, step: int, state: Any) -> Path | None:
        self.last_good = self.writer.save(step, state, self.cfg.to_toml(), self.tokenizer_state)
        self.saved_step = step
        return self.last_good

    def close(self) -> None:
        self.writer.close()

    def of(self, step: int, state: Any) -> Path | None:
        """The checkpoint of ``step``, written now unless it already is."""
        return self.last_good if self.saved_step == step else self.save(step, state)


class Session:
    """What the loop does with each finished step, and the state it keeps for the result:
    the run directory and logs (created after the first step), the failure policy, metrics,
    the progress bar, evaluation, checkpoints and signals. A context manager: leaving it
    hands signals back and closes the progress bar and the logs."""

    def __init__(self, cfg: Config, run: RunDir, corpus: TokenizedCorpus, sampler: BatchSampler,
                 parallel: DataParallel, train_step: TrainStep, start: int, state: tuple, resume: bool,
                 say: Callable[[str], None]):
        self.say = say
        self.cfg, self.run, self.corpus, self.sampler, self.parallel = cfg, run, corpus, sampler, parallel
        self.train_step, self.eval_step = train_step, build_eval_step(cfg)
        self.start, self.state = start, state
        self.schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
        self.checkpoints = Checkpoints(cfg, run, corpus.tokenizer.state(), start, resume)
        self.logs: MetricsLog | None = None  # opened with the run directory, after the first step
        self.clock = StepClock(cfg.train.batch_size * cfg.data.seq_len)
        self.loss, self.best_val, self.skipped, self.nfe_sum = math.nan, math.inf, 0, 0
        self.evaluation: Evaluation | None = None
        self.train_eval: Evaluation | None = None
        self.step_memory: int | None = None
        self.interrupts = InterruptGuard()  # installed once the first step has run
        self.session_start = time.perf_counter()
        self.bar = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.log.progress and run.lead),
                        desc=cfg.train.run_name, unit="step", dynamic_ncols=True)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.checkpoints.close()  # an asynchronous save in flight completes before the run ends
        if startup_guard() is not None:
            startup_guard().forward = None
        self.interrupts.restore()
        self.bar.close()
        if self.logs is not None:
            self.logs.close(quiet=error is not None)

    def note(self, message: str, file=None) -> None:
        """A line above the progress bar, by the lead only."""
        if self.run.lead:
            self.bar.write(message, file=file)

    def started(self, step: Step) -> None:
        """Take the step's state; after the session's first step, stop if a signal came
        before it, else create the run directory and its logs and hand signals to the loop."""
        self.state = step.state
        if self.logs is None:
            self.logs = start_run(self.run, self.cfg, self.corpus.tokenizer.to_json(), self.start,
                                 self.interrupts)
            self.clock.train_s = self.logs.last_value("train_s", 0.0)
        self.loss = float(step.metrics["loss"])
        self.clock.tick()
        if step.index == self.start:
            with self.clock.pause():
                self.step_memory = self.train_step.memory_bytes(*step.state, *step.batch, step.key)
        self.nfe_sum += int(step.metrics["nfe"])

    def check(self, done: int, metrics: dict) -> None:
        """``train.on_nonfinite``: a non-finite step (left undone by the jitted step) stops
        the run or counts as skipped; a failed adaptive solve always stops it."""
        last_good = self.checkpoints.last_good or "none"
        if bool(metrics["solve_failed"]):
            raise TrainingError(f"step {done}: the adaptive solve reached ode.max_steps = "
                                f"{self.cfg.ode.max_steps} before t = 1; raise ode.max_steps or loosen "
                                f"ode.rtol = {self.cfg.ode.rtol} / ode.atol = {self.cfg.ode.atol}. "
                                f"Last good checkpoint: {last_good}")
        if bool(metrics["finite"]):
            return
        what = (f"loss {self.loss}" if not math.isfinite(self.loss)
                else f"gradient norm {float(metrics['grad_norm'])}")
        if self.cfg.train.on_nonfinite == "stop":
            raise TrainingError(f"step {done}: non-finite {what}; nothing written for this step. "
                                "Lower optim.lr, check the data, or set train.on_nonfinite = \"skip\". "
                                f"Last good checkpoint: {last_good}")
        self.skipped += 1
        self.note(f"warning: step {done}: non-finite {what}; update skipped ({self.skipped} so far)",
                 file=sys.stderr)

    def log(self, done: int, step: Step) -> None:
        """``train/loss`` every step (and ``train/skipped_steps`` after a skip), the other
        train scalars every ``log.every`` steps, and the progress bar."""
        metrics, tok_s = step.metrics, self.clock.tokens_per_s()
        skipped = {} if bool(metrics["finite"]) else {"skipped_steps": self.skipped}
        self.logs.write("train", done, {"loss": self.loss, **skipped})
        if done % self.cfg.log.every == 0 or done == self.cfg.train.steps:
            self.logs.write("train", done, {"lr": float(self.schedule(step.index)),
                                           "grad_norm": float(metrics["grad_norm"]),
                                           "nfe": int(metrics["nfe"]), "tokens_per_s": tok_s,
                                           "train_s": self.clock.train_s, **regularisers(metrics)})
        self.bar.set_postfix(loss=f"{self.loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        self.bar.update(1)

    def evaluate_split(self, split: str) -> Evaluation:
        """``evaluate`` on held-out (``"val"``) or fixed training windows (``"train"``)."""
        batch = self.sampler.val_batch if split == "val" else self.sampler.train_eval_batch
        return evaluate(self.state[0], self.eval_step, batch, self.cfg.train.eval_batches,
                        self.corpus.bytes_per_token, self.parallel.batch)

    def evaluate(self, done: int) -> None:
        with self.clock.pause():
            self.evaluation, self.train_eval = self.evaluate_split("val"), self.evaluate_split("train")
        val = self.evaluation
        self.best_val = min(self.best_val, val.loss)
        self.logs.write("val", done, {"loss": val.loss, "bits_per_byte": val.bits_per_byte,
                                     "perplexity": val.perplexity, "nfe": val.nfe,
                                     "train_s": self.clock.train_s})
        self.logs.write("train_eval", done, {"loss": self.train_eval.loss})
        self.note(f"step {done}: val loss {val.loss:.4f} nats/token, {val.bits_per_byte:.4f} bits/byte, "
                 f"ppl {val.perplexity:.2f}; train loss (eval mode) {self.train_eval.loss:.4f}")

    def checkpoint(self, done: int) -> None:
        with self.clock.pause():
            self.checkpoints.save(done, self.state)

    def stop_if_signalled(self, done: int) -> None:
        """Ctrl-C / SIGTERM (agreed by every process): checkpoint this step, then stop."""
        signum = agreed_signal(self.interrupts.requested)
        if signum:
            raise TrainingInterrupted(signum, done, self.checkpoints.of(done, self.state))

    def result(self, parameters: int, sample: Sampler | None) -> TrainResult:
        """After the loop: the final evaluation (made now when a finished run was resumed)
        and the end-of-training sample."""
        model, cfg = self.state[0], self.cfg
        evaluation = self.evaluation or self.evaluate_split("val")
        text = ""
        if sample is not None and cfg.train.sample:
            local = local_copy(model)  # every process: gathering sharded (FSDP) weights is collective
            text = sample(local, cfg, self.corpus.tokenizer) if self.run.lead else ""
        if text:
            prompt = cfg.generate.prompt
            self.say(f"sample (up to {cfg.generate.max_new_tokens} tokens after {prompt!r}):\n{prompt}{text}")
        ms, ran = self.clock.ms_per_step, cfg.train.steps - self.start
        return TrainResult(self.run.path, cfg.train.steps, self.loss, evaluation, text,
                           best_val_loss=self.best_val if math.isfinite(self.best_val) else math.nan,
                           train_eval_loss=self.train_eval.loss if self.train_eval else math.nan,
                           skipped_steps=self.skipped, parameters=parameters,
                           wall_s=time.perf_counter() - self.session_start, ms_per_step=ms,
                           tokens_per_s=self.clock.tokens_per_step * 1000 / ms if math.isfinite(ms) else math.nan,
                           train_nfe=self.nfe_sum / ran if ran > 0 else math.nan,
                           step_memory_bytes=self.step_memory, compilations=self.train_step.traces)

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
    if not cfg.train.sample:
        return
    prompt = cfg.generate.prompt
    try:
        tokenizer.encode(prompt)
    except UserError as e:
        alphabet = set(getattr(tokenizer, "alphabet", ""))
        missing = ", ".join(repr(c) for c in sorted(set(prompt) - alphabet)) if alphabet else str(e)
        raise ConfigError(f"[generate] prompt = {prompt!r} has characters the {tokenizer.name} "
                          f"tokenizer of this corpus ({tokenizer.vocab_size} tokens) cannot encode: "
                          f"{missing}; change generate.prompt, set train.sample = false, or use "
                          "data.tokenizer = \"byte\"") from None
