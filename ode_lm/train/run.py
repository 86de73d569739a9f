"""Loading a trained run back: its config, tokenizer and model from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ode_lm.config import Config, config_from_toml
from ode_lm.data import Tokenizer, tokenizer_from_state
from ode_lm.errors import CheckpointError
from ode_lm.models import LanguageModel
from ode_lm.train.checkpoint import newest_checkpoint, open_checkpoint
from ode_lm.train.orbax_checkpoint import is_orbax_step
from ode_lm.train.steps import init_state


@dataclass
class LoadedRun:
    config: Config
    model: LanguageModel
    tokenizer: Tokenizer
    step: int
    checkpoint: Path


def load_run(path: str | Path, checkpoint: str | Path | None = None, warn=print) -> LoadedRun:
    """``path`` is a run directory (newest checkpoint of either format, or ``checkpoint``
    inside it: a file name, an orbax step name or a path) or a checkpoint (file or orbax step
    directory). The model lands on this process's first device, whatever it was trained on."""
    path = Path(path)
    if path.is_file() or is_orbax_step(path):
        stored = open_checkpoint(path)
    elif path.is_dir():
        if checkpoint is not None:
            named = Path(checkpoint)
            if not named.exists():
                named = next((c for c in (path / "checkpoints" / str(checkpoint),
                                          path / "checkpoints" / "orbax" / str(checkpoint)) if c.exists()),
                             path / "checkpoints" / str(checkpoint))
            stored = open_checkpoint(named)
        else:
            stored = newest_checkpoint(path, warn=warn)
            if stored is None:
                raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/"
                                      "step_*.ckpt or checkpoints/orbax/step_*); train it first with ode-lm train")
    else:
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    cfg = config_from_toml(stored.config_toml, str(stored.path))
    tokenizer = tokenizer_from_state(stored.tokenizer)
    model, _, opt_state = init_state(cfg, tokenizer.vocab_size)
    model, _ = stored.restore((model, opt_state))
    return LoadedRun(cfg, model, tokenizer, stored.step, stored.path)
