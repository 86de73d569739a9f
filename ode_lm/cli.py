"""``ode-lm train | generate | info | crosscheck``: the command line.

User errors (config, paths, checkpoints, prompts, data) print one line and exit with
status 2; a training failure prints one line and exits with status 1. Training stopped by
Ctrl-C or SIGTERM saves a checkpoint, prints how to resume and exits with 130 / 143
(128 + the signal number); a second signal ends the process at once, by the signal itself.
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
    from ode_lm.train import train

    from ode_lm.train.interrupts import TrainingInterrupted

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        again = shlex.join(["ode-lm", "train", args.config, *args.overrides, "--resume"])
        print(f"interrupted at step {e.step}; checkpoint saved to {e.checkpoint}; resume with: {again}",
              file=sys.stderr, flush=True)
        for signum in (signal.SIGINT, signal.SIGTERM):  # another one now ends the process outright,
            signal.signal(signum, signal.SIG_DFL)  # not with a traceback from interpreter shutdown
        return e.exit_status
    e = result.evaluation
    print(f"done: {result.steps} steps, val loss {e.loss:.4f} nats/token, {e.bits_per_byte:.4f} "
          f"bits/byte; run saved in {result.run_dir}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import jax

    from ode_lm.errors import UserError as Bad
    from ode_lm.generate import generate_recompute
    from ode_lm.train import load_run

    if args.temperature < 0:
        raise Bad(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if args.max_new_tokens < 1:
        raise Bad(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not args.prompt:
        raise Bad("--prompt is empty; give at least one character of text to continue")
    run = load_run(args.run, args.checkpoint, warn=lambda m: print(m, file=sys.stderr))
    prompt = run.tokenizer.encode(args.prompt)
    limit = run.config.model.max_positions
    if len(prompt) + args.max_new_tokens > limit:
        raise Bad(f"prompt ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
                  f"the model's max_positions = {limit}")
    ids = generate_recompute(run.model, prompt, args.max_new_tokens, run.config.ode,
                             key=jax.random.key(args.seed), temperature=args.temperature,
                             max_positions=limit)
    print(args.prompt + run.tokenizer.decode(ids))
    return 0


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
    return 0


def _crosscheck(args: argparse.Namespace) -> int:
    from ode_lm.interop.command import run_crosscheck
    from ode_lm.interop.settings import from_arguments

    return run_crosscheck(args.target, args.overrides, args.backend, from_arguments(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ode-lm", description="Continuous-depth transformer LMs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a TOML config")
    p.add_argument("config", help="TOML config file, e.g. configs/quickstart.toml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. ode.solver=rk4 train.steps=200")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="generate text from a trained run")
    p.add_argument("run", help="run directory (runs/<name>) or checkpoint file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="checkpoint file name inside the run")
    p.set_defaults(func=_generate)

    p = sub.add_parser("info", help="parameters per component, FLOPs per token and memory of a config's model")
    p.add_argument("config", help="TOML config file, e.g. configs/time_indexed.toml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=_info)

    from ode_lm.interop.settings import BACKENDS, add_arguments

    p = sub.add_parser("crosscheck", help="check solves and gradients against an independent float64 "
                       "implementation (docs/interop.md)")
    p.add_argument("target", help="run directory or checkpoint (trained weights), or a TOML config "
                   "(random-init model, no data needed)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (config target)")
    p.add_argument("--backend", choices=BACKENDS, default="reference",
                   help="reference: float64 NumPy/SciPy (always available); julia: OrdinaryDiffEq + "
                   "SciMLSensitivity through juliacall")
    add_arguments(p)
    p.set_defaults(func=_crosscheck)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing to save
        print("ode-lm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
