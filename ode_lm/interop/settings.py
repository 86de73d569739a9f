"""The knobs of ``ode-lm crosscheck``; each field is a command-line flag of the same name
(``grad_params`` is ``--grad-params a,b``). Kept free of JAX so the CLI parser stays light."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ode_lm.config import SOLVERS
from ode_lm.errors import UserError

BACKENDS = ("reference", "julia")


def _knob(default, doc: str):
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class CrossCheckSettings:
    """Everything `ode-lm crosscheck` lets a user turn; the defaults are the stated tolerances."""

    solvers: tuple[str, ...] = _knob(SOLVERS, "solvers to compare, each where the backend has it")
    seq: int = _knob(16, "tokens per sequence of the random batch")
    batch: int = _knob(2, "sequences in the random batch")
    seed: int = _knob(0, "seed of the random tokens and of a config-built model's parameter jitter")
    vocab: int = _knob(256, "vocabulary of a config-built model (the byte tokenizer's)")
    fixed_tol: float = _knob(1e-10, "max abs difference of fixed-step solves on the same grid")
    adaptive_rtol: float = _knob(1e-10, "rtol = atol of both sides' adaptive solves")
    adaptive_tol: float = _knob(1e-6, "max abs difference of adaptive solves")
    adaptive_method: str = _knob("DOP853", "scipy.integrate.solve_ivp method of the reference: DOP853 or RK45")
    adaptive_max_steps: int = _knob(16384, "diffrax max_steps of the adaptive solves")
    grad_tol: float = _knob(1e-6, "max relative difference of gradients vs finite differences")
    fd_eps: float = _knob(1e-4, "step h of the fourth-order central difference")
    grad_adjoints: tuple[str, ...] = _knob(("checkpoint", "direct"),
                                           "exact discrete sensitivities to check (empty: no gradient rows)")
    grad_params: tuple[str, ...] = _knob(
        ("embedding.tokens", "block.attn.qkv.weight", "block.attn.proj.bias", "block.ln_attn.weight",
         "block.mlp.fc1.weight", "block.mlp.fc2.bias", "modulation.hidden.weight", "modulation.out.bias",
         "readout.norm.bias"),
        "parameter arrays whose largest-gradient entry is checked (export names, docs/interop.md)")
    julia_discrete_grad_tol: float = _knob(1e-8, "max relative difference, ReverseDiffAdjoint vs diffrax, same grid")
    julia_continuous_grad_tol: float = _knob(1e-5, "max relative difference, continuous adjoints vs diffrax, adaptive")

    def __post_init__(self):
        bad = [s for s in self.solvers if s not in SOLVERS]
        if bad or not self.solvers:
            raise UserError(f"--solvers {','.join(self.solvers)}: choose among {', '.join(SOLVERS)}")
        exact = ("checkpoint", "direct")
        if not set(self.grad_adjoints) <= set(exact):
            raise UserError(f"--grad-adjoints {','.join(self.grad_adjoints)}: finite differences check "
                            f"exact discrete gradients only; choose among {', '.join(exact)}")
        for name in ("seq", "batch", "vocab", "adaptive_max_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("fixed_tol", "adaptive_rtol", "adaptive_tol", "grad_tol", "fd_eps",
                     "julia_discrete_grad_tol", "julia_continuous_grad_tol"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0")
        if self.adaptive_method not in ("RK45", "DOP853"):
            raise UserError(f"--adaptive-method {self.adaptive_method}: choose RK45 or DOP853")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per settings field, defaulting to the field's default."""
    for f in dataclasses.fields(CrossCheckSettings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            parser.add_argument(flag, type=_comma_list, default=f.default, metavar="A,B,...",
                                help=f"{f.metadata['doc']} (default: {','.join(f.default)})")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f"{f.metadata['doc']} (default: {f.default})")


def from_arguments(args: argparse.Namespace) -> CrossCheckSettings:
    return CrossCheckSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CrossCheckSettings)})
