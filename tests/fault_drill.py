"""A rank that fails on purpose, for the failure drills (a test hook, not a production path).

    python tests/fault_drill.py RANK:STEP:raise|kill --set section.key=value ...

Trains like ``launch/train.py``, with a step callback that makes rank RANK raise (or SIGKILL
itself) just before its optimizer step number STEP.
"""

import os
import signal
import sys

from mpc_dist.config import load_config
from mpc_dist.train import train


def fail_at(rank: int, step: int, kind: str):
    def callback(number: int) -> None:
        if number == step and int(os.environ["RANK"]) == rank:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {number}")

    return callback


if __name__ == "__main__":
    spec, *args = sys.argv[1:]
    rank, step, kind = spec.split(":")
    overrides = args[1::2]  # --set section.key=value pairs
    train(load_config(None, overrides), callbacks=[fail_at(int(rank), int(step), kind)])
