"""Forward-forward's first epoch under several settings (docs/rules.md, "The first epoch of
forward-forward 4 x 2000, measured alone").

    .venv/bin/python scripts/ff_first_epoch.py --out runs/ff-first-epoch \
        "w2000_lr1e-3=" "w2000_lr2.5e-4=optim.lr=0.00025" "w500_lr1e-3=model.width=500"

Each NAME=OVERRIDES (comma-separated) trains configs/ff_mnist.yaml for --steps steps (600: one
epoch, inside the constant-rate half of its 60-epoch schedule), then prints one JSON line: the
readout's test accuracy, Hinton's goodness-over-labels accuracy and the train seconds. A name
already in OUT/results.jsonl is skipped, so a stopped run of the script goes on where it was.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mpc_dist.config import load_config
from mpc_dist.studies.paper_rules import other_predictions
from mpc_dist.train import train

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("variants", nargs="+", help="NAME=KEY=VALUE,KEY=VALUE...")
parser.add_argument("--out", default="runs/ff-first-epoch")
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
args = parser.parse_args()

torch.set_num_threads(args.threads)
results = Path(args.out) / "results.jsonl"
results.parent.mkdir(parents=True, exist_ok=True)
lines = results.read_text().splitlines() if results.exists() else []
done = {json.loads(line)["name"] for line in lines}
for variant in args.variants:
    name, _, overrides = variant.partition("=")
    if name in done:
        continue
    config = load_config(
        "configs/ff_mnist.yaml",
        [*filter(None, overrides.split(",")), f"train.max_steps={args.steps}",
         f"run.out_dir={args.out}/runs", f"run.name={name}", "run.progress=false",
         "run.tensorboard=false", "run.plot=false", f"run.checkpoint_every={args.steps}"],
    )  # fmt: skip
    started = time.perf_counter()
    summary = train(config)
    seconds = time.perf_counter() - started
    result = {"name": name, "overrides": overrides, "readout_accuracy": summary["test accuracy"],
              **other_predictions(config), "seconds": round(seconds, 1)}  # fmt: skip
    print(json.dumps(result), flush=True)
    with results.open("a") as file:
        file.write(json.dumps(result) + "\n")
