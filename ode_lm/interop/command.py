"""``ode-lm crosscheck TARGET [overrides] --backend reference|julia``.

``TARGET`` is a run directory or checkpoint (its trained weights), or a TOML config (a
freshly initialised model with every parameter jittered; no data is read). The batch is
random tokens from ``--seed``. Prints one table row per comparison; exit status 1 when any
row fails.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ode_lm.errors import UserError
from ode_lm.interop.settings import CrossCheckSettings


def run_crosscheck(target: str, overrides: Sequence[str], backend: str, settings: CrossCheckSettings,
                   out=print, progress=lambda m: print(f"crosscheck: {m}", file=sys.stderr, flush=True)) -> int:
    if backend == "julia":
        from ode_lm.interop.julia import check_julia, load_julia

        load_julia()  # fail in one line, before any work, when Julia is not there
    import jax

    # The whole process works in float64; a CLI process owns its JAX config.
    jax.config.update("jax_enable_x64", True)
    from ode_lm.config import load_config
    from ode_lm.interop.crosscheck import check_reference, float64_model, format_table, random_batch

    path = Path(target)
    if not path.exists():
        raise UserError(f"{target}: no such run directory, checkpoint or config file")
    if path.is_dir() or path.suffix == ".ckpt":
        from ode_lm.train import load_run

        if overrides:
            raise UserError(f"overrides {' '.join(overrides)}: a run is checked with its own config; "
                            "pass a .toml config to check a modified model")
        run = load_run(path, warn=lambda m: progress(m))
        cfg, vocab = run.config, run.tokenizer.vocab_size
        model = float64_model(cfg, settings, run.model)
        progress(f"checking {run.checkpoint} (step {run.step})")
    else:
        cfg = load_config(path, overrides)
        vocab = settings.vocab
        model = float64_model(cfg, settings)
        progress(f"checking a jittered random-init model from {path} (vocab {vocab})")
    tokens, targets = random_batch(vocab, cfg.model.max_positions, settings)
    check = check_julia if backend == "julia" else check_reference
    rows = check(model, cfg.ode, tokens, targets, settings, progress)
    out(format_table(rows))
    failed = [r for r in rows if not r.passed]
    out(f"crosscheck ({backend}): {len(rows) - len(failed)}/{len(rows)} checks passed"
        + (f"; FAILED: {', '.join(r.check for r in failed)}" if failed else ""))
    return 1 if failed else 0
