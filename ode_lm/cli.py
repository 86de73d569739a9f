"""``ode-lm train | generate | info | ablate | analyze | crosscheck``: the command line.

User errors (config, paths, checkpoints, prompts, data) print one line and exit with
status 2; a training failure prints one line and exits with status 1. Training stopped by
Ctrl-C or SIGTERM saves a checkpoint, prints how to resume and exits with 130 / 143
(128 + the signal number); a second signal ends the process at once, by the signal itself.
Outside the training loop (imports, data, the first compilation, other commands) a signal
ends the command at once with one line and the same status; before a run's first step has
run nothing of it has been written (ode_lm/train/interrupts.py, ode_lm/train/rundir.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from ode_lm.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from ode_lm.config import load_config
    from ode_lm.generate import training_sample
    from ode_lm.train import train

    from ode_lm.train.interrupts import TrainingInterrupted
    from ode_lm.train.parallel import is_lead

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite,
                       check_resources=not args.skip_resource_check, sample=training_sample)
    except TrainingInterrupted as e:
        again = shlex.join(["ode-lm", "train", args.config, *args.overrides, "--resume"])
        if is_lead():  # the process that wrote the checkpoint
            print(f"interrupted at step {e.step}; checkpoint saved to {e.checkpoint}; resume with: {again}",
                  file=sys.stderr, flush=True)
        for signum in (signal.SIGINT, signal.SIGTERM):  # another one now ends the process outright,
            signal.signal(signum, signal.SIG_DFL)  # not with a traceback from interpreter shutdown
        return e.exit_status
    e = result.evaluation
    if is_lead():
        print(f"done: {result.steps} steps, val loss {e.loss:.4f} nats/token, {e.bits_per_byte:.4f} "
              f"bits/byte; run saved in {result.run_dir}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ode_lm.config import config_from_dict
    from ode_lm.errors import GenerationError
    from ode_lm.generate import TextStream, check_settings, generate
    from ode_lm.train import load_run

    flags = {name: getattr(args, name) for name in GENERATE_FLAGS if getattr(args, name) is not None}
    for name, value in flags.items():  # name the flag in the message, before loading anything
        if name != "window" or value != WINDOW_AUTO:
            config_from_dict({"generate": {name: value}}, f"--{name.replace('_', '-')} {value}")
    if not args.prompt:
        raise GenerationError("--prompt is empty; give at least one character of text to continue")
    run = load_run(args.run, args.checkpoint, warn=lambda m: print(m, file=sys.stderr))
    limit = run.config.model.max_positions
    if flags.get("window") == WINDOW_AUTO:
        flags["window"] = max(1, limit // 4)
    settings = check_settings(run.config.generate, **flags)
    prompt = run.tokenizer.encode(args.prompt)
    if not args.skip_resource_check:
        check_generation_memory(run, settings, len(prompt))
    if settings.num_samples == 1:
        stream = TextStream(run.tokenizer)
        out = [args.prompt]  # printed with the first token, after generate() has checked its input

        def show(tokens):
            print(*out, stream.push(int(tokens[0])), sep="", end="", flush=True)
            out.clear()
        generate(run.model, prompt, run.config.ode, settings, on_token=show)
        print(stream.flush())
        return 0
    for i, ids in enumerate(generate(run.model, prompt, run.config.ode, settings)):
        print(f"--- sample {i + 1} of {settings.num_samples} ---\n{args.prompt}{run.tokenizer.decode(ids)}")
    return 0


def check_generation_memory(run, settings, prompt_tokens: int) -> None:
    """Refuse ``--num-samples`` / lengths whose caches cannot fit, before compiling anything."""
    from ode_lm.models import count_parameters
    from ode_lm.train.resources import check_generation_resources

    limit = run.config.model.max_positions
    length = limit if settings.window else min(limit, prompt_tokens + settings.max_new_tokens)
    check_generation_resources(run.config, run.tokenizer.vocab_size, count_parameters(run.model),
                               settings.num_samples, length, min(prompt_tokens, limit), settings.cache)


def _info(args: argparse.Namespace) -> int:
    import equinox as eqx
    import jax

    from ode_lm.config import load_config
    from ode_lm.models import build_model
    from ode_lm.models.accounting import describe
    from ode_lm.train.precision import param_dtype

    cfg = load_config(args.config, args.overrides)
    if cfg.data.tokenizer == "byte":
        vocab = 256
    else:  # the char alphabet is the corpus's: read (or build) the cached corpus
        from ode_lm.data import load_corpus
        vocab = load_corpus(cfg.data).tokenizer.vocab_size
    shapes = eqx.filter_eval_shape(build_model, cfg.model, vocab, jax.random.key(0), param_dtype(cfg))
    print(f"config: {args.config}")
    print(describe(cfg, vocab, shapes))
    from ode_lm.train.sharding import describe_state_memory
    print(describe_state_memory(cfg, vocab))
    return 0


# ``ode-lm generate`` flags that override the run's [generate] config (same names).
GENERATE_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "greedy",
                  "cache", "num_samples", "chunk", "unroll", "decode_weights", "seed", "window")
WINDOW_AUTO = -1  # bare ``--window``: drop max_positions // 4 tokens per slide



def _ablate(args: argparse.Namespace) -> int:
    from ode_lm import ablate
    from ode_lm.errors import UserError as Bad

    if args.eval_only:
        if args.ablation or args.overrides:
            raise Bad("--eval-only takes a run and --grid, not an ablation file or overrides")
        if not args.grid:
            raise Bad("--eval-only needs --grid, e.g. --grid \"ode.solver=euler,rk4\" \"ode.steps=2,4,8\"")
        report = ablate.eval_ablation(args.eval_only, ablate.parse_grid_args(args.grid), out=args.out,
                                      batches=args.batches)
        print(f"done: report in {report}")
        return 0
    if args.grid or args.batches is not None:
        raise Bad("--grid and --batches belong to --eval-only; a training ablation takes its grid "
                  "from the ablation file")
    if not args.ablation:
        raise Bad("give an ablation file (e.g. configs/ablations/solvers.toml) or --eval-only RUN")
    spec = ablate.load_ablation(args.ablation, args.overrides, out=args.out)
    if spec.compilation_cache:
        ablate.enable_compilation_cache(spec.out / "jax_cache")
    rows = ablate.run_ablation(spec, retry_failed=args.retry_failed)
    report = ablate.write_report(spec, rows)
    failed = sum(r["status"] != "ok" for r in rows.values())
    print(f"done: {len(rows) - failed} runs finished, {failed} failed; report in {report}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from ode_lm.analyze import analyze

    report = analyze(args.run, args.out, batches=args.batches, seed=args.seed)
    print(f"done: report in {report}")
    return 0


def _crosscheck(args: argparse.Namespace) -> int:
    from ode_lm.interop.command import run_crosscheck
    from ode_lm.interop.settings import from_arguments

    return run_crosscheck(args.target, args.overrides, args.backend, from_arguments(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ode-lm", description="Continuous-depth transformer LMs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_generate, _add_info, _add_ablate, _add_analyze, _add_crosscheck):
        add(sub)
    return parser


def _command(sub, name: str, func, help: str, *positional: tuple[str, str]) -> argparse.ArgumentParser:
    """A subcommand running ``func``, with its positional ``(name, help)`` arguments."""
    p = sub.add_parser(name, help=help)
    for arg, arg_help in positional:
        p.add_argument(arg, help=arg_help)
    p.set_defaults(func=func)
    return p


def _overrides(p: argparse.ArgumentParser, help: str = "config overrides") -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=help)


def _skip_resource_check(p: argparse.ArgumentParser, command: str, estimate: str) -> None:
    p.add_argument("--skip-resource-check", action="store_true",
                   help=f"{command} even when the {estimate} estimate says it cannot fit")


def _add_train(sub) -> None:
    p = _command(sub, "train", _train, "train a model from a TOML config",
                 ("config", "TOML config file, e.g. configs/quickstart.toml"))
    _overrides(p, "config overrides, e.g. ode.solver=rk4 train.steps=200")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory "
                   "(the old one is deleted once the new run's first step has run)")
    _skip_resource_check(p, "train", "memory or disk")


def _add_generate(sub) -> None:
    p = _command(sub, "generate", _generate, "generate text from a trained run (streams to the terminal)",
                 ("run", "run directory (runs/<name>) or checkpoint file"))
    p.add_argument("--prompt", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint file name inside the run")
    # Unset flags fall back to the run's [generate] config (see ode_lm/config.py).
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (1: all)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (1: off)")
    p.add_argument("--greedy", action="store_const", const=True, help="always take the most likely token")
    p.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                   help="recompute the whole sequence for every token (for comparison)")
    p.add_argument("--num-samples", type=int, help="independent samples of the prompt")
    p.add_argument("--chunk", type=int, help="tokens per device call while streaming (1: one per token)")
    p.add_argument("--unroll", type=int, help="tokens decoded per iteration of the device loop")
    p.add_argument("--decode-weights", help="auto, per_evaluation or shared (see generate.decode_weights)")
    p.add_argument("--seed", type=int)
    p.add_argument("--window", type=int, nargs="?", const=WINDOW_AUTO, metavar="N",
                   help="slide a window past max_positions, dropping N tokens each time "
                        "(default N: max_positions // 4)")
    _skip_resource_check(p, "generate", "memory")


def _add_info(sub) -> None:
    p = _command(sub, "info", _info, "parameters per component, FLOPs per token and memory of a config's model",
                 ("config", "TOML config file, e.g. configs/time_indexed.toml"))
    _overrides(p)


def _add_ablate(sub) -> None:
    p = _command(sub, "ablate", _ablate, "run a grid of training runs with statistics, or evaluate "
                 "one run under other solvers and step counts (--eval-only)")
    p.add_argument("ablation", nargs="?", help="ablation TOML, e.g. configs/ablations/solvers.toml")
    _overrides(p, "overrides of the base config, for every run (e.g. train.steps=300)")
    p.add_argument("--out", default=None, help="ablation directory (default: from the file, or "
                   "runs/ablations/<name>; with --eval-only: <run>/depth_ablation)")
    p.add_argument("--retry-failed", action="store_true", help="run again the points recorded as failed")
    p.add_argument("--eval-only", metavar="RUN", default=None,
                   help="evaluate a trained run (runs/<name>) under --grid, without training")
    p.add_argument("--grid", nargs="+", metavar="ode.key=v1,v2", default=None,
                   help="with --eval-only: [ode] keys and values, e.g. ode.solver=euler,rk4 ode.steps=2,4,8")
    p.add_argument("--batches", type=int, default=None,
                   help="with --eval-only: held-out batches per setting (default: train.eval_batches)")


def _add_analyze(sub) -> None:
    p = _command(sub, "analyze", _analyze, "refinement, Jacobian spectrum, Lyapunov exponents, energy and "
                 "gates of a trained run (docs/analysis.md)", ("run", "run directory (runs/<name>) or checkpoint file"))
    p.add_argument("--out", required=True, help="output directory: new, empty, or a previous analysis")
    p.add_argument("--batches", type=int, default=4, help="held-out batches of the refinement (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probes (default 0)")


def _add_crosscheck(sub) -> None:
    from ode_lm.interop.settings import BACKENDS, add_arguments

    p = _command(sub, "crosscheck", _crosscheck, "check solves and gradients against an independent float64 "
                 "implementation (docs/interop.md)",
                 ("target", "run directory or checkpoint (trained weights), or a TOML config "
                  "(random-init model, no data needed)"))
    _overrides(p, "config overrides (config target)")
    p.add_argument("--backend", choices=BACKENDS, default="reference",
                   help="reference: float64 NumPy/SciPy (always available); julia: OrdinaryDiffEq + "
                   "SciMLSensitivity through juliacall")
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    # First of all, before the heavy imports: Ctrl-C / SIGTERM from now on stop the command in
    # one line (ode_lm/train/interrupts.py), wherever they land.
    from ode_lm.train.interrupts import EarlyInterrupt, StartupGuard, startup_guard

    ours = startup_guard() is None
    guard = StartupGuard().install() if ours else startup_guard()
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # outside the training loop: nothing to save
        if not isinstance(e, EarlyInterrupt):  # e.g. a grid's run stopped after its checkpoint
            e = EarlyInterrupt(getattr(e, "signum", signal.SIGINT), before_start=False)
        guard.announce(e.message())
        return e.exit_status
    finally:
        if ours:
            guard.uninstall()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # Overrides may come after flags (``train cfg --resume ode.steps=8``): collect them here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ode_lm.train import TrainingError

    try:
        return args.func(args)
    except UserError as e:
        print(f"ode-lm: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"ode-lm: training stopped: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - XLA's allocator: a size the up-front estimate let through
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")[:300]
        print(f"ode-lm: error: out of memory ({first}); lower train.batch_size, data.seq_len or the model's "
              "size (for generate: --num-samples or --max-new-tokens)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before main() could install its handler
        sys.exit(130)
