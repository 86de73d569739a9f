"""Loading a trained run back: its config, tokenizer and model from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ode_lm.config import Config, config_from_toml
from ode_lm.data import Tokenizer, tokenizer_from_state
from ode_lm.errors import CheckpointError
from ode_lm.models import LanguageModel
from ode_lm.train.checkpoint import latest_checkpoint, read_checkpoint, restore_state
from ode_lm.train.steps import init_state


@dataclass
class LoadedRun:
    config: Config
    model: LanguageModel
    tokenizer: Tokenizer
    step: int
    checkpoint: Path


def load_run(path: str | Path, checkpoint: str | Path | None = None, warn=print) -> LoadedRun:
    """``path`` is a run directory (newest checkpoint, or ``checkpoint`` inside it) or a
    checkpoint file."""
    path = Path(path)
    if path.is_file():
        ckpt = path
        header, payload = read_checkpoint(ckpt)
    elif path.is_dir():
        if checkpoint is not None:
            ckpt = Path(checkpoint) if Path(checkpoint).is_file() else path / "checkpoints" / str(checkpoint)
            header, payload = read_checkpoint(ckpt)
        else:
            found = latest_checkpoint(path, warn=warn)
            if found is None:
                raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/"
                                      "step_*.ckpt); train it first with ode-lm train")
            ckpt, header, payload = found
    else:
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    cfg = config_from_toml(header.config_toml, str(ckpt))
    tokenizer = tokenizer_from_state(header.tokenizer)
    model, _, opt_state = init_state(cfg, tokenizer.vocab_size)
    model, _ = restore_state(ckpt, payload, (model, opt_state))
    return LoadedRun(cfg, model, tokenizer, header.step, ckpt)
