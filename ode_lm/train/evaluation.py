"""Held-out evaluation: the one function the trainer and the depth ablation measure loss with."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ode_lm.models import LanguageModel
from ode_lm.train.steps import EvalStep


class TrainingError(Exception):
    """Training cannot go on (non-finite loss, failed solve); the message says why and where."""


class SolveFailed(TrainingError):
    """An adaptive solve of an evaluation batch reached ``ode.max_steps`` before t = 1."""


@dataclass
class Evaluation:
    loss: float  # nats per token, the mean over the batches
    bits_per_byte: float  # loss / ln 2 / bytes per token
    perplexity: float  # exp(loss), capped at exp(50)
    nfe: int | float  # function evaluations per forward pass: the batches' mean (an int when all agree)
    ms_per_batch: float | None = None  # mean wall-clock per batch, the first (compiling) batch excluded


def evaluate(model: LanguageModel, eval_step: EvalStep, batch: Callable[[int], tuple], batches: int,
             bytes_per_token: float, place: Callable = lambda a: a) -> Evaluation:
    """Mean loss without dropout over ``batch(0) .. batch(batches - 1)`` (e.g. a sampler's
    ``val_batch``, or ``train_eval_batch``: the fixed training windows whose gap to the
    held-out loss shows overfitting), each array put on the devices by ``place``.

    Raises ``SolveFailed`` naming the batch whose adaptive solve did not reach t = 1.
    """
    losses, nfes, seconds = [], [], []
    for i in range(batches):
        start = time.perf_counter()
        loss, nfe, failed = eval_step(model, *map(place, batch(i)))
        loss = float(loss)
        if i:
            seconds.append(time.perf_counter() - start)
        if bool(failed):
            raise SolveFailed(f"evaluation batch {i}: the adaptive solve reached ode.max_steps = "
                              f"{eval_step.ode.max_steps} before t = 1; raise ode.max_steps or "
                              "loosen ode.rtol/ode.atol")
        losses.append(loss)
        nfes.append(int(nfe))
    loss = float(np.mean(losses))
    nfe = nfes[0] if len(set(nfes)) == 1 else float(np.mean(nfes))
    return Evaluation(loss, loss / math.log(2) / bytes_per_token, math.exp(min(loss, 50.0)), nfe,
                      1000 * float(np.mean(seconds)) if seconds else None)
