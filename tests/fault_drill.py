"""A rank that fails on purpose, for the failure drills (a test hook, not a production path).

    python tests/fault_drill.py RANK:STEP:raise|kill --set section.key=value ...

Trains like ``launch/train.py``, with a step callback that makes rank RANK raise (or SIGKILL
itself) just before its optimizer step number STEP.
"""

import os
import signal
import sys

from mpc_dist.config import load_config
from mpc_dist.train import Callback, train


class FailAt(Callback):
    def __init__(self, rank: int, step: int, kind: str) -> None:
        self.rank, self.step, self.kind = rank, step, kind

    def before_step(self, step: int) -> None:
        if step == self.step and int(os.environ["RANK"]) == self.rank:
            if self.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {step}")


if __name__ == "__main__":
    spec, *args = sys.argv[1:]
    rank, step, kind = spec.split(":")
    overrides = args[1::2]  # --set section.key=value pairs
    train(load_config(None, overrides), callbacks=[FailAt(int(rank), int(step), kind)])
