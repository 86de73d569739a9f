"""Training: the loop, optimizer, checkpoints, logs and loading runs back.

The names below load on first use, so that ``ode_lm.train.interrupts`` (which the command line
installs before anything else) can be imported without importing JAX.
"""

import importlib

_EXPORTS = {"LoadedRun": "run", "load_run": "run", "Evaluation": "evaluation", "TrainingError": "evaluation",
            "TrainResult": "trainer", "evaluate": "evaluation", "train": "trainer"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ode_lm.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ode_lm.train.{_EXPORTS[name]}"), name)
