"""Training: the loop, optimizer, checkpoints, logs and loading runs back."""

from ode_lm.train.run import LoadedRun, load_run
from ode_lm.train.trainer import Evaluation, TrainingError, TrainResult, evaluate, train

__all__ = ["LoadedRun", "load_run", "Evaluation", "TrainingError",
           "TrainResult", "evaluate", "train"]
