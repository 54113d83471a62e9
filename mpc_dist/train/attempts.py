"""Attempts: every start of a run, by any launcher, and whether it resumes.

A launcher that restarts a failed job (``torchrun --max-restarts``, ``accelerate launch
--max_restarts``, Ray Train's ``max_failures``) starts every rank again with the same
arguments. A restarted job resumes from the run's latest complete checkpoint by itself; the
first attempt of a run starts fresh (or resumes when the user asked, ``--resume``). Before it
starts, rank 0 removes the checkpoint writes a kill cut short (``.partial`` folders), keeps the
previous attempt's flight records as ``failure.<n>/``, and appends one line to
``attempts.jsonl``: the same record whichever launcher restarted the job.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from .checkpoint import Checkpointer

ATTEMPTS = "attempts.jsonl"  # one line per start of the run, written by rank 0
FAILURE = "failure"  # the flight records of the last failure (``mpc-dist why``)


def restart_count() -> int:
    """How often the launcher has restarted this job: torchrun's elastic agent (also behind
    ``accelerate launch``) says so in TORCHELASTIC_RESTART_COUNT; 0 elsewhere."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def launcher_name() -> str:
    """Who started this process, as far as its environment says."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        accelerate = any(key.startswith("ACCELERATE_") for key in os.environ)
        return "accelerate" if accelerate else "torchrun"
    return "processes" if "RANK" in os.environ else "single process"


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / ATTEMPTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def begin_attempt(
    config: Config, resume: bool, notes: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """On rank 0 (or the only process), before anything is written: decide whether this start
    resumes, clean up after the previous attempt, and record this one. ``notes``: what the
    launcher knows (Ray: its checkpoint). Returns the record (``resume_from``: the checkpoint
    to resume from, None for a fresh start)."""
    run_dir = config.run_dir
    checkpoints = Checkpointer(run_dir / "checkpoints")
    restart = restart_count()
    resume = resume or (restart > 0 and checkpoints.latest() is not None)
    prepare_run_dir(config, resume, write=False)  # refuses to overwrite a run's checkpoints
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = checkpoints.remove_partial() if checkpoints.directory.exists() else []
    latest = checkpoints.latest() if resume else None
    record = {
        "time": time.time(),
        "launcher": launcher_name(),
        "restart": restart,
        "world_size": config.world_size,
        "resume_from": str(latest) if latest else None,
        "removed_partial": removed,
        "previous_failure": _archive_failure(run_dir),
        **(notes or {}),
    }
    with (run_dir / ATTEMPTS).open("a") as file:
        file.write(json.dumps(record) + "\n")
    return record


def prepare_run_dir(config: Config, resume: bool, write: bool = True) -> Path:
    """Refuse to start over a run's checkpoints without ``--resume`` (or to resume none); write
    the resolved config. Only complete checkpoints count (a ``.partial`` one is no checkpoint)."""
    run_dir = config.run_dir
    complete = Checkpointer(run_dir / "checkpoints").all()
    if not resume and complete:
        raise ConfigError(
            f"run.name={config.run.name}: {run_dir} already holds checkpoints; pass --resume to "
            f"continue it or choose another run.name"
        )
    if resume and not complete:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())
    return run_dir


def _archive_failure(run_dir: Path) -> str | None:
    """Move the previous failure's flight records to ``failure.<n>``; return its one line."""
    failure = run_dir / FAILURE
    if not failure.is_dir():
        return None
    summary = failure / "summary.json"
    line = json.loads(summary.read_text())["failure"] if summary.exists() else None
    number = 1 + max((int(p.suffix[1:]) for p in archived_failures(run_dir)), default=0)
    os.replace(failure, run_dir / f"{FAILURE}.{number}")
    return line


def archived_failures(run_dir: Path) -> list[Path]:
    """``failure.<n>`` folders, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{FAILURE}.*") if p.suffix[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.suffix[1:]))
