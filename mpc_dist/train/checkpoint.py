"""Atomic checkpoints through torch.distributed.checkpoint (DCP).

Model and optimizer state are keyed by fully qualified parameter names (``blocks.5.fc1.weight``),
so a checkpoint written by one stage layout loads into another. Every rank writes its shard into
``step_N.partial/`` and takes the size and CRC-32 of the files it wrote; rank 0 then writes the
manifest of every file and renames the folder to ``step_N/`` (the commit point; old checkpoints
are renamed back to ``.partial`` before they are deleted). Only ``step_<8 digits>`` folders are
complete; a ``.partial`` one is a write that was cut short (a kill, a full disk) and is removed
when the run starts again. The manifest turns a truncated or altered file into an error naming
it, instead of a zip-reader traceback; ``load_latest`` falls back to the checkpoint before a
damaged one only when asked (``run.resume_fallback``), keeping the damaged one as ``.damaged``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

MANIFEST = "manifest.json"
COMPLETE = re.compile(r"step_\d{8}")  # a complete checkpoint's folder name
# Optimizer state and hyper-parameters keyed per parameter name, so any stage layout can load it.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
TRAINER_STATE = "trainer.json"


class CheckpointError(RuntimeError):
    pass


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (collective), in rank order."""
    if _world() == 1:
        return [value]
    values: list[Any] = [None] * _world()
    dist.all_gather_object(values, value)
    return values


def _digest(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file (read in 16 MiB pieces)."""
    crc = 0
    with path.open("rb") as file:
        while piece := file.read(16 * 2**20):
            crc = zlib.crc32(piece, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk (a rename is durable only then)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: DCP wraps every rank's in a CheckpointException."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, CheckpointException):
        for failure, _ in error.failures.values():
            if (found := _os_error(failure)) is not None:
                return found
    cause = error.__cause__ or error.__context__
    return _os_error(cause) if cause is not None else None


def _first_line(error: BaseException) -> str:
    if isinstance(error, CheckpointException):  # its text is every rank's traceback
        failures = [failure for failure, _ in error.failures.values()]
        if failures:
            return _first_line(failures[0])
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
    ) -> Path:
        """Collective: every rank calls it with its own model part. A write that fails (a full
        disk) raises CheckpointError naming the folder; the previous checkpoint stays whole."""
        final = self.directory / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        try:
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
        except OSError as error:
            raise self._write_error(error, partial) from error
        _barrier()
        model_state, optim_state = _get_state(model, optimizer)
        try:
            with warnings.catch_warnings():  # DCP warns when it runs without a process group
                warnings.simplefilter("ignore")
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
            torch.save(rng_state(model), partial / f"rng_rank{_rank()}.pt")
            mine = {p.name: _digest(p) for p in self._written_by(partial, _rank())}
        except (OSError, RuntimeError, CheckpointException) as error:
            raise self._write_error(error, partial) from error
        digests = _gather(mine)  # also the barrier: every rank has written its files
        if _rank() == 0:
            try:
                self._commit(partial, final, digests, trainer_state)
            except OSError as error:
                raise self._write_error(error, partial) from error
            self._prune()
        _barrier()
        return final

    @staticmethod
    def _written_by(partial: Path, rank: int) -> list[Path]:
        """The files a rank wrote (DCP names its data files ``__<rank>_<n>.distcp``)."""
        return sorted([*partial.glob(f"__{rank}_*"), partial / f"rng_rank{rank}.pt"])

    def _commit(
        self, partial: Path, final: Path, digests: list[dict], trainer_state: dict[str, Any]
    ) -> None:
        """Rank 0: the trainer state and the manifest, then the rename that completes it."""
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state))
        files = {name: digest for mine in digests for name, digest in mine.items()}
        for path in sorted(partial.iterdir()):  # DCP's metadata, the trainer state, the rest
            if path.name not in files:
                files[path.name] = _digest(path)
        with (partial / MANIFEST).open("w") as manifest:
            json.dump({"format": 2, "files": files}, manifest)
            manifest.flush()
            os.fsync(manifest.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # the commit point
        _fsync(self.directory)

    def _write_error(self, error: BaseException, partial: Path) -> CheckpointError:
        cause = _os_error(error)
        what = _first_line(error) if cause is None else (cause.strerror or str(cause))
        if cause is not None and cause.filename:
            what += f": {cause.filename}"
        latest = self.latest()
        kept = (
            f"the last complete checkpoint {latest} is intact"
            if latest
            else "there is no earlier checkpoint"
        )
        return CheckpointError(
            f"could not write checkpoint {partial} ({what}); {kept}; free space there (or move "
            f"run.out_dir) and resume with --resume"
        )

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.directory.glob("step_*") if COMPLETE.fullmatch(p.name))

    def latest(self) -> Path | None:
        done = self.all()
        return done[-1] if done else None

    def remove_partial(self) -> list[str]:
        """Delete what writes cut short left behind (``.partial`` folders); returns their names.
        Call it on one rank, while no checkpoint is being written."""
        removed = []
        for path in sorted(self.directory.glob("step_*.partial")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        return removed

    def load_latest(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fallback: bool = False
    ) -> tuple[Path, dict[str, Any]]:
        """Load the newest complete checkpoint (collective); with ``fallback``, the newest one
        that loads; a damaged one is renamed ``step_N.damaged`` (kept, no longer a checkpoint),
        so that the run writes step N anew. Returns its path and the trainer state."""
        candidates = self.all()[::-1]
        if not candidates:
            raise CheckpointError(f"{self.directory} holds no complete checkpoint")
        for index, path in enumerate(candidates):
            try:
                return path, self.load(path, model, optimizer)
            except CheckpointError as error:
                older = candidates[index + 1] if index + 1 < len(candidates) else None
                if older is None:
                    raise
                if not fallback:
                    raise CheckpointError(
                        f"{error}; or set run.resume_fallback=true to resume from {older.name}"
                    ) from error
                if _rank() == 0:
                    path.rename(path.with_name(path.name + ".damaged"))
                    print(
                        f"mpc-dist: {error}; moved it to {path.name}.damaged and resuming "
                        f"from {older} (run.resume_fallback)",
                        file=sys.stderr,
                    )
                _barrier()
        raise AssertionError("unreachable: the oldest candidate returns or raises")

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Restore model, optimizer and RNG in place (collective); returns the trainer state.
        Every rank raises the same CheckpointError or none does."""
        model_state, optim_state = _get_state(model, optimizer)
        problems = _gather(self._check(path, model_state))  # every rank checks its share
        problem = next((p for p in problems if p is not None), None)
        if problem is not None:
            raise CheckpointError(problem)
        try:
            saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
            # A parameter no loss ever reached (an aux head outside the plan) has no optimizer
            # state in the checkpoint: it keeps the fresh state torch gives it here.
            optim_saved = {k: v for k, v in optim_state.items() if f"optim.{k}" in saved}
            state = {"model": model_state, "optim": optim_saved}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, checkpoint_id=path)
            optim_state.update(state["optim"])
        except (Exception, CheckpointException) as error:  # DCP's name zip internals, not fixes
            raise CheckpointError(
                f"checkpoint {path} could not be read ({_first_line(error)}); delete it to "
                f"resume from an earlier one"
            ) from error
        if _trains(optimizer):
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state
            )
        else:
            set_model_state_dict(model, state["model"], options=OPTIONS)
        rng = path / f"rng_rank{_rank()}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng), model)
        return json.loads((path / TRAINER_STATE).read_text())

    def _check(self, path: Path, model_state: dict) -> str | None:
        """What is wrong with ``path`` for this rank (its share of the files, its tensors)."""
        try:
            self.verify(path, share=(_rank(), _world()))
            saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        except CheckpointError as error:
            return str(error)
        except Exception as error:
            return f"checkpoint {path} could not be read ({_first_line(error)})"
        missing = [k for k in model_state if f"model.{k}" not in saved]
        if missing:
            return (
                f"checkpoint {path} lacks {len(missing)} of this model's tensors, e.g. "
                f"{missing[:3]}; it was written by another model"
            )
        return None

    @staticmethod
    def verify(path: Path, share: tuple[int, int] = (0, 1)) -> None:
        """Check the files against the manifest: sizes, and CRC-32s (a manifest of format 2).
        ``share`` = (index, count): check every count-th file from index (ranks split it)."""
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {MANIFEST}; it is incomplete, delete it"
            )
        try:
            listed = json.loads(manifest.read_text())
        except (ValueError, OSError) as error:
            raise CheckpointError(f"checkpoint {manifest} is unreadable ({error})") from error
        files = (
            listed["files"]
            if listed.get("format") == 2
            else {name: {"size": size} for name, size in listed.items()}
        )
        index, count = share
        for name, expected in sorted(files.items())[index::count]:
            file = path / name
            actual = file.stat().st_size if file.exists() else -1
            if actual != expected["size"]:
                raise CheckpointError(
                    f"checkpoint file {file} is damaged: {max(actual, 0)} of {expected['size']} "
                    f"bytes (truncated or missing); delete {path} to resume from an earlier one"
                )
            if "crc32" in expected and _digest(file)["crc32"] != expected["crc32"]:
                raise CheckpointError(
                    f"checkpoint file {file} is corrupt (its CRC-32 differs from the one "
                    f"written); delete {path} to resume from an earlier one"
                )

    def _prune(self) -> None:
        for old in self.all()[: -self.keep]:
            # out of the complete set first: a kill during the deletion leaves a .partial
            doomed = old.with_name(old.name + ".partial")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _trains(optimizer: torch.optim.Optimizer) -> bool:
    return any(group["params"] for group in optimizer.param_groups)


def _get_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state by parameter name; a stage with nothing to train (all frozen)
    has no optimizer state, which ``get_state_dict`` refuses."""
    if not _trains(optimizer):
        return get_model_state_dict(model, options=OPTIONS), {}
    return get_state_dict(model, optimizer, options=OPTIONS)


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    """The CUDA devices ``model``'s parameters are on (its rank's devices)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def rng_state(model: torch.nn.Module) -> dict[str, Any]:
    """This rank's random state: the CPU generator's, and the CUDA generator of each device the
    model's parameters are on (dropout on a GPU draws from those); no other GPU is touched."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    devices = _cuda_devices(model)
    if devices:
        state["cuda"] = {index: torch.cuda.get_rng_state(index) for index in devices}
    return state


def set_rng_state(state: torch.Tensor | dict[str, Any], model: torch.nn.Module) -> None:
    """Restore ``rng_state``'s result on the devices ``model`` is on now; a bare tensor is the
    CPU state older checkpoints hold (their CUDA generators keep their seeds)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    saved = state.get("cuda", {})
    for index in _cuda_devices(model):
        if index in saved:
            torch.cuda.set_rng_state(saved[index], index)


def load_run_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a run's latest checkpoint, by parameter name (any stage layout)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    run_dir = Path(run_dir)
    latest = Checkpointer(run_dir / "checkpoints").latest()
    if latest is None:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    Checkpointer.verify(latest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _load_state_dict_from_keys(checkpoint_id=latest)
    return {
        k.removeprefix("model."): v for k, v in _flatten(state).items() if k.startswith("model.")
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict[str, float]:
    """Largest absolute difference per parameter between two runs' final weights."""
    a, b = load_run_weights(run_a), load_run_weights(run_b)
    if a.keys() != b.keys():
        raise CheckpointError(
            f"the runs hold different parameters: {sorted(a.keys() ^ b.keys())[:5]}"
        )
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in sorted(a)}
