"""Per-rank entry script for any launcher.

    torchrun --nproc-per-node 4 launch/train.py --config configs/mnist_4stage.yaml
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 4 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no launch/train.py --config configs/mnist_4stage.yaml
    deepspeed --num_gpus 4 launch/train.py --config configs/mnist_4stage.yaml

Every launcher ends up in the same function as `mpc-dist train`.
"""

import sys

from mpc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
