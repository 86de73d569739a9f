"""Typed configuration.

A config file is TOML with the sections ``[model] [ode] [data] [train] [optim] [log]
[checkpoint]``. Each section loads into a frozen dataclass below; every knob a user can turn
is a field here, with its allowed values in the field's metadata. Command-line overrides are
dotted ``section.key=value`` pairs, parsed as TOML values and checked like the file.

Anything wrong raises :class:`ConfigError` naming the source, the key, the value given and
what is allowed (with a close-match suggestion for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ode_lm.errors import ConfigError
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
NONFINITE_ACTIONS = ("stop", "skip")  # what a step with a non-finite loss or gradient does
MATMUL_PRECISIONS = ("default", "high", "highest")  # float32 products; "default": TF32 on NVIDIA GPUs
CHECKPOINT_SAVES = ("states", "matmuls")  # what fixed-step `checkpoint` keeps for the backward pass
# How a fixed-step backprop solve runs its steps: a scan, written out, or "auto" (written out
# on a GPU up to ode_lm.ode.sensitivities.AUTO_UNROLL_MAX_NFE evaluations, scanned beyond and on a CPU). The TOML
# booleans of earlier configs still read: true = "unroll", false = "scan".
UNROLL_MODES = ("auto", "scan", "unroll")
UNROLL_BOOLEANS = {True: "unroll", False: "scan"}
# Sensitivities a training solve with grid jitter or dynamics regularisers runs under.
TRAINING_SOLVE_ADJOINTS = ("checkpoint", "direct")


def knob(default: Any, *, choices: tuple | None = None, ge=None, gt=None, le=None, lt=None,
         doc: str = "", booleans: dict | None = None) -> Any:
    """A config field with its allowed values. ``ge/gt/le/lt`` bound numbers; ``booleans``
    maps ``true`` / ``false`` to a string knob's values (a knob that was boolean once)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc, "booleans": booleans}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
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
    init_std: float = knob(0.02, gt=0.0, doc="std of the normal weight initialisation")
    attention: str = knob("auto", choices=ATTENTION_IMPLEMENTATIONS,
                          doc="attention kernel; auto: cuDNN flash on GPU for bf16/fp16, else XLA")

    def __post_init__(self):
        for name in DROPOUT_KEYS:
            if getattr(self, name) == FROM_DROPOUT:
                object.__setattr__(self, name, self.dropout)

    @property
    def sequential(self) -> bool:
        """Whether layers are GPT-2's sequential sub-layers (``block`` resolved)."""
        return self.block == "sequential" or (self.block == "auto" and self.family == "standard")


@dataclass(frozen=True)
class ODEConfig:
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
    checkpoint_saves: str = knob("states", choices=CHECKPOINT_SAVES,
                                 doc="adjoint \"checkpoint\" on fixed steps keeps each step's state and "
                                     "recomputes the rest ('states'), or keeps the matrix products', "
                                     "fused attention's and the standardisation's outputs instead, "
                                     "recomputing only elementwise work ('matmuls': more memory, "
                                     "less recomputation)")
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
    kinetic_weight: float = knob(0.0, ge=0.0, doc="training loss += this x integral of ||f||^2 dt per "
                                 "token (kinetic energy regulariser, Finlay et al. 2020)")
    jacobian_weight: float = knob(0.0, ge=0.0, doc="training loss += this x integral of ||df/dx||_F^2 dt "
                                  "per token, by a Hutchinson estimator (Finlay et al. 2020)")
    reversible: bool = knob(False, doc="alias: true selects adjoint = \"reversible\"")
    reversible_coupling: float = knob(0.999, gt=0.0, le=1.0,
                                      doc="coupling lambda of the reversible scheme; < 1 damps its "
                                      "parasitic mode, 1 is the undamped (least stable) scheme")

    def __post_init__(self):
        if isinstance(self.unroll, bool):  # the knob's earlier boolean form
            object.__setattr__(self, "unroll", UNROLL_BOOLEANS[self.unroll])


@dataclass(frozen=True)
class DataConfig:
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


@dataclass(frozen=True)
class TrainConfig:
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


@dataclass(frozen=True)
class OptimConfig:
    lr: float = knob(1e-3, gt=0.0, doc="peak learning rate")
    warmup_steps: int = knob(100, ge=0, doc="linear warmup steps")
    min_lr_ratio: float = knob(0.1, ge=0.0, le=1.0, doc="final lr / peak lr (cosine decay)")
    weight_decay: float = knob(0.1, ge=0.0, doc="AdamW decoupled weight decay (matrices only)")
    b1: float = knob(0.9, ge=0.0, lt=1.0, doc="Adam beta1")
    b2: float = knob(0.95, ge=0.0, lt=1.0, doc="Adam beta2")
    eps: float = knob(1e-8, gt=0.0, doc="Adam epsilon")
    grad_clip: float = knob(1.0, gt=0.0, doc="global-norm gradient clipping")


@dataclass(frozen=True)
class LogConfig:
    every: int = knob(10, ge=1, doc="write train scalars every N steps")
    tensorboard: bool = knob(True, doc="write TensorBoard events")
    progress: bool = knob(True, doc="show a progress bar")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = knob(500, ge=1, doc="checkpoint every N steps (and at the end)")
    keep: int = knob(3, ge=1, doc="newest checkpoints kept")
    resume: bool = knob(False, doc="continue from the newest checkpoint of the run")


@dataclass(frozen=True)
class GenerateConfig:
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


def _suggest(word: str, allowed) -> str:
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check_value(source: str, section: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to the field's type and check its bounds; raise ConfigError if not."""
    where = f"{source}: [{section}] {f.name} = {value!r}"
    if tp is str and isinstance(value, bool) and f.metadata.get("booleans"):
        value = f.metadata["booleans"][value]  # a knob that was boolean once
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = tuple(v for v in value.split(",") if v)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected {_type_name(tp)}")
        value = tuple(value)
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected {_type_name(tp)}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected {_type_name(tp)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected {_type_name(tp)}")
    if not all(_is_utf8(v) for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, str)):
        raise ConfigError(f"{where}: holds characters that cannot be written as UTF-8")
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{where} is not allowed; choose one of {', '.join(meta['choices'])}"
                          + _suggest(value, meta["choices"]))
    for bound, ok, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{where} is out of range; it must be {text} {b}")
    return value


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
    """Build and validate a :class:`Config` from ``{section: {key: value}}``."""
    sections = _build_sections(raw, source)
    if "ode" in sections:
        sections["ode"] = _resolve_reversible(sections["ode"], raw["ode"].get("adjoint"), source)
    config = Config(**sections)
    _check_consistency(config, source)
    return config


def _build_sections(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Each section's dataclass, every key and value checked on its own (no cross-key rules)."""
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; allowed sections are "
                              f"{', '.join(SECTIONS)}" + _suggest(section, SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a table [{section}], got {values!r}")
        cls = SECTIONS[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            if name not in fields:
                raise ConfigError(f"{source}: unknown key '{name}' in [{section}]; allowed keys are "
                                  f"{', '.join(fields)}" + _suggest(name, fields))
            kwargs[name] = _check_value(source, section, fields[name], hints[name], value)
        sections[section] = cls(**kwargs)
    return sections


def _resolve_reversible(ode: ODEConfig, explicit_adjoint: Any, source: str) -> ODEConfig:
    """``reversible = true`` is an alias of ``adjoint = "reversible"``; keep the two in step."""
    if ode.reversible:
        if explicit_adjoint not in (None, "reversible"):
            raise ConfigError(f"{source}: [ode] reversible = true selects adjoint = \"reversible\", "
                              f"but adjoint = \"{explicit_adjoint}\" is also given; drop one of the two")
        return dataclasses.replace(ode, adjoint="reversible")
    return dataclasses.replace(ode, reversible=ode.adjoint == "reversible")


def _check_training_solve(c: Config, source: str) -> None:
    """Grid jitter and the dynamics regularisers: fixed steps, backpropagated, an ODE family."""
    o = c.ode
    set_ = [f"{k} = {getattr(o, k)}" for k in ("grid_jitter", "kinetic_weight", "jacobian_weight") if getattr(o, k) > 0]
    if not set_:
        return
    if c.model.family not in ODE_FAMILIES:
        raise ConfigError(f"{source}: [ode] {', '.join(set_)} applies to ODE families "
                          f"({', '.join(ODE_FAMILIES)}), not family = \"{c.model.family}\"; set it to 0")
    if o.adaptive or o.adjoint not in TRAINING_SOLVE_ADJOINTS:
        raise ConfigError(f"{source}: [ode] {', '.join(set_)} needs fixed steps (adaptive = false) and "
                          f"adjoint = \"checkpoint\" or \"direct\"; here adjoint = \"{o.adjoint}\", "
                          f"adaptive = {str(o.adaptive).lower()}; change those or set it to 0")


def _check_consistency(c: Config, source: str) -> None:
    """Rules that span several keys."""
    if c.model.dim % c.model.heads:
        raise ConfigError(f"{source}: [model] heads = {c.model.heads} does not divide "
                          f"dim = {c.model.dim}; pick heads among the divisors of dim")
    if c.model.block == "sequential" and c.model.family != "standard":
        raise ConfigError(f"{source}: [model] block = \"sequential\" is GPT-2's discrete layer; the ODE "
                          f"family '{c.model.family}' has the parallel block as its vector field "
                          "(one evaluation is one f); use block = \"auto\" or \"parallel\"")
    if c.model.dropout_masks == "per_step" and c.model.family != "standard" and (
            c.ode.adaptive or c.ode.adjoint not in TRAINING_SOLVE_ADJOINTS):
        raise ConfigError(f"{source}: [model] dropout_masks = \"per_step\" renews the masks at every "
                          "fixed step, so it needs ode.adaptive = false and ode.adjoint = \"checkpoint\" "
                          f"or \"direct\" (here adaptive = {str(c.ode.adaptive).lower()}, adjoint = "
                          f"\"{c.ode.adjoint}\"); adaptive control, backsolve and reversible need one "
                          "deterministic f: use dropout_masks = \"per_solve\"")
    if c.model.ssm_form == "head" and c.model.dim % c.model.ssm_heads:
        raise ConfigError(f"{source}: [model] ssm_heads = {c.model.ssm_heads} does not divide "
                          f"dim = {c.model.dim}; pick ssm_heads among the divisors of dim")
    if c.model.time_embed_dim % 2:
        raise ConfigError(f"{source}: [model] time_embed_dim = {c.model.time_embed_dim} must be even")
    if c.data.seq_len > c.model.max_positions:
        raise ConfigError(f"{source}: [data] seq_len = {c.data.seq_len} exceeds [model] "
                          f"max_positions = {c.model.max_positions}; lower seq_len or raise max_positions")
    if c.ode.adaptive and c.ode.solver not in ADAPTIVE_SOLVERS:
        raise ConfigError(f"{source}: [ode] solver = \"{c.ode.solver}\" has no error estimate, so "
                          f"adaptive = true is not possible; use one of {', '.join(ADAPTIVE_SOLVERS)}")
    if c.ode.adjoint == "reversible" and c.ode.solver not in REVERSIBLE_SOLVERS:
        raise ConfigError(f"{source}: [ode] adjoint = \"reversible\" wraps an explicit Runge-Kutta "
                          f"solver; solver = \"{c.ode.solver}\" is not one; use one of "
                          f"{', '.join(REVERSIBLE_SOLVERS)}")
    if c.ode.checkpoint_saves != "states" and (c.ode.adjoint != "checkpoint" or c.ode.adaptive):
        raise ConfigError(f"{source}: [ode] checkpoint_saves = \"{c.ode.checkpoint_saves}\" applies to "
                          f"adjoint = \"checkpoint\" with fixed steps (adaptive = false); here adjoint = "
                          f"\"{c.ode.adjoint}\", adaptive = {str(c.ode.adaptive).lower()}; "
                          f"leave checkpoint_saves = \"states\"")
    if c.ode.unroll == "unroll" and (c.ode.adjoint not in ("checkpoint", "direct") or c.ode.adaptive):
        raise ConfigError(f"{source}: [ode] unroll = \"unroll\" (or true) writes out the fixed steps of "
                          f"adjoint = \"checkpoint\" or \"direct\" (adaptive = false); here adjoint = "
                          f"\"{c.ode.adjoint}\", adaptive = {str(c.ode.adaptive).lower()}; "
                          f"leave unroll = \"auto\" or \"scan\"")
    _check_training_solve(c, source)
    t = c.train
    problem = plain_name_problem(t.run_name)
    if problem:  # runs_dir / run_name is replaced by --overwrite: it must stay inside runs_dir
        raise ConfigError(f"{source}: [train] run_name = {t.run_name!r} {problem}; it must be one plain "
                          "directory name (no '/', not '.' or '..'), e.g. \"quickstart\"")
    if not t.distributed and (t.coordinator_address or t.num_processes or t.process_id != -1):
        raise ConfigError(f"{source}: [train] coordinator_address, num_processes and process_id "
                          "configure a multi-process run; set train.distributed = true to use them")
    host, _, port = t.coordinator_address.rpartition(":")
    if t.coordinator_address and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{source}: [train] coordinator_address = {t.coordinator_address!r} is not "
                          "host:port (e.g. \"10.0.0.1:1234\", a port in 1 ... 65535)")
    if t.num_processes and not -1 <= t.process_id < t.num_processes:
        raise ConfigError(f"{source}: [train] process_id = {t.process_id} is out of range for "
                          f"num_processes = {t.num_processes}; use 0 ... {t.num_processes - 1}")
    if c.data.source == "text" and not c.data.paths:
        raise ConfigError(f"{source}: [data] source = \"text\" needs paths = [\"file.txt\", ...] "
                          "(files, directories or globs)")
    if c.data.source == "hf" and not c.data.hf_name:
        raise ConfigError(f"{source}: [data] source = \"hf\" needs hf_name (e.g. \"wikitext\")")
    _check_data(c.data, source)


def _check_data(d: DataConfig, source: str) -> None:
    """Cross-key rules of [data]: validation sources, splits and tokenizer settings."""
    for key, owner in (("val_paths", "text"), ("hf_val_split", "hf"), ("hf_data_files", "hf")):
        if getattr(d, key) and d.source != owner:
            raise ConfigError(f"{source}: [data] {key} belongs to source = \"{owner}\"; here source = "
                              f"\"{d.source}\"; drop {key} or set source = \"{owner}\"")
    given = "val_paths" if d.val_paths else "hf_val_split" if d.hf_val_split else ""
    if given and d.split != "auto":
        raise ConfigError(f"{source}: [data] split = \"{d.split}\" divides one corpus, but {given} already "
                          f"gives the validation text; drop split or {given}")
    if d.tokenizer_file and d.tokenizer != "bpe":
        raise ConfigError(f"{source}: [data] tokenizer_file (a Hugging Face tokenizer.json) is used with "
                          f"tokenizer = \"bpe\"; here tokenizer = \"{d.tokenizer}\"")
    if d.tokenizer == "bpe" and not d.tokenizer_file and d.vocab_size <= 256:
        raise ConfigError(f"{source}: [data] vocab_size = {d.vocab_size} is below the 256 byte symbols plus "
                          "the end-of-document token of byte-level BPE; use at least 257 (default 4096)")


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
        _build_sections({section: {name: value}}, f"override '{item}'")  # the key and its value
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
