"""A Ray Train job whose rank 1 SIGKILLs itself once, before its 4th step (a test hook, not a
production path). The driver runs here, in its own process, not in pytest's: a Ray driver whose
cluster goes away may take its process with it.

    python tests/ray_drill.py ADDRESS MARKER KEY=VALUE...

Connects to the Ray cluster at ADDRESS, trains the config the KEY=VALUE overrides give with one
restart allowed, writes MARKER when it kills the worker, and prints the summary as JSON last.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from mpc_dist.config import load_config
from mpc_dist.launchers.ray_job import ray_train
from mpc_dist.train import Callback


class KillOnce(Callback):  # defined in __main__: Ray pickles it by value to the workers
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def before_step(self, step: int) -> None:
        if step == 4 and int(os.environ["RANK"]) == 1 and not self.marker.exists():
            self.marker.write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    address, marker, *overrides = sys.argv[1:]
    config = load_config(None, overrides)
    summary = ray_train(config, address, max_failures=1, callbacks=[KillOnce(Path(marker))])
    print(json.dumps(summary, default=str))
