"""Per-rank entry script for any launcher.

    torchrun --nproc-per-node 4 launch/train.py --config configs/mnist_4stage.yaml
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 4 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no launch/train.py --config configs/mnist_4stage.yaml
    deepspeed --num_gpus 4 launch/train.py --config configs/mnist_4stage.yaml

Every launcher ends up in the same function as `mpc-dist train`. Rank and world come from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that every launcher sets.
"""

import os
import sys

from mpc_dist.cli import main


def without_local_rank(argv: list[str]) -> list[str]:
    """deepspeed and torch.distributed.launch also pass --local_rank=N; the env var says it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            os.environ.setdefault("LOCAL_RANK", arg)
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main(["train", *without_local_rank(sys.argv[1:])]))
