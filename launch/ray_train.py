"""Driver script for `ray job submit` (and for running a Ray job by hand): the same as
`mpc-dist ray`, which starts one Ray Train worker per rank and calls the one entry point.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/ray_train.py --config configs/mnist_4stage.yaml --max-failures 2
"""

import sys

from mpc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["ray", *sys.argv[1:]]))
