"""The jitted training and evaluation steps, and how a run builds them.

``init_state(cfg, vocab)`` makes the model and optimizer state, ``build_train_step(cfg)`` and
``build_eval_step(cfg)`` the compiled steps: the trainer and every benchmark in ``scripts/``
build them these ways, so a benchmark times the step a run trains with.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ode_lm.config import Config, ODEConfig
from ode_lm.models import LanguageModel, build_model
from ode_lm.train.optim import build_optimizer
from ode_lm.train.precision import compute_dtype, param_dtype

# XLA options of the compiled training step; only GPU compilers read them.
# - dot merger off: the merger joins matrix products that share an operand into one product
#   over concatenated operands; in the block's backward pass that made Triton GEMMs whose
#   prologue concatenates activations (3.2 ms each of the large benchmark step). With it off
#   that step on an H200 took 44.3-44.9 ms against 46.2-46.7 ms (one process, alternating
#   three times; bench_gpu.py's variant "xla_defaults").
# - no zero-fill of the buffers a scan stacks its steps' residuals in: every slot of them is
#   written before it is read (XLA proves it per loop), yet they were filled with zeros first
#   (1.5 ms of the large step). 43.0-43.9 ms against 44.2-44.7 ms (H200, alternating twice).
# - CUDA graphs scheduled as a dependency graph, not a chain: the copies of a solve's saved
#   residuals into and out of the scan's stacks run beside the products that do not need
#   them. Large step, back to back on an H200: 39.9-40.3 ms against 40.8-41.2 ms (three
#   processes); the unrolled `standard` step gains 0-0.5 ms.
TRAIN_STEP_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0,
                               "xla_gpu_enable_dus_accumulator_zero_init_elimination": True,
                               "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


@jax.custom_vjp
def token_cross_entropy(logits: Float[Array, "*positions vocab"], targets: Int[Array, "*positions"]
                        ) -> Float[Array, "*positions"]:
    """``-log softmax(z)[y] = logsumexp(z) - z_y`` per position, in at least float32.

    The gradient is ``softmax(z) - onehot(y)``, computed in one elementwise pass from ``z``
    and the saved ``logsumexp(z)`` and returned in the logits' dtype: bf16 logits are read,
    never copied to float32 in memory. (Differentiating the float32 formula through
    ``z.astype(float32)`` made XLA write float32 copies of ``z`` and of its gradient: at
    GPT-2 small's vocabulary, 50304, six passes of about 1 ms each over logit-sized tensors
    in an H200 step of 35 ms.)
    """
    return _cross_entropy_forward(logits, targets)[0]


def _wide(logits: Array) -> Array:
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _cross_entropy_forward(logits, targets):
    z = _wide(logits)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return lse - picked, (logits, targets, lse)


def _cross_entropy_backward(residuals, g):
    logits, targets, lse = residuals
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    grad = (jnp.exp(_wide(logits) - lse[..., None]) - onehot) * g[..., None]
    return grad.astype(logits.dtype), None


token_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def cross_entropy(model: LanguageModel, inputs: Int[Array, "batch seq"], targets: Int[Array, "batch seq"],
                  ode: ODEConfig, key: PRNGKeyArray | None, dtype=None):
    """Mean next-token cross-entropy in nats (``token_cross_entropy``: at least float32) and
    the solve stats.

    ``dtype`` (e.g. bf16) runs the model on copies of the parameters cast to it
    (``LanguageModel.in_dtype``); gradients still arrive in the parameters' own dtype.
    """
    if dtype is not None:
        model = model.in_dtype(dtype)
    logits, stats = model(inputs, ode, key=key)
    return token_cross_entropy(logits, targets).mean(), stats


def objective(model: LanguageModel, inputs: Int[Array, "batch seq"], targets: Int[Array, "batch seq"],
              ode: ODEConfig, key: PRNGKeyArray | None, dtype=None):
    """The training loss: cross-entropy ``+ ode.kinetic_weight * kinetic + ode.jacobian_weight *
    jacobian`` (the solve's regularisers, ``ode/regularise.py``); returns ``(total, (ce, stats))``."""
    loss, stats = cross_entropy(model, inputs, targets, ode, key, dtype)
    total = loss
    if ode.kinetic_weight > 0 and stats.kinetic is not None:
        total = total + ode.kinetic_weight * stats.kinetic
    if ode.jacobian_weight > 0 and stats.jacobian is not None:
        total = total + ode.jacobian_weight * stats.jacobian
    return total, (loss, stats)


class TrainStep:
    """``(model, opt_state, inputs, targets, key) -> (model, opt_state, metrics)``.

    Compiled once per (optimizer, ode config); ``traces`` counts compilations so tests and
    the trainer can assert that the step never retraces.

    A step whose loss or gradient norm is non-finite, or whose adaptive solve failed, returns
    the model and optimizer state unchanged (a select inside the compiled step, so skipping
    costs no recompilation); ``metrics["finite"]`` tells the trainer which happened.

    The step is a plain ``jax.jit`` over the model (every leaf of an ode-lm model is an
    array): a call returns once the step is queued on the device, so the host prepares the
    next step while this one runs. ``eqx.filter_jit`` waits for the device before returning
    (to surface runtime errors); that left the GPU idle between steps (large benchmark step
    on an H200: 42.4 ms back to back against 40.1 ms).
    """

    def __init__(self, optimizer: optax.GradientTransformation, ode: ODEConfig, dtype=None,
                 compiler_options: dict[str, str | int | bool] | None = None, state_shardings=None):
        """``compiler_options``: XLA options of the compiled step (default
        ``TRAIN_STEP_COMPILER_OPTIONS``); ``state_shardings``: the layout the updated
        ``(model, opt_state)`` is constrained to (``DataParallel.state_shardings``, FSDP)."""
        self.optimizer, self.ode, self.dtype, self.traces = optimizer, ode, dtype, 0
        self.state_shardings = state_shardings
        # FSDP: the step gathers the weights whole once (the solve uses them at every
        # evaluation) and sums their gradient whole (an all-reduce) before each device
        # updates its slices. Left to sharding propagation, XLA computed the sharded weight
        # gradients from all-gathered activations instead (2 CPU devices, configs/time_indexed:
        # 595 MiB of temporaries against 480 replicated; with this, 492).
        self._whole = None if state_shardings is None else jax.tree.map(
            lambda s: NamedSharding(s.mesh, PartitionSpec()), state_shardings[0])
        options = TRAIN_STEP_COMPILER_OPTIONS if compiler_options is None else compiler_options
        self._jitted = jax.jit(self._step, compiler_options=options)

    def _step(self, model, opt_state, inputs, targets, key):
        self.traces += 1
        whole = model if self._whole is None else jax.lax.with_sharding_constraint(model, self._whole)
        (total, (loss, stats)), grads = eqx.filter_value_and_grad(objective, has_aux=True)(
            whole, inputs, targets, self.ode, key, self.dtype)
        if self._whole is not None:
            grads = jax.lax.with_sharding_constraint(grads, self._whole)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, new_opt_state = self.optimizer.update(eqx.filter(grads, eqx.is_inexact_array),
                                                       opt_state, params)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        apply = finite & ~stats.failed

        def select(new, old):
            return jnp.where(apply, new, old) if eqx.is_array(new) else new

        model, opt_state = jax.tree.map(select, (eqx.apply_updates(model, updates), new_opt_state),
                                        (model, opt_state))
        if self.state_shardings is not None:
            model, opt_state = jax.lax.with_sharding_constraint((model, opt_state), self.state_shardings)
        metrics = {"loss": loss, "grad_norm": grad_norm, "nfe": stats.nfe,
                   "solve_failed": stats.failed, "finite": finite,
                   **{k: v for k, v in (("kinetic", stats.kinetic), ("jacobian", stats.jacobian)) if v is not None}}
        return model, opt_state, metrics

    def __call__(self, model, opt_state, inputs, targets, key):
        return self._jitted(model, opt_state, inputs, targets, key)

    def compiled(self, model, opt_state, inputs, targets, key) -> jax.stages.Compiled:
        """XLA's compiled step for these argument shapes (reused, not retraced): its
        ``memory_analysis()``, or ``as_text()`` to name the fusions a profile shows."""
        return self._jitted.lower(model, opt_state, inputs, targets, key).compile()

    def memory_bytes(self, model, opt_state, inputs, targets, key) -> int | None:
        """Peak bytes of one step by XLA's analysis of the compiled program: arguments +
        outputs + temporaries - aliased buffers. Reuses the compiled step (no retrace)."""
        try:
            m = self.compiled(model, opt_state, inputs, targets, key).memory_analysis()
        except (AttributeError, NotImplementedError):  # a backend without the analysis
            return None
        return None if m is None else peak_bytes(m)


def peak_bytes(analysis) -> int:
    """A compiled program's peak by XLA's ``memory_analysis()``: arguments + outputs +
    temporaries - the outputs that alias (donated) arguments."""
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


class EvalStep:
    """``(model, inputs, targets) -> (loss, nfe, failed)`` without dropout."""

    def __init__(self, ode: ODEConfig, dtype=None):
        self.ode, self.dtype = ode, dtype
        self._jitted = jax.jit(self._step)

    def _step(self, model, inputs, targets) -> tuple[Float[Array, ""], Int[Array, ""], jax.Array]:
        loss, stats = cross_entropy(model, inputs, targets, self.ode, None, self.dtype)
        return loss, stats.nfe, stats.failed

    def __call__(self, model, inputs, targets):
        return self._jitted(model, inputs, targets)


def cast_dtype(cfg: Config) -> jnp.dtype | None:
    """The dtype the steps run the model in when it differs from the parameters' (bf16 mixed
    precision), else None (``cross_entropy``)."""
    return compute_dtype(cfg) if compute_dtype(cfg) != param_dtype(cfg) else None


def init_state(cfg: Config, vocab: int):
    """A fresh ``(model, optimizer, optimizer state)`` for ``cfg``; also the template
    checkpoints load into."""
    model = build_model(cfg.model, vocab, jax.random.key(cfg.train.seed), param_dtype(cfg))
    optimizer = build_optimizer(cfg.optim, cfg.train.steps)
    return model, optimizer, optimizer.init(eqx.filter(model, eqx.is_inexact_array))


def build_train_step(cfg: Config, compiler_options: dict[str, str | int | bool] | None = None,
                     state_shardings=None) -> TrainStep:
    """The train step of ``cfg``: AdamW of ``[optim]`` over ``train.steps``, the ``[ode]``
    solve, ``train.dtype``; ``compiler_options`` and ``state_shardings`` (FSDP) as
    ``TrainStep``'s. Its optimizer state is ``init_state``'s (the optimizer is a pure
    function of the config)."""
    return TrainStep(build_optimizer(cfg.optim, cfg.train.steps), cfg.ode, cast_dtype(cfg), compiler_options,
                     state_shardings)


def build_eval_step(cfg: Config, ode: ODEConfig | None = None) -> EvalStep:
    """The evaluation step of ``cfg`` (its ``[ode]`` solve unless ``ode``)."""
    return EvalStep(cfg.ode if ode is None else ode, cast_dtype(cfg))
