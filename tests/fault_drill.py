"""Faults on purpose, for the failure drills (test hooks, not production paths).

    python tests/fault_drill.py FAULT[,FAULT...] [mpc-dist train arguments: --set ..., --resume]

Trains like ``launch/train.py`` (the same command line, errors and exit codes, through
``mpc_dist.cli``), with faults injected. A FAULT is ``[ATTEMPT@]RANK:STEP:KIND``: it fires on
rank RANK, only in the launcher's attempt ATTEMPT (TORCHELASTIC_RESTART_COUNT) when given, and

* ``raise`` / ``kill``: raises / SIGKILLs itself just before this process's optimizer step
  number STEP (counted from 1 in every attempt, as ``Callback.before_step`` counts);
* ``kill-checkpoint``: SIGKILLs itself right after writing its part of the checkpoint of run
  step STEP, before the checkpoint is complete;
* ``full-disk``: this rank's disk is full (``/dev/full``: ENOSPC) while it writes its part of
  the checkpoint of run step STEP;
* ``withhold``: never sends the activation of microbatch 1 of run step STEP; its tag is used up,
  so the next stage waits for it forever (a hang).
"""

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from mpc_dist import cli
from mpc_dist.parallel import Mailbox, MessageKind
from mpc_dist.train import Callback, restart_count, train


def kill_myself() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class FailAt(Callback):
    def __init__(self, step: int, kind: str) -> None:
        self.step, self.kind = step, kind

    def before_step(self, step: int) -> None:
        if step == self.step:
            if self.kind == "kill":
                kill_myself()
            raise RuntimeError(f"injected fault at step {step}")


def kill_while_checkpointing(step: int) -> None:
    """After DCP wrote this rank's files of ``step_<step>.partial``: die before the commit."""
    original = dcp.save

    @functools.wraps(original)
    def save(*args, checkpoint_id, **kwargs):
        result = original(*args, checkpoint_id=checkpoint_id, **kwargs)
        if Path(checkpoint_id).name == f"step_{step:08d}.partial":
            kill_myself()
        return result

    dcp.save = save


def fill_disk_while_checkpointing(step: int) -> None:
    """DCP's writes of ``step_<step>.partial`` on this rank go to /dev/full (ENOSPC)."""
    original = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" in mode and f"step_{step:08d}.partial" in str(path):
            with open("/dev/full", mode) as stream:
                yield stream
        else:
            with original(self, path, mode) as stream:
                yield stream

    FileSystem.create_stream = create_stream


def withhold_activation(step: int) -> None:
    original = Mailbox.send

    def send(self, tensors, stage, message):
        run_step = self.flight.step + message.minibatch + 1
        if message.kind == MessageKind.ACTIVATION and message.microbatch == 1 and run_step == step:
            self._send_seq[stage] += len(tensors)  # as if sent: the receiver's tag never comes
            return None
        return original(self, tensors, stage, message)

    Mailbox.send = send


def install(spec: str) -> list[Callback]:
    """Arm this process's faults; returns the callbacks that fire them."""
    callbacks, rank = [], int(os.environ["RANK"])
    for fault in spec.split(","):
        attempt, _, fault = fault.rpartition("@")
        fault_rank, step, kind = fault.split(":")
        if int(fault_rank) != rank or (attempt and int(attempt) != restart_count()):
            continue
        if kind in ("raise", "kill"):
            callbacks.append(FailAt(int(step), kind))
        elif kind == "kill-checkpoint":
            kill_while_checkpointing(int(step))
        elif kind == "full-disk":
            fill_disk_while_checkpointing(int(step))
        elif kind == "withhold":
            withhold_activation(int(step))
        else:
            raise ValueError(f"unknown fault {kind!r}")
    return callbacks


if __name__ == "__main__":
    spec, *arguments = sys.argv[1:]
    cli.train = functools.partial(train, callbacks=install(spec))
    sys.exit(cli.main(["train", *arguments]))
