"""Typed configuration.

A config file is TOML with the sections ``[model] [ode] [data] [train] [optim] [log]
[checkpoint]``. Each section loads into a frozen dataclass below; every knob a user can turn
is a field here, with its allowed values in the field's metadata. Command-line overrides are
dotted ``section.key=value`` pairs, parsed as TOML values and checked like the file.

Each section checks itself on construction (:class:`Section`), so a config made in code or
by ``dataclasses.replace`` obeys the same rules as a file; :class:`Config` checks the rules
between sections. Anything wrong raises :class:`ConfigError` naming the key (``ode.solver``),
the value given and what is allowed (with a close-match suggestion for typos); loading a file
or an override adds where it was given (``c.toml: [ode] solver = ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ode_lm.errors import ConfigError, suggest, unknown_name
from ode_lm.paths import plain_name_problem

# One name per concept: these tuples are the registry keys, config values and CLI values.
FAMILIES = ("standard", "hypernetwork", "time_indexed", "time_indexed_ssm", "constant")
ODE_FAMILIES = tuple(f for f in FAMILIES if f != "standard")
SOLVERS = ("euler", "heun", "midpoint", "rk4", "tsit5", "dopri5", "reversible_heun")
# Solvers with an embedded error estimate, i.e. usable with adaptive step-size control.
ADAPTIVE_SOLVERS = ("heun", "midpoint", "rk4", "tsit5", "dopri5", "reversible_heun")
ADJOINTS = ("checkpoint", "direct", "backsolve", "reversible")
# The reversible sensitivity wraps a one-step explicit Runge--Kutta method (reversible_heun
# already carries a second state of its own, so it cannot be wrapped).
REVERSIBLE_SOLVERS = ("euler", "heun", "midpoint", "rk4", "tsit5", "dopri5")
SOURCES = ("python-stdlib", "text", "hf")
TOKENIZERS = ("byte", "char", "bpe")
# How one corpus is divided into train and validation text (without val_paths / hf_val_split).
SPLITS = ("auto", "documents", "tail")
DTYPES = ("float32", "float64", "bfloat16")  # bfloat16: float32 params, bf16 compute
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# The layer form: GPT-2's sequential sub-layers, or attention and MLP side by side (the form
# of the ODE families' vector field); "auto": sequential for `standard`, parallel otherwise.
BLOCK_FORMS = ("auto", "sequential", "parallel")
DROPOUT_MASKS = ("per_solve", "per_step")  # masks of an ODE solve: fixed over it, or new per step
HYPER_FORMS = ("dense", "rank_one")  # how the hypernetwork generates the block's matrices
# model.dropout is the shorthand for these three; each one given explicitly wins over it.
DROPOUT_KEYS = ("embd_dropout", "attn_dropout", "resid_dropout")
FROM_DROPOUT = -1.0  # the default of those three: "take model.dropout" (resolved on construction)
SSM_SCANS = ("auto", "associative", "sequential", "chunked")  # how the SSM runs along the sequence
SSM_FORMS = ("channel", "head")  # the SSM's decay: per channel and state, or one per head
DECODE_WEIGHTS = ("auto", "per_evaluation", "shared")  # generate.decode_weights (models/base.py)
GATE_APPLY = ("auto", "weights", "activations")  # where a gated Linear's gate multiplies (nn/layers.py)
SSM_CARRIES = ("matmul", "scan")  # how form head's chunked scan passes states between chunks
SSM_PRODUCTS = ("wide", "compute")  # the dtype of form head's chunked matrix products
NONFINITE_ACTIONS = ("stop", "skip")  # what a step with a non-finite loss or gradient does
CHECKPOINT_FORMATS = ("auto", "file", "orbax")  # auto: orbax when train.fsdp, else file
MATMUL_PRECISIONS = ("default", "high", "highest")  # float32 products; "default": TF32 on NVIDIA GPUs
CHECKPOINT_SAVES = ("states", "matmuls")  # what fixed-step `checkpoint` keeps for the backward pass
SAVES_CHOICES = ("auto", *CHECKPOINT_SAVES)  # ode.checkpoint_saves: a policy, or "auto"
# How a fixed-step backprop solve runs its steps: a scan, written out, or "auto" (written out
# on a GPU up to ode_lm.ode.sensitivities.AUTO_UNROLL_MAX_NFE evaluations, scanned beyond and on a CPU). The TOML
# booleans of earlier configs still read: true = "unroll", false = "scan".
UNROLL_MODES = ("auto", "scan", "unroll")
UNROLL_BOOLEANS = {True: "unroll", False: "scan"}
# Sensitivities a training solve with grid jitter or dynamics regularisers runs under.
TRAINING_SOLVE_ADJOINTS = ("checkpoint", "direct")
TRAINING_OPTIONS = ("grid_jitter", "steps_range", "kinetic_weight", "jacobian_weight")  # [ode] training-only keys


def knob(default: Any, *, choices: tuple | None = None, ge=None, gt=None, le=None, lt=None,
         doc: str = "", booleans: dict | None = None) -> Any:
    """A config field with its allowed values. ``ge/gt/le/lt`` bound numbers; ``booleans``
    maps ``true`` / ``false`` to a string knob's values (a knob that was boolean once)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc, "booleans": booleans}
    return field(default=default, metadata=meta)


class Section:
    """A config section (a frozen dataclass of knobs) that checks itself on construction, so
    one made in code (``ODEConfig(...)``, ``dataclasses.replace``) is held to the same rules
    as a file: every value against its ``knob(...)`` metadata, then :meth:`check`, the rules
    between this section's keys. Errors name the key as users type it (``ode.solver``)."""

    def __post_init__(self) -> None:
        for name, knob in _knobs(type(self)).items():
            value = getattr(self, name)
            if value is knob.default:  # the defaults are checked by a test, not on every construction
                continue
            checked = _check_field(knob, value)
            if checked is not value:  # coerced: 1 -> 1.0, a list -> a tuple, a knob's old boolean
                object.__setattr__(self, name, checked)
        self.check()

    def check(self) -> None:
        """The rules between this section's keys (none unless a section has some)."""


@dataclass(frozen=True)
class ModelConfig(Section):
    family: str = knob("time_indexed", choices=FAMILIES, doc="model family")
    dim: int = knob(256, ge=8, doc="hidden size")
    heads: int = knob(4, ge=1, doc="attention heads; must divide dim")
    mlp_ratio: int = knob(4, ge=1, doc="MLP hidden size / dim")
    layers: int = knob(6, ge=1, doc="number of discrete layers (family 'standard' only)")
    max_positions: int = knob(512, ge=1, doc="learned positions; longest sequence")
    dropout: float = knob(0.1, ge=0.0, lt=1.0, doc="shorthand: sets embd_dropout, attn_dropout and "
                          "resid_dropout (each one given explicitly wins)")
    embd_dropout: float = knob(FROM_DROPOUT, ge=0.0, lt=1.0, doc="dropout of token + position embeddings "
                               "(GPT-2's embd_pdrop)")
    attn_dropout: float = knob(FROM_DROPOUT, ge=0.0, lt=1.0, doc="dropout of the attention probabilities "
                               "(GPT-2's attn_pdrop; training then takes the explicit-softmax attention)")
    resid_dropout: float = knob(FROM_DROPOUT, ge=0.0, lt=1.0, doc="dropout of each residual branch's output, "
                                "attention and MLP (GPT-2's resid_pdrop)")
    dropout_masks: str = knob("per_solve", choices=DROPOUT_MASKS,
                              doc="ODE families: masks fixed over a solve (f stays deterministic, as "
                              "adaptive steps and backsolve need) or new at every fixed step (Tong et "
                              "al.'s training; fixed steps with adjoint checkpoint or direct only)")
    block: str = knob("auto", choices=BLOCK_FORMS,
                      doc="layer form: GPT-2's sequential sub-layers or parallel attention + MLP; auto: "
                      "sequential for family 'standard' (GPT-2), parallel for the ODE families, "
                      "whose vector field is the parallel block")
    bias: bool = knob(True, doc="biases in every Linear and LayerNorm (false: none, as nanoGPT's bias=False)")
    tie_embeddings: bool = knob(True, doc="share token embedding and LM head")
    time_embed_dim: int = knob(32, ge=2, doc="sinusoidal features of t (even)")
    time_max_frequency: float = knob(100.0, gt=0.0, doc="highest frequency (rad per unit depth-time) of "
                                     "the sinusoidal features of t; above pi * ode.steps a fixed grid "
                                     "aliases them (nn/time_embedding.py)")
    gate_apply: str = knob("auto", choices=GATE_APPLY,
                           doc="where the time_indexed / constant / time_indexed_ssm gates multiply: the "
                           "weights' columns, W * gate (weights), or the products' outputs, (x W) * gate "
                           "(activations); the same layer. auto: the weights when a call has at least as "
                           "many tokens as the layer has inputs (training, prefill), else the activations "
                           "(few-token decoding)")
    modulation_hidden: int = knob(64, ge=1, doc="hidden units of the modulation MLP (and of the SSM's "
                                  "parameter MLP, family 'time_indexed_ssm')")
    hyper_form: str = knob("dense", choices=HYPER_FORMS,
                           doc="family 'hypernetwork': 'dense' is Tong et al.'s continuous transformer "
                           "(every matrix a dense linear map of a time embedding: tens of millions of "
                           "parameters), 'rank_one' generates rank-one updates of a base block")
    hyper_hidden: int = knob(64, ge=1, doc="family 'hypernetwork': width E of each time embedding e(t) "
                             "(dense; Tong et al.'s time-embedding dim), or hidden units and rank of the "
                             "generated updates (rank_one)")
    ssm_state_size: int = knob(64, ge=4, le=256, doc="SSM state size (family 'time_indexed_ssm')")
    ssm_scan: str = knob("auto", choices=SSM_SCANS,
                         doc="SSM scan over the sequence: sequential (a loop; the fastest on CPU for form "
                         "channel), associative (parallel, O(log T) depth; materialises batch x seq x dim x "
                         "state per level), chunked (chunks of ssm_chunk positions, one state carried between "
                         "them; memory independent of seq) or auto (chunked for form head; for form channel "
                         "sequential on CPU, associative elsewhere)")
    ssm_chunk: int = knob(64, ge=1, doc="positions per chunk of ssm_scan = chunked")
    ssm_form: str = knob("channel", choices=SSM_FORMS,
                         doc="SSM decay: channel (exp(Delta A) per channel and state, Mamba) or head (one "
                         "Delta and scalar A per head, Mamba-2; chunked runs as matrix products)")
    ssm_heads: int = knob(4, ge=1, doc="SSM heads of ssm_form = head; must divide dim")
    ssm_carry: str = knob("matmul", choices=SSM_CARRIES,
                          doc="ssm_form = head, chunked: each chunk's starting state from the chunks before "
                          "it by one masked product over chunks (matmul, Mamba-2's state passing; no loop) or "
                          "a sequential scan over chunks (scan); the same sums in another order")
    ssm_products: str = knob("wide", choices=SSM_PRODUCTS,
                             doc="ssm_form = head, chunked: the matrix products within and between chunks "
                             "take inputs in >= float32 (wide) or in the compute dtype (compute: bf16 under "
                             "mixed precision, as Mamba-2's kernels; the decays and cumulative sums stay wide)")
    init_std: float = knob(0.02, gt=0.0, doc="std of the normal weight initialisation")
    attention: str = knob("auto", choices=ATTENTION_IMPLEMENTATIONS,
                          doc="attention kernel; auto: cuDNN flash on GPU for bf16/fp16, else XLA")

    def __post_init__(self):
        for name in DROPOUT_KEYS:
            if getattr(self, name) == FROM_DROPOUT:
                object.__setattr__(self, name, self.dropout)
        super().__post_init__()

    def check(self) -> None:
        if self.dim % self.heads:
            raise _bad("model.heads", f" = {self.heads} does not divide dim = {self.dim}; pick heads "
                       "among the divisors of dim")
        if self.block == "sequential" and self.family != "standard":
            raise _bad("model.block", f" = \"sequential\" is GPT-2's discrete layer; the ODE family "
                       f"'{self.family}' has the parallel block as its vector field (one evaluation is "
                       "one f); use block = \"auto\" or \"parallel\"")
        if self.ssm_form == "head" and self.dim % self.ssm_heads:
            raise _bad("model.ssm_heads", f" = {self.ssm_heads} does not divide dim = {self.dim}; pick "
                       "ssm_heads among the divisors of dim")
        if self.time_embed_dim % 2:
            raise _bad("model.time_embed_dim", f" = {self.time_embed_dim} must be even")
        if self.family == "hypernetwork" and self.hyper_form == "rank_one" and not self.bias:
            raise _bad("model.bias", " = false: the rank-one hypernetwork (hyper_form = \"rank_one\") "
                       "generates offsets of the block's biases; set bias = true or hyper_form = \"dense\"")

    @property
    def sequential(self) -> bool:
        """Whether layers are GPT-2's sequential sub-layers (``block`` resolved)."""
        return self.block == "sequential" or (self.block == "auto" and self.family == "standard")


@dataclass(frozen=True)
class ODEConfig(Section):
    solver: str = knob("euler", choices=SOLVERS, doc="ODE solver")
    steps: int = knob(6, ge=1, doc="fixed steps over t in [0, 1] (initial step count if adaptive)")
    adaptive: bool = knob(False, doc="adaptive step-size control (PID)")
    rtol: float = knob(1e-3, gt=0.0, doc="relative tolerance (adaptive)")
    atol: float = knob(1e-6, gt=0.0, doc="absolute tolerance (adaptive)")
    max_steps: int = knob(256, ge=1, doc="most steps an adaptive solve may take")
    pcoeff: float = knob(0.0, ge=0.0, doc="PID controller proportional coefficient")
    icoeff: float = knob(1.0, gt=0.0, doc="PID controller integral coefficient")
    dcoeff: float = knob(0.0, ge=0.0, doc="PID controller derivative coefficient")
    adjoint: str = knob("checkpoint", choices=ADJOINTS, doc="sensitivity (gradient) method")
    checkpoint_saves: str = knob("auto", choices=SAVES_CHOICES,
                                 doc="adjoint \"checkpoint\" on fixed steps keeps each step's state and "
                                     "recomputes the rest ('states'), or keeps the matrix products', "
                                     "fused attention's and the standardisation's outputs instead, "
                                     "recomputing only elementwise work ('matmuls': more memory, "
                                     "less recomputation); 'auto': 'matmuls' where the solve is "
                                     "unrolled on a GPU (ode.unroll), 'states' everywhere else")
    unroll: str = knob("auto", choices=UNROLL_MODES, booleans=UNROLL_BOOLEANS,
                       doc="fixed steps with adjoint \"checkpoint\" or \"direct\": \"unroll\" writes the "
                           "steps out one by one instead of scanning one compiled step (compile time "
                           "grows with steps; faster on a GPU, where the scan copies every step's saved "
                           "values into stacks); \"auto\": unrolled on a GPU up to 16 evaluations, "
                           "scanned beyond, on a CPU and where unrolling does not apply; true / false "
                           "read as \"unroll\" / \"scan\"")
    grid_jitter: float = knob(0.0, ge=0.0, le=1.0, doc="training only: move each interior step time of "
                              "the fixed grid uniformly within this fraction of a step around n/steps, "
                              "drawn afresh per batch (0: the fixed grid; 1: one random time per cell); "
                              "evaluation uses the fixed grid")
    steps_range: tuple[int, ...] = knob((), doc="training only: [lo, hi] draws the number of fixed steps "
                                        "of each batch uniformly from lo .. hi (one compiled masked solve "
                                        "of hi steps); evaluation uses ode.steps; [] (default): off")
    kinetic_weight: float = knob(0.0, ge=0.0, doc="training loss += this x integral of ||f||^2 dt per "
                                 "token (kinetic energy regulariser, Finlay et al. 2020)")
    jacobian_weight: float = knob(0.0, ge=0.0, doc="training loss += this x integral of ||df/dx||_F^2 dt "
                                  "per token, by a Hutchinson estimator (Finlay et al. 2020)")
    reversible: bool = knob(False, doc="alias: true selects adjoint = \"reversible\"")
    reversible_coupling: float = knob(0.999, gt=0.0, le=1.0,
                                      doc="coupling lambda of the reversible scheme; < 1 damps its "
                                      "parasitic mode, 1 is the undamped (least stable) scheme")

    def __post_init__(self):
        if self.adjoint == "reversible":  # ode.reversible is an alias of adjoint = "reversible"
            object.__setattr__(self, "reversible", True)
        super().__post_init__()

    def check(self) -> None:
        if self.reversible and self.adjoint != "reversible":
            raise _bad("ode.reversible", f" = true selects adjoint = \"reversible\", but adjoint = "
                       f"\"{self.adjoint}\" is also given; drop one of the two")
        fixed = f"here adjoint = \"{self.adjoint}\", adaptive = {str(self.adaptive).lower()}"
        if self.adaptive and self.solver not in ADAPTIVE_SOLVERS:
            raise _bad("ode.solver", f" = \"{self.solver}\" has no error estimate, so adaptive = true is "
                       f"not possible; use one of {', '.join(ADAPTIVE_SOLVERS)}")
        if self.adjoint == "reversible" and self.solver not in REVERSIBLE_SOLVERS:
            raise _bad("ode.adjoint", f" = \"reversible\" wraps an explicit Runge-Kutta solver; solver = "
                       f"\"{self.solver}\" is not one; use one of {', '.join(REVERSIBLE_SOLVERS)}")
        if self.checkpoint_saves == "matmuls" and (self.adjoint != "checkpoint" or self.adaptive):
            raise _bad("ode.checkpoint_saves", f" = \"{self.checkpoint_saves}\" applies to adjoint = "
                       f"\"checkpoint\" with fixed steps (adaptive = false); {fixed}; leave "
                       "checkpoint_saves = \"states\"")
        if self.unroll == "unroll" and (self.adjoint not in ("checkpoint", "direct") or self.adaptive):
            raise _bad("ode.unroll", " = \"unroll\" (or true) writes out the fixed steps of adjoint = "
                       f"\"checkpoint\" or \"direct\" (adaptive = false); {fixed}; leave unroll = "
                       "\"auto\" or \"scan\"")
        lo, hi = (*self.steps_range, 0, 0)[:2]
        if self.steps_range and (len(self.steps_range) != 2 or not 1 <= lo <= hi):
            raise _bad("ode.steps_range", f" = {list(self.steps_range)} must be [lo, hi] with 1 <= lo <= hi "
                       "(the number of fixed steps drawn per training batch), or [] for off")
        set_ = self.training_options()
        if set_ and (self.adaptive or self.adjoint not in TRAINING_SOLVE_ADJOINTS):
            raise _bad(f"ode.{set_[0]}", _assigned(self, set_)[len(set_[0]):] + " needs fixed steps (adaptive "
                       f"= false) and adjoint = \"checkpoint\" or \"direct\"; {fixed}; change those or turn it off "
                       "(0, or [] for steps_range)")

    def training_options(self) -> list[str]:
        """The training-only options that are set (grid jitter, steps range, dynamics regularisers)."""
        return [k for k in TRAINING_OPTIONS if (bool(getattr(self, k)) if k == "steps_range" else getattr(self, k) > 0)]


@dataclass(frozen=True)
class DataConfig(Section):
    source: str = knob("python-stdlib", choices=SOURCES, doc="corpus source")
    paths: tuple[str, ...] = knob((), doc="files, directories or globs (source 'text')")
    val_paths: tuple[str, ...] = knob((), doc="validation files, directories or globs (source 'text'), "
                                      "used as is; files also matched by paths leave the training side")
    hf_name: str = knob("", doc="Hugging Face dataset name (source 'hf'), e.g. 'wikitext'")
    hf_config: str = knob("", doc="Hugging Face dataset config, e.g. 'wikitext-2-raw-v1'")
    hf_split: str = knob("train", doc="Hugging Face split to read")
    hf_val_split: str = knob("", doc="Hugging Face split used as is for validation, e.g. 'validation' "
                             "(empty: hold out part of hf_split, see split)")
    hf_data_files: tuple[str, ...] = knob((), doc="local files for a datasets builder (hf_name 'json', "
                                          "'parquet', 'csv' or 'text'): 'path' (split train) or "
                                          "'split=path', globs allowed")
    text_field: str = knob("text", doc="column holding the text (sources 'text', 'hf')")
    tokenizer: str = knob("byte", choices=TOKENIZERS, doc="tokenizer: bytes, corpus characters, or "
                          "byte-level BPE trained on the training split")
    vocab_size: int = knob(4096, ge=1, doc="BPE vocabulary, the 256 byte symbols and the "
                           "end-of-document token included (tokenizer 'bpe')")
    tokenizer_file: str = knob("", doc="a Hugging Face tokenizer.json to use instead of training "
                               "BPE (tokenizer 'bpe')")
    seq_len: int = knob(128, ge=2, doc="training window length in tokens")
    val_fraction: float = knob(0.05, gt=0.0, lt=1.0, doc="share of the corpus held out for validation")
    split: str = knob("auto", choices=SPLITS, doc="documents: whole documents by hash of their name; "
                      "tail: the last val_fraction of every document; auto: documents when the hash "
                      "split holds out about val_fraction of the text, else tail")
    workers: int = knob(0, ge=0, doc="processes tokenizing a large corpus (0: one per CPU core, at most 8)")
    max_bytes: int = knob(0, ge=0, doc="cap on corpus bytes read (0: everything)")
    cache_dir: str = knob("~/.cache/ode-lm", doc="where tokenized corpora are cached")

    def check(self) -> None:
        """Where the text comes from, the validation side and the tokenizer settings."""
        if self.source == "text" and not self.paths:
            raise _bad("data.source", " = \"text\" needs paths = [\"file.txt\", ...] (files, directories or globs)")
        if self.source == "hf" and not self.hf_name:
            raise _bad("data.source", " = \"hf\" needs hf_name (e.g. \"wikitext\")")
        for key, owner in (("val_paths", "text"), ("hf_val_split", "hf"), ("hf_data_files", "hf")):
            if getattr(self, key) and self.source != owner:
                raise _bad(f"data.{key}", f" belongs to source = \"{owner}\"; here source = \"{self.source}\"; "
                           f"drop {key} or set source = \"{owner}\"")
        given = "val_paths" if self.val_paths else "hf_val_split" if self.hf_val_split else ""
        if given and self.split != "auto":
            raise _bad("data.split", f" = \"{self.split}\" divides one corpus, but {given} already gives the "
                       f"validation text; drop split or {given}")
        if self.tokenizer_file and self.tokenizer != "bpe":
            raise _bad("data.tokenizer_file", " (a Hugging Face tokenizer.json) is used with tokenizer = "
                       f"\"bpe\"; here tokenizer = \"{self.tokenizer}\"")
        if self.tokenizer == "bpe" and not self.tokenizer_file and self.vocab_size <= 256:
            raise _bad("data.vocab_size", f" = {self.vocab_size} is below the 256 byte symbols plus the "
                       "end-of-document token of byte-level BPE; use at least 257 (default 4096)")


@dataclass(frozen=True)
class TrainConfig(Section):
    run_name: str = knob("run", doc="run directory name under runs_dir: one plain name (no '/', "
                         "not '.' or '..'), since --overwrite replaces runs_dir/run_name")
    runs_dir: str = knob("runs", doc="parent directory of run directories")
    steps: int = knob(1000, ge=1, doc="optimizer steps")
    batch_size: int = knob(32, ge=1, doc="sequences per step")
    seed: int = knob(0, ge=0, le=2**32 - 1, doc="seed for init, data order and dropout")
    on_nonfinite: str = knob("stop", choices=NONFINITE_ACTIONS,
                             doc="a non-finite loss or gradient norm: stop the run, or skip the update")
    dtype: str = knob("float32", choices=DTYPES,
                      doc="compute dtype; bfloat16 keeps float32 parameters, ODE state and loss")
    matmul_precision: str = knob("default", choices=MATMUL_PRECISIONS,
                                 doc="float32 matrix products: 'default' lets the backend choose "
                                     "(TF32 on NVIDIA GPUs, ~1e-3 relative), 'highest' is full float32")
    data_parallel: bool = knob(True, doc="shard the batch over all devices (params replicated)")
    fsdp: bool = knob(False, doc="also shard parameters and optimizer state over the devices "
                      "(FSDP / ZeRO-3): each matrix along its largest dimension divisible by the "
                      "device count, vectors and scalars replicated; needs data_parallel")
    distributed: bool = knob(False, doc="multi-process: call jax.distributed.initialize() with the "
                             "three keys below; those left unset come from the cluster's auto-detection "
                             "(SLURM, Open MPI, Kubernetes, Cloud TPU) or JAX_COORDINATOR_ADDRESS")
    coordinator_address: str = knob("", doc="host:port of process 0's coordinator (train.distributed)")
    num_processes: int = knob(0, ge=0, doc="processes in the run, 0: auto-detect (train.distributed)")
    process_id: int = knob(-1, ge=-1, doc="this process's index, -1: auto-detect (train.distributed)")
    join_timeout: int = knob(300, ge=1, doc="seconds a process waits for the coordinator and the "
                             "other processes to join (train.distributed)")
    eval_every: int = knob(200, ge=1, doc="evaluate every N steps (and at the end)")
    eval_batches: int = knob(20, ge=1, doc="held-out batches per evaluation")
    sample: bool = knob(True, doc="print a sample at the end of training, as [generate] sets it "
                        "(prompt, max_new_tokens, temperature, ...)")

    def check(self) -> None:
        """The run's directory name and the multi-process settings."""
        problem = plain_name_problem(self.run_name)
        if problem:  # runs_dir / run_name is replaced by --overwrite: it must stay inside runs_dir
            raise _bad("train.run_name", f" = {self.run_name!r} {problem}; it must be one plain directory "
                       "name (no '/', not '.' or '..'), e.g. \"quickstart\"")
        if not self.distributed and (self.coordinator_address or self.num_processes or self.process_id != -1):
            raise _bad("train.coordinator_address", ", num_processes and process_id configure a multi-process "
                       "run; set train.distributed = true to use them")
        host, _, port = self.coordinator_address.rpartition(":")
        if self.coordinator_address and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise _bad("train.coordinator_address", f" = {self.coordinator_address!r} is not host:port "
                       "(e.g. \"10.0.0.1:1234\", a port in 1 ... 65535)")
        if self.num_processes and not -1 <= self.process_id < self.num_processes:
            raise _bad("train.process_id", f" = {self.process_id} is out of range for num_processes = "
                       f"{self.num_processes}; use 0 ... {self.num_processes - 1}")


@dataclass(frozen=True)
class OptimConfig(Section):
    lr: float = knob(1e-3, gt=0.0, doc="peak learning rate")
    warmup_steps: int = knob(100, ge=0, doc="linear warmup steps")
    min_lr_ratio: float = knob(0.1, ge=0.0, le=1.0, doc="final lr / peak lr (cosine decay)")
    weight_decay: float = knob(0.1, ge=0.0, doc="AdamW decoupled weight decay (matrices only)")
    b1: float = knob(0.9, ge=0.0, lt=1.0, doc="Adam beta1")
    b2: float = knob(0.95, ge=0.0, lt=1.0, doc="Adam beta2")
    eps: float = knob(1e-8, gt=0.0, doc="Adam epsilon")
    grad_clip: float = knob(1.0, gt=0.0, doc="global-norm gradient clipping")


@dataclass(frozen=True)
class LogConfig(Section):
    every: int = knob(10, ge=1, doc="write train scalars every N steps")
    tensorboard: bool = knob(True, doc="write TensorBoard events")
    progress: bool = knob(True, doc="show a progress bar")


@dataclass(frozen=True)
class CheckpointConfig(Section):
    every: int = knob(500, ge=1, doc="checkpoint every N steps (and at the end)")
    keep: int = knob(3, ge=1, doc="newest checkpoints kept")
    resume: bool = knob(False, doc="continue from the newest checkpoint of the run")
    format: str = knob("auto", choices=CHECKPOINT_FORMATS,
                       doc="file: one verified file per step written by process 0; orbax: a "
                           "directory per step, every process writing its shards, saved in the "
                           "background (orbax-checkpoint); auto: orbax when train.fsdp, else file. "
                           "Resuming and loading read both")


@dataclass(frozen=True)
class GenerateConfig(Section):
    """Text generation (``ode-lm generate`` flags of the same names override these)."""

    prompt: str = knob("def ", doc="prompt of the end-of-training sample (train.sample; ode-lm "
                       "generate takes --prompt)")
    max_new_tokens: int = knob(200, ge=1, doc="tokens to generate")
    temperature: float = knob(0.8, ge=0.0, doc="softmax temperature; 0 is greedy")
    top_k: int = knob(0, ge=0, doc="sample among the k most likely tokens (0: all)")
    top_p: float = knob(1.0, gt=0.0, le=1.0, doc="nucleus: smallest set with this probability (1: all)")
    repetition_penalty: float = knob(1.0, gt=0.0, doc="divide positive / multiply negative logits "
                                     "of tokens already present (1: off)")
    greedy: bool = knob(False, doc="always take the most likely token")
    cache: bool = knob(True, doc="KV-cached decoding; false recomputes the whole sequence per token")
    num_samples: int = knob(1, ge=1, doc="independent samples of the same prompt (one batch)")
    chunk: int = knob(32, ge=1, doc="tokens per device call while streaming (one compiled loop "
                      "each; 1: a call per token)")
    unroll: int = knob(4, ge=1, doc="tokens decoded per iteration of the device loop (a GPU pays the "
                       "loop's control once per iteration; more compiles longer)")
    decode_weights: str = knob("auto", choices=DECODE_WEIGHTS,
                               doc="the weights a cached decoding step reads, for families whose block "
                               "does not change with t (time_indexed, constant, time_indexed_ssm): each "
                               "evaluation's gates folded into its own copy (per_evaluation: fewest "
                               "kernels) or one copy with the gates on the products' outputs (shared: "
                               "one copy in the caches); auto: per_evaluation on a GPU, else shared")
    seed: int = knob(0, ge=0, doc="sampling seed")
    window: int = knob(0, ge=0, doc="sliding window: tokens dropped from the front when the context "
                       "exceeds max_positions (0: off, exceeding max_positions is an error)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self):
        _check_across_sections(self)

    def to_toml(self) -> str:
        """The fully resolved config as TOML; ``load_config`` reads it back unchanged."""
        lines = []
        for name in SECTIONS:
            section = getattr(self, name)
            lines.append(f"[{name}]")
            for f in dataclasses.fields(section):
                lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
            lines.append("")
        return "\n".join(lines)

    def replace(self, **dotted: Any) -> "Config":
        """A copy with ``{"ode.solver": "rk4", ...}`` replaced, validated like an override."""
        raw = self.to_dict()
        # ode.reversible aliases ode.adjoint: the one given here wins over the stored other.
        if "ode.reversible" in dotted and "ode.adjoint" not in dotted:
            raw["ode"].pop("adjoint")
        if "ode.adjoint" in dotted and "ode.reversible" not in dotted:
            raw["ode"].pop("reversible")
        _rederive_dropout(raw, {tuple(key.split(".", 1)) for key in dotted})
        for key, value in dotted.items():
            section, name = _split_key(key, "replace()")
            raw.setdefault(section, {})[name] = value
        return config_from_dict(raw, source="replace()")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
SECTION_NAMES: dict[type, str] = {cls: name for name, cls in SECTIONS.items()}


def _check_across_sections(c: Config) -> None:
    """The rules between keys of different sections (each section checks its own)."""
    m, o = c.model, c.ode
    if m.dropout_masks == "per_step" and m.family != "standard" and (
            o.adaptive or o.adjoint not in TRAINING_SOLVE_ADJOINTS):
        raise _bad("model.dropout_masks", " = \"per_step\" renews the masks at every fixed step, so it needs "
                   "ode.adaptive = false and ode.adjoint = \"checkpoint\" or \"direct\" (here adaptive = "
                   f"{str(o.adaptive).lower()}, adjoint = \"{o.adjoint}\"); adaptive control, backsolve and "
                   "reversible need one deterministic f: use dropout_masks = \"per_solve\"")
    set_ = o.training_options()
    if set_ and m.family not in ODE_FAMILIES:
        raise _bad(f"ode.{set_[0]}", _assigned(o, set_)[len(set_[0]):] + " applies to ODE families "
                   f"({', '.join(ODE_FAMILIES)}), not model.family = \"{m.family}\"; "
                   "turn it off (0, or [] for steps_range)")
    if c.data.seq_len > m.max_positions:
        raise _bad("data.seq_len", f" = {c.data.seq_len} exceeds model.max_positions = {m.max_positions}; "
                   "lower seq_len or raise max_positions")


def _bad(key: str, rest: str) -> ConfigError:
    """The error for dotted ``key``: ``"ode.solver" + rest``."""
    return ConfigError(key + rest, key=key)


def _assigned(section: Section, keys: typing.Sequence[str]) -> str:
    """``"grid_jitter = 0.1, kinetic_weight = 0.01"``."""
    return ", ".join(f"{k} = {getattr(section, k)}" for k in keys)


def _given_in(source: str, error: ConfigError) -> ConfigError:
    """``error`` with where it was given: ``ode.solver = ...`` -> ``c.toml: [ode] solver = ...``."""
    message, key = str(error), error.key
    if key and message.startswith(key):
        section, _, name = key.partition(".")
        message = f"[{section}] {name}{message[len(key):]}"
    return ConfigError(f"{source}: {message}", key=key)


class Knob(typing.NamedTuple):
    """What a field allows, from its type and ``knob(...)`` metadata."""

    key: str  # dotted, as users type it: "ode.solver"
    default: Any
    tp: type  # bool, int, float, str, or tuple (of strings)
    choices: tuple | None
    bounds: tuple  # ((compare, "<=", bound), ...), those given
    booleans: dict | None  # true / false -> a value, for a knob that was boolean once
    item: type = str  # a tuple's element type


_BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


@functools.cache
def _knobs(cls: type) -> dict[str, Knob]:
    """A section's knobs by field name."""
    hints = typing.get_type_hints(cls)
    knobs = {}
    for f in dataclasses.fields(cls):
        m, tp = f.metadata, hints[f.name]
        bounds = tuple((op, text, m[name]) for name, op, text in _BOUNDS if m.get(name) is not None)
        is_tuple = typing.get_origin(tp) is tuple
        knobs[f.name] = Knob(f"{SECTION_NAMES[cls]}.{f.name}", f.default, tuple if is_tuple else tp,
                             m.get("choices"), bounds, m.get("booleans"),
                             typing.get_args(tp)[0] if is_tuple else str)
    return knobs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and controls escaped."""
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               tuple: "a list of strings"}


def _check_field(knob: Knob, value: Any) -> Any:
    """``value`` coerced to the knob's type (an int to a float, a list or "a,b" to a tuple) and
    checked against what it allows; else a ConfigError naming the knob's key and the value."""
    given, key = value, knob.key
    if knob.booleans and isinstance(value, bool):
        value = knob.booleans[value]
    tp = knob.tp
    if tp is tuple:
        if isinstance(value, str):
            value = tuple(v for v in value.split(",") if v)
        if not isinstance(value, (list, tuple)) or not all(_is_a(knob.item, v) for v in value):
            raise _bad(key, f" = {given!r}: expected a list of {'integers' if knob.item is int else 'strings'}")
        value = tuple(value)
    elif not _is_a(tp, value):
        raise _bad(key, f" = {given!r}: expected {_TYPE_NAMES[tp]}")
    elif tp is float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise _bad(key, f" = {given!r}: expected a finite number")
    if (tp is str or knob.item is str and tp is tuple) and not all(map(_is_utf8, value if tp is tuple else (value,))):
        raise _bad(key, f" = {given!r}: holds characters that cannot be written as UTF-8")
    if knob.choices is not None and value not in knob.choices:
        raise _bad(key, f" = {given!r} is not allowed; choose one of {', '.join(knob.choices)}"
                   + suggest(value, knob.choices))
    for compare, text, bound in knob.bounds:
        if not compare(value, bound):
            raise _bad(key, f" = {given!r} is out of range; it must be {text} {bound}")
    return value


def _is_a(tp: type, value: Any) -> bool:
    """Whether ``value`` is a ``tp`` as TOML reads it: true / false are no numbers, 1 is a float."""
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, (int, float) if tp is float else tp)


def _is_utf8(text: str) -> bool:
    """False for lone surrogates, which TOML files (and run directories) cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_key(key: str, source: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot or not name:
        raise ConfigError(f"{source}: '{key}' is not a dotted key; write section.key=value, "
                          f"with section one of {', '.join(SECTIONS)}")
    return section, name


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from ``{section: {key: value}}``; errors name ``source``."""
    checked = {section: _checked_values(section, values, source) for section, values in raw.items()}
    try:  # every value is fine on its own: now the rules between keys, per section, then across
        return Config(**{section: SECTIONS[section](**values) for section, values in checked.items()})
    except ConfigError as e:
        raise _given_in(source, e) from None


def _checked_values(section: str, values: Any, source: str) -> dict[str, Any]:
    """One section's ``{key: value}``, every key and value checked on its own."""
    if section not in SECTIONS:
        raise unknown_name(f"{source}: unknown section [{section}]", section, SECTIONS, "sections")
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{section}' must be a table [{section}], got {values!r}")
    try:
        checked = {name: _check_key(section, name, value) for name, value in values.items()}
    except ConfigError as e:
        raise _given_in(source, e) from None
    if section == "ode" and checked.get("reversible") is True and "adjoint" not in checked:
        checked["adjoint"] = "reversible"  # the alias; given together, the two must agree
    return checked


def _check_key(section: str, name: str, value: Any) -> Any:
    """``value`` as ``[section] name`` stores it, checked on its own (an error names no source)."""
    if section not in SECTIONS:
        raise unknown_name(f"unknown section [{section}]", section, SECTIONS, "sections")
    knobs = _knobs(SECTIONS[section])
    if name not in knobs:
        raise unknown_name(f"unknown key '{name}' in [{section}]", name, knobs)
    return _check_field(knobs[name], value)


def validate_key(key: str, value: Any, source: str) -> Any:
    """Check one dotted ``key``'s ``value`` on its own: the section and key exist and the value
    has the key's type, range and choices (rules between keys wait for the whole config).
    Returns the value as the config stores it; a :class:`ConfigError` names ``source``."""
    section, name = _split_key(key, source)
    try:
        return _check_key(section, name, value)
    except ConfigError as e:
        raise _given_in(source, e) from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"ode.steps=8"`` -> ``("ode", "steps", 8)``; values are TOML, bare words are strings."""
    source = f"override '{item}'"
    key, eq, text = item.partition("=")
    if not eq:
        raise ConfigError(f"{source}: expected section.key=value, e.g. ode.solver=rk4")
    section, name = _split_key(key.strip(), source)
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = text
    return _moved_sample_override(section, name, value)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply overrides.

    All overrides are applied to the file's dict first and the result is validated once, so
    their order does not matter. Each override's own value is checked against its key first;
    a rule spanning several keys that fails names the overrides it involves (those without
    which the error would not be the same) or, when none does, the file.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file (pass a .toml file, e.g. configs/quickstart.toml)")
        try:
            raw = _moved_sample_keys(_parse_toml(p.read_text(encoding="utf-8"), source))
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{source}: cannot read the config file: {e}") from None
    parsed = [(item, *parse_override(item)) for item in overrides]
    for item, section, name, value in parsed:
        validate_key(f"{section}.{name}", value, f"override '{item}'")
    try:
        return config_from_dict(_with_overrides(raw, parsed), source)
    except ConfigError as error:
        involved = _involved_overrides(raw, parsed, str(error))
        if not involved:
            raise
        label = ", ".join(f"'{item}'" for item in involved)
        return config_from_dict(_with_overrides(raw, parsed),
                                f"override{'s' if len(involved) > 1 else ''} {label}")


def _with_overrides(raw: dict[str, Any], parsed: list) -> dict[str, Any]:
    """A copy of ``raw`` with the parsed overrides ``(item, section, name, value)`` set."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for _, section, name, value in parsed:
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][name] = value
    _rederive_dropout(out, {(section, name) for _, section, name, _ in parsed})
    return out


def _rederive_dropout(raw: dict[str, Any], given: set[tuple[str, str]]) -> None:
    """A ``model.dropout`` given now beats the rates stored in ``raw`` (e.g. a resolved
    config.toml): drop those not given with it, so they take the shorthand's value."""
    if ("model", "dropout") in given and isinstance(raw.get("model"), dict):
        for rate in DROPOUT_KEYS:
            if ("model", rate) not in given:
                raw["model"].pop(rate, None)


def _involved_overrides(raw: dict[str, Any], parsed: list, message: str) -> list[str]:
    """The overrides without which validation would not fail with ``message``."""
    involved = []
    for i, (item, *_rest) in enumerate(parsed):
        try:
            config_from_dict(_with_overrides(raw, parsed[:i] + parsed[i + 1:]), "")
            involved.append(item)
        except ConfigError as e:
            if str(e).partition(": ")[2] != message.partition(": ")[2]:
                involved.append(item)
    return involved


def config_from_toml(text: str, source: str) -> Config:
    """A config stored by ode-lm (a checkpoint's, or a run's config.toml): fully resolved, so
    a key it lacks was added after it was written, and takes the behaviour of then."""
    return config_from_dict(_moved_sample_keys(_as_written_then(_parse_toml(text, source))), source)


# What a resolved config written before 2026-12-01 (no [model] block key) ran: the parallel
# discrete block, the rank-one hypernetwork and no dropout on attention probabilities. Loaded
# with today's defaults, its weights would run as another model.
LEGACY_MODEL = {"block": "parallel", "hyper_form": "rank_one", "attn_dropout": 0.0}


def _as_written_then(raw: dict[str, Any]) -> dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, dict) or "block" in model or "family" not in model:
        return raw
    legacy = {k: v for k, v in LEGACY_MODEL.items() if k != "block" or model["family"] == "standard"}
    return {**raw, "model": {**legacy, **model}}


# Keys of the end-of-training sample before it took the [generate] settings, still read in
# config files, stored runs and overrides: each maps to its new key, set only where the
# same file does not give that key itself (a resolved config.toml gives every [generate]
# key, which ode-lm generate used for the run); an override always sets it.
MOVED_SAMPLE_KEYS = {"sample_prompt": "prompt", "sample_tokens": "max_new_tokens",
                     "sample_temperature": "temperature"}


def _moved_sample_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """``[train] sample_*`` read as ``[generate]`` keys; ``sample_tokens = 0`` as ``train.sample = false``."""
    train = raw.get("train")
    if not isinstance(train, dict) or not MOVED_SAMPLE_KEYS.keys() & train.keys():
        return raw
    generate = dict(raw["generate"]) if isinstance(raw.get("generate"), dict) else {}
    train = dict(train)
    for old, new in MOVED_SAMPLE_KEYS.items():
        if old in train:
            value = train.pop(old)
            if old == "sample_tokens" and value == 0:
                train.setdefault("sample", False)
            elif new not in generate:
                generate[new] = value
    return {**raw, "train": train, "generate": generate}


def _moved_sample_override(section: str, name: str, value: Any) -> tuple[str, str, Any]:
    """An override of a ``MOVED_SAMPLE_KEYS`` key as the override of its new key."""
    if section != "train" or name not in MOVED_SAMPLE_KEYS:
        return section, name, value
    if name == "sample_tokens" and value == 0:
        return "train", "sample", False
    return "generate", MOVED_SAMPLE_KEYS[name], value


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        if "at end of document" in message:  # tomllib gives no line for this case
            message = message.replace("at end of document", f"at line {text.count(chr(10)) + 1}, end of document")
        raise ConfigError(f"{source}: malformed TOML: {message}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays / tables
        raise ConfigError(f"{source}: malformed TOML: arrays or tables nested too deeply") from None
