"""Atomic checkpoints through torch.distributed.checkpoint (DCP).

Model and optimizer state are keyed by fully qualified parameter names (``blocks.5.fc1.weight``),
so a checkpoint written by one stage layout loads into another. Every rank writes its shard into
``step_N.partial/``; rank 0 then writes a manifest of file sizes and renames the folder to
``step_N/``. A folder without the ``.partial`` suffix is complete by construction, and the
manifest turns a later truncation into a clear error instead of a zip-reader traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

MANIFEST = "manifest.json"
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
        """Collective: every rank calls it with its own model part."""
        final = self.directory / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        model_state, optim_state = _get_state(model, optimizer)
        with warnings.catch_warnings():  # DCP warns when it runs without a process group
            warnings.simplefilter("ignore")
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
        torch.save(rng_state(model), partial / f"rng_rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            (partial / TRAINER_STATE).write_text(json.dumps(trainer_state))
            sizes = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
            (partial / MANIFEST).write_text(json.dumps(sizes))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)  # the commit point
            self._prune()
        _barrier()
        return final

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.directory.glob("step_*") if not p.name.endswith(".partial"))

    def latest(self) -> Path | None:
        done = self.all()
        return done[-1] if done else None

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Restore model, optimizer and RNG in place; returns the trainer state."""
        self.verify(path)
        model_state, optim_state = _get_state(model, optimizer)
        try:
            saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
            missing = [k for k in model_state if f"model.{k}" not in saved]
            if missing:
                raise CheckpointError(
                    f"checkpoint {path} lacks {len(missing)} of this model's tensors, e.g. "
                    f"{missing[:3]}; it was written by another model"
                )
            # A parameter no loss ever reached (an aux head outside the plan) has no optimizer
            # state in the checkpoint: it keeps the fresh state torch gives it here.
            optim_saved = {k: v for k, v in optim_state.items() if f"optim.{k}" in saved}
            state = {"model": model_state, "optim": optim_saved}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, checkpoint_id=path)
            optim_state.update(state["optim"])
        except CheckpointError:
            raise
        except Exception as error:  # DCP's own errors name zip internals, not the fix
            raise CheckpointError(
                f"checkpoint {path} could not be read ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120]}); delete it to resume from an earlier one"
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

    @staticmethod
    def verify(path: Path) -> None:
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {MANIFEST}; it is incomplete, delete it"
            )
        for name, size in json.loads(manifest.read_text()).items():
            file = path / name
            actual = file.stat().st_size if file.exists() else -1
            if actual != size:
                raise CheckpointError(
                    f"checkpoint {path} is damaged: {name} has {max(actual, 0)} of {size} bytes "
                    f"(truncated or missing); delete {path} to resume from an earlier checkpoint"
                )

    def _prune(self) -> None:
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


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
