"""Hostile-user trials of ``ode-lm``, with real processes: bad inputs by kind, two trainers
into one run, and SIGINT at random moments of start-up and training.

Every trial runs the command line in a fresh process on a tiny model and checks what a user
would: the exit status, one message line and no traceback, and that nothing was lost (an
existing run byte for byte, no stray lock, temporary or half-made directory). Prints a table
and writes ``docs/results/reliability_cpu.json``.

    python scripts/stress_reliability.py --sigint-trials 20 --lock-trials 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ode_lm.config import config_from_dict  # noqa: E402
from ode_lm.train.checkpoint import latest_checkpoint  # noqa: E402
from ode_lm.train.logging import read_metrics  # noqa: E402

TIMEOUT = 300
# As in an interactive terminal: a shell starts background jobs with SIGINT ignored.
ENTRY = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
         "import runpy, sys\nsys.argv[0] = 'ode-lm'; runpy.run_module('ode_lm.cli', run_name='__main__')")


def tiny_toml(root: Path, steps: int) -> Path:
    cfg = config_from_dict({
        "model": {"dim": 32, "heads": 2, "mlp_ratio": 2, "max_positions": 64, "dropout": 0.0,
                  "time_embed_dim": 8, "modulation_hidden": 16},
        "ode": {"solver": "euler", "steps": 2},
        "data": {"seq_len": 16, "max_bytes": 300_000, "cache_dir": str(root / "cache")},
        "train": {"run_name": "tiny", "runs_dir": str(root / "runs"), "steps": steps, "batch_size": 4,
                  "eval_every": 1000, "eval_batches": 1, "sample": False},
        "log": {"every": 5, "progress": False, "tensorboard": True},
        "checkpoint": {"every": 5, "keep": 2}}, "stress")
    path = root / f"tiny_{steps}.toml"
    path.write_text(cfg.to_toml())
    return path


class Harness:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                    "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        self.short = tiny_toml(root, 6)
        self.long = tiny_toml(root, 100_000)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", ENTRY, *args], cwd=REPO, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, *args: str) -> tuple[int, str]:
        proc = self.start(*args)
        out, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out + err


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (hidden ones too) with a hash of its bytes."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def clean_failure(rc: int, output: str, expected_rc: int = 2) -> str | None:
    """None if the process failed as a user should see it, else what was wrong."""
    lines = [ln for ln in output.splitlines() if ln.startswith("ode-lm: ")]
    if rc != expected_rc:
        return f"exit {rc}"
    if "Traceback" in output or "Exception ignored" in output:
        return "traceback"
    if len(lines) != 1:
        return f"{len(lines)} message lines"
    return None


def bad_input_cases(h: Harness, runs: Path, workdir: Path, can_mount: bool) -> list[tuple[str, str, list[str]]]:
    """(kind, what, arguments): each must exit 2 with one line and leave the runs intact."""
    big = ["ode.steps=1"]
    cases = [("run name", f"train.run_name={name!r} --overwrite", ["train", str(h.short), f"train.runs_dir={runs}",
                                                                   f"train.run_name={name}", "--overwrite"])
             for name in ("", ".", "..", "/tmp/elsewhere", "a/b", "../tiny", "tiny/..", "a\\b")]
    cases += [("run name", "run_name an existing file", ["train", str(h.short), f"train.runs_dir={runs}",
                                                          "train.run_name=afile", *flag])
              for flag in ([], ["--overwrite"], ["--resume"])]
    over = ["train", str(h.short), f"train.runs_dir={runs}", "--overwrite"]
    cases += [("--overwrite, then bad input", what, over + extra) for what, extra in (
        ("data path that does not exist", ['data.paths=["/no/such/file.txt"]', "data.source=text"]),
        ("unknown solver", ["ode.solver=rk5"]),
        ("unknown key", ["ode.stepz=4"]),
        ("seq_len above max_positions", ["data.seq_len=128"]),
        ("sample prompt outside the char alphabet", ["data.tokenizer=char", "generate.prompt=\u2603",
                                                     "train.sample=true"]),
        ("checkpoint of another model on --resume", ["model.dim=64", "--resume"]),
    )]
    cases += [("resources", what, over + extra) for what, extra in (
        ("train.batch_size = 10^7", ["train.batch_size=10000000"]),
        ("model.max_positions = 10^9", ["model.max_positions=1000000000"]),
        ("model.dim = 65536", ["model.dim=65536"]),
        ("ode.adjoint = direct over 65536 steps, batch 256", ["ode.adjoint=direct", "ode.steps=65536",
                                                              "train.batch_size=256"]),
    )]
    cases += [("resources", "generate --num-samples 10^8", ["generate", str(runs / "tiny"), "--prompt", "def ",
                                                            "--num-samples", "100000000"])]
    cases += [("output directory", f"ablate --out {out_dir!r}", ["ablate", str(REPO / "configs/ablations/solvers.toml"),
                                                                 "--out", out_dir, *big])
              for out_dir in (".", "/", str(REPO), str(runs / "afile"))]
    if can_mount:
        disk = workdir / "disk"
        cases += [("full disk", f"runs_dir on a full 8 KiB tmpfs{flag}", ["train", str(h.short),
                   f"train.runs_dir={disk}", *([flag.strip()] if flag else [])])
                  for flag in ("", " --skip-resource-check")]
    return cases


def run_bad_input(h: Harness, runs: Path, workdir: Path, kind: str, what: str, args: list[str]) -> dict:
    """One case: its exit status, its message, and whether it failed cleanly and lost nothing."""
    disk = workdir / "disk"
    mounted = any(str(a).startswith(f"train.runs_dir={disk}") for a in args)
    if mounted:
        disk.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], check=True)
    before = {"runs": snapshot(runs), "repo": snapshot(REPO / "configs")}
    t0 = time.monotonic()
    rc, output = h.run(*args)
    seconds = time.monotonic() - t0
    lost = before != {"runs": snapshot(runs), "repo": snapshot(REPO / "configs")}
    if mounted:
        lost = lost or any(disk.iterdir())
        subprocess.run(["umount", str(disk)], check=False)
    problem = clean_failure(rc, output) or ("something changed or was left behind" if lost else None)
    message = next((ln for ln in output.splitlines() if ln.startswith("ode-lm: ")), "")
    print(f"{'ok ' if problem is None else 'BAD'} {kind}: {what}: exit {rc} in {seconds:.1f} s; {message[:160]}",
          flush=True)
    return {"kind": kind, "input": what, "exit": rc, "seconds": round(seconds, 1),
            "clean": problem is None, "problem": problem, "message": message[:300],
            **({"output": output[-2000:]} if problem else {})}


def bad_inputs(h: Harness, workdir: Path, can_mount: bool) -> list[dict]:
    """Train one short run, then try every bad input of ``bad_input_cases`` against it."""
    runs = workdir / "runs"
    rc, out = h.run("train", str(h.short), f"train.runs_dir={runs}")
    assert rc == 0, out
    (runs / "afile").write_text("a file, not a run")
    return [run_bad_input(h, runs, workdir, kind, what, args)
            for kind, what, args in bad_input_cases(h, runs, workdir, can_mount)]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= step for r in read_metrics(run_dir)):
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise RuntimeError("no training progress")
        time.sleep(0.05)


def lock_trials(h: Harness, workdir: Path, trials: int, rng: random.Random) -> list[dict]:
    """A trainer runs; a second one (plain, --resume or --overwrite) must be refused with the
    first one's PID, and the first one's run must hold each step's row once."""
    rows = []
    for trial in range(trials):
        runs = workdir / f"lock{trial}"
        first = h.start("train", str(h.long), f"train.runs_dir={runs}")
        wait_for_step(first, runs / "tiny", rng.randint(1, 8))
        flag = rng.choice([[], ["--resume"], ["--overwrite"]])
        rc, output = h.run("train", str(h.long), f"train.runs_dir={runs}", *flag)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=TIMEOUT)
        steps = [r["step"] for r in read_metrics(runs / "tiny", "train") if "lr" not in r]
        problem = clean_failure(rc, output)
        if problem is None and f"PID {first.pid}" not in output:
            problem = "holder's PID not named"
        if steps != list(range(1, len(steps) + 1)):
            problem = "metrics rows duplicated or missing"
        if first.returncode != 130 or latest_checkpoint(runs / "tiny", warn=lambda m: None) is None:
            problem = f"first trainer: exit {first.returncode}, checkpoint missing?"
        rows.append({"trial": trial, "second": " ".join(flag) or "(plain)", "second_exit": rc,
                     "first_exit": first.returncode, "steps_logged": len(steps), "clean": problem is None,
                     "problem": problem})
        print(f"{'ok ' if problem is None else 'BAD'} lock trial {trial}: second {' '.join(flag) or 'plain'} "
              f"exit {rc}; first exit {first.returncode} after {len(steps)} steps", flush=True)
    return rows


def sigint_trials(h: Harness, workdir: Path, trials: int, rng: random.Random, base: Path) -> list[dict]:
    """SIGINT at a random moment of start-up (even trials) or of training (odd trials; a third
    of all go into an existing run with --overwrite): exit 130, one line; before the first
    step nothing may have changed, after it a readable checkpoint must exist."""
    rows = []
    for trial in range(trials):
        runs = workdir / f"sigint{trial}"
        overwrite = trial % 3 == 2
        if overwrite:
            shutil.copytree(base, runs / "tiny")
        before = snapshot(runs)
        proc = h.start("train", str(h.long), f"train.runs_dir={runs}", *(["--overwrite"] if overwrite else []))
        t0 = time.monotonic()
        if trial % 2 == 0:  # start-up: imports, data, JAX, the first compilation
            time.sleep(rng.uniform(0.1, 8.0))
        else:  # in the loop: a random 0-50 ms after a random step was logged
            wait_for_step(proc, runs / "tiny", rng.randint(1, 30))
            time.sleep(rng.uniform(0.0, 0.05))
        delay = time.monotonic() - t0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        output = out + err
        early = "before the first training step" in output
        late = [ln for ln in output.splitlines() if ln.startswith("interrupted at step")]
        problem = None
        if proc.returncode != 130:
            problem = f"exit {proc.returncode}"
        elif "Traceback" in output or "Exception ignored" in output:
            problem = "traceback"
        elif early == bool(late):
            problem = "not exactly one message line"
        elif early and snapshot(runs) != before:
            problem = "something was written before the first step"
        elif late and latest_checkpoint(runs / "tiny", warn=lambda m: None) is None:
            problem = "no readable checkpoint after an interrupt in the loop"
        where = "before the first step" if early else (f"step {late[0].split()[3].rstrip(';')}" if late else "?")
        rows.append({"trial": trial, "delay_s": round(delay, 2), "into": "an existing run, --overwrite"
                     if overwrite else "a new run", "exit": proc.returncode,
                     "stopped": where, "clean": problem is None, "problem": problem,
                     **({"output": output[-2000:]} if problem else {})})
        print(f"{'ok ' if problem is None else 'BAD'} SIGINT trial {trial} at {delay:.2f} s"
              f"{' (--overwrite)' if overwrite else ''}: exit {proc.returncode}, {where}", flush=True)
    return rows


def can_mount(root: Path) -> bool:
    probe = root / "probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=False)
    return ok


def summarise(name: str, rows: list[dict], key: str) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    return [f"| {name} | {k} | {len(v)} | {sum(r['clean'] for r in v)} |" for k, v in groups.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigint-trials", type=int, default=20)
    parser.add_argument("--lock-trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default docs/results/reliability_cpu.json)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="ode-lm-stress-"))
    try:
        h = Harness(root)
        inputs = bad_inputs(h, root / "inputs", can_mount(root))
        locks = lock_trials(h, root, args.lock_trials, rng)
        signals = sigint_trials(h, root, args.sigint_trials, rng, root / "inputs" / "runs" / "tiny")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = ["| trials | kind | tried | handled cleanly |", "| --- | --- | --- | --- |",
             *summarise("bad input", inputs, "kind"), *summarise("second trainer", locks, "second"),
             *summarise("SIGINT at a random moment", signals, "into")]
    print("\n".join(lines))
    early = sum(r["stopped"] == "before the first step" for r in signals)
    print(f"SIGINT: {len(signals)} trials, {sum(r['exit'] == 130 for r in signals)} exited 130; {early} stopped "
          f"before the first step, {len(signals) - early} in the training loop")
    out = Path(args.out or REPO / "docs" / "results" / "reliability_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                               "machine": platform.processor() or platform.machine(), "seed": args.seed,
                               "bad_inputs": inputs, "second_trainer": locks, "sigint": signals,
                               "table": lines}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
