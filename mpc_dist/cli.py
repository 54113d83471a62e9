"""``mpc-dist``: plan, train, bench-engine."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError)


def _plan(args: argparse.Namespace) -> None:
    from .plan import Plan

    print(Plan(args.rule, args.horizon, args.blocks))


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .trainer import train

    train(load_config(args.config, args.set), resume=args.resume)


def _bench_engine(args: argparse.Namespace) -> None:
    from .bench_engine import main as bench

    bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpc-dist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print a credit-assignment plan")
    plan.add_argument("--blocks", type=int, required=True, help="T, the number of blocks")
    plan.add_argument("--horizon", type=int, required=True, help="h, 1 <= h <= T")
    plan.add_argument("--rule", default="receding", choices=("receding", "shrinking"))
    plan.set_defaults(run=_plan)

    train = commands.add_parser("train", help="train a model (see configs/)")
    train.add_argument("--config", help="YAML run config, e.g. configs/quickstart.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set horizon.horizon=2 (repeatable)",
    )  # fmt: skip
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.set_defaults(run=_train)

    bench = commands.add_parser("bench-engine", help="engine step time relative to plain BP")
    bench.add_argument("--blocks", type=int, default=8)
    bench.add_argument("--width", type=int, default=256)
    bench.add_argument("--hidden", type=int, default=512)
    bench.add_argument("--batch-size", type=int, default=256)
    bench.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median taken)")
    bench.set_defaults(run=_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"mpc-dist: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
