"""``mpc-dist``: the one command line (``mpc-dist --help`` lists its commands). ``train`` ends
in ``mpc_dist.train.train``, the entry point every launcher calls (``launch/train.py`` for
torchrun, accelerate and deepspeed).
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys

from .config import ConfigError, load_config
from .core import HORIZON_RULES, RULES, Plan
from .horizon import OBJECTIVES
from .launchers.conventions import apply_launcher_settings
from .parallel import (
    ScheduleError,
    ScheduleSpec,
    bubble_fraction,
    generate,
    stage_ranges,
    uniform_partition,
    validate_schedule,
)
from .train import CheckpointError, DataError, TrainingError, compare_runs, train, validate_config
from .train.metrics import StorageError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, ScheduleError, StorageError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _plan(args: argparse.Namespace) -> None:
    print(Plan(args.rule, args.horizon, args.blocks))


def _schedule(args: argparse.Namespace) -> None:
    blocks = args.blocks or args.stages
    horizon = args.horizon or (blocks if args.rule in HORIZON_RULES else 1)
    ranges = stage_ranges(uniform_partition(blocks, args.stages))
    spec = ScheduleSpec(args.microbatches, args.mode, args.policy)
    schedule = generate(Plan(args.rule, horizon, blocks), ranges, spec, args.minibatches)
    events = validate_schedule(schedule)
    print(schedule)
    makespan = max(e.end for e in events)
    print(
        f"valid: complete, exact and deadlock-free; {makespan:g} time units "
        f"({makespan / args.minibatches:g} per minibatch), bubble {bubble_fraction(events):.1%}"
    )
    if args.actions:
        for stage, actions in enumerate(schedule.actions):
            print(f"stage {stage}: " + " ".join(str(a) for a in actions))


def _train(args: argparse.Namespace) -> None:
    config, notes = apply_launcher_settings(
        load_config(args.config, args.set), args.deepspeed_config
    )
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"mpc-dist: {note}", file=sys.stderr)
    if args.dry_run:
        from .train.dry_run import dry_run

        dry_run(config)
        return
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: must be >= 0")
    if (args.nproc > 1 or args.max_restarts) and "WORLD_SIZE" not in os.environ:
        validate_config(config)  # fail here, once, rather than in every process
        if config.world_size != args.nproc:
            raise ConfigError(
                f"--nproc {args.nproc}: pipeline.stages x pipeline.replicas is "
                f"{config.world_size}; pass --nproc {config.world_size} or change the config"
            )
        _spawn(args)
        return
    train(config, resume=args.resume)


def _spawn(args: argparse.Namespace) -> None:
    """One process per rank on this machine, through torchrun (it also stops the others when
    one fails, and restarts them ``--max-restarts`` times: the run resumes by itself)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "mpc_dist.cli",
        "train",
    ]
    if args.config:
        command += ["--config", args.config]
    for item in args.set:
        command += ["--set", item]
    if args.resume:
        command.append("--resume")
    if args.deepspeed_config:
        command += ["--deepspeed_config", args.deepspeed_config]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = subprocess.call(command, env=env)
    if code:
        raise SystemExit(code)


def _why(args: argparse.Namespace) -> None:
    from .train.why import explain

    try:
        explain(args.run_dir)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def _doctor(args: argparse.Namespace) -> None:
    """Check a node or a job before a run; exits 1 when something blocks it."""
    config = load_config(args.config, args.set)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .train.doctor import spawned

        code = spawned(args.nproc, args.config, args.set)
    else:
        from .train.doctor import run_doctor

        code = run_doctor(config)
    if code:
        raise SystemExit(code)


def _measured_setup(args: argparse.Namespace):
    """Config, meta-device model and training data, as `train` would have them."""
    from .train import open_run

    config = load_config(args.config, args.set)
    validate_config(config)
    model, train_source, _ = open_run(config)
    return config, model, train_source


def _probe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .horizon import candidate_horizons
    from .train.checkpoint import Checkpointer
    from .train.selection import probe_checkpoints, write_probe

    if args.run_dir and not args.config:  # the run's own config
        args.config = str(Path(args.run_dir) / "config.yaml")
    config, model, dataset = _measured_setup(args)
    checkpoints = [Path(c) for c in args.checkpoint]
    if args.run_dir:
        checkpoints += Checkpointer(Path(args.run_dir) / "checkpoints").all()
    horizons = args.horizons or candidate_horizons(model.num_blocks)
    batches = args.batches or config.horizon.probe_batches
    rows = probe_checkpoints(config, model, dataset, checkpoints, horizons, batches)
    for row in rows:
        print(
            f"step {row['step']:>6}  {row['rule']:<9} h={row['horizon']:<3} "
            f"cos {row['cos']:.4f}  1 - cos^2 {row['one_minus_cos2']:.3e}"
        )
    written = write_probe(rows, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in written))


def _select_horizon(args: argparse.Namespace) -> None:
    from .train.selection import choose_plan, report

    if args.objective:
        args.set.append(f"horizon.objective={args.objective}")
    config, model, dataset = _measured_setup(args)
    _, selection = choose_plan(config, model, dataset)
    report(selection)


def _ray(args: argparse.Namespace) -> None:
    from .launchers.ray_job import main as ray_main

    ray_main(args)


def _compare(args: argparse.Namespace) -> None:
    differences = compare_runs(args.run_a, args.run_b)
    worst = max(differences, key=differences.get)
    for name, value in differences.items():
        if args.verbose or name == worst:
            print(f"{name:<40} max |a - b| = {value:.3g}")
    print(f"{len(differences)} parameters; largest difference {differences[worst]:.3g} ({worst})")
    if args.atol is not None and differences[worst] > args.atol:
        raise SystemExit(1)


def _bench(args: argparse.Namespace) -> None:
    from .bench.bubble import main as bench

    bench(args)


def _simulate(args: argparse.Namespace) -> None:
    from .bench.simulator import main as simulate

    simulate(args)


def _horizon_study(args: argparse.Namespace) -> None:
    from .studies.horizon import main as study

    study(args)


def _rules_study(args: argparse.Namespace) -> None:
    if args.paper:
        from .studies.paper_rules import main as paper_study

        paper_study(args)
        return
    from .studies.rules import main as study

    study(args)


def _data_study(args: argparse.Namespace) -> None:
    from .studies.data import main as study

    study(args)


def _bench_engine(args: argparse.Namespace) -> None:
    from .bench.engine_overhead import main as bench

    bench(args)


def _bench_compile(args: argparse.Namespace) -> None:
    from .bench.compile_cost import main as bench

    bench(args)


def _export_data(args: argparse.Namespace) -> None:
    from .data.export import export_data

    written = export_data(
        args.dataset, args.format, args.out, args.limit, args.ext, args.shard_size, args.root
    )
    counts = ", ".join(f"{split} {n} images" for split, n in written.items())
    print(f"{args.out}: {args.dataset} as {args.format}, {counts}")


def _bench_data(args: argparse.Namespace) -> None:
    from .data.bench import main as bench

    bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpc-dist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _run_commands,
        _job_commands,
        _horizon_commands,
        _bench_commands,
        _study_commands,
        _data_commands,
    ):
        add(commands)
    return parser


def _run_commands(commands) -> None:
    """plan, schedule, train: planning and running a job."""
    plan = commands.add_parser("plan", help="print a credit-assignment plan")
    plan.add_argument("--blocks", type=int, required=True, help="T, the number of blocks")
    plan.add_argument("--horizon", type=int, required=True, help="h, 1 <= h <= T")
    plan.add_argument("--rule", default="receding", choices=RULES)
    plan.set_defaults(run=_plan)

    sched = commands.add_parser("schedule", help="print and validate a pipeline schedule")
    sched.add_argument("--stages", type=int, required=True, help="P pipeline stages")
    sched.add_argument("--microbatches", type=int, required=True, help="m per minibatch")
    sched.add_argument("--blocks", type=int, default=0, help="T (default: one per stage)")
    sched.add_argument(
        "--horizon",
        type=int,
        default=0,
        help="h (default: T, i.e. BP; 1 for the rules that are not horizons)",
    )
    sched.add_argument("--rule", default="receding", choices=RULES)
    sched.add_argument("--mode", default="sync", choices=("sync", "async"))
    sched.add_argument("--policy", default="auto", choices=("auto", "1f1b", "gpipe"))
    sched.add_argument("--minibatches", type=int, default=2)
    sched.add_argument("--actions", action="store_true", help="also list every rank's actions")
    sched.set_defaults(run=_schedule)

    train = commands.add_parser("train", help="train a model (see configs/)")
    _config_arguments(train)
    train.add_argument(
        "--deepspeed_config",
        help="a DeepSpeed JSON config (the deepspeed "
        "launcher's convention): ZeRO stage, bf16/fp16, clipping",
    )
    train.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # convention
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the stage map and memory per device; allocates nothing",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start this many local processes (pipeline.stages x pipeline.replicas) via torchrun",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart the processes this often after a failure (torchrun's --max-restarts); a "
        "restarted run resumes from its latest complete checkpoint",
    )
    train.set_defaults(run=_train)


def _job_commands(commands) -> None:
    """why, ray, doctor: a failed run's records, Ray jobs, checking a node or a job."""
    why = commands.add_parser(
        "why", help="what every rank did when a run failed (its flight records in RUN_DIR/failure)"
    )
    why.add_argument(
        "run_dir",
        help="run directory, e.g. runs/mnist_4stage (its last failure), "
        "or one attempt's records, e.g. runs/mnist_4stage/failure.1",
    )
    why.set_defaults(run=_why)

    ray = commands.add_parser("ray", help="train as a Ray Train job, one worker per rank")
    _config_arguments(ray)
    ray.add_argument(
        "--address",
        help="Ray cluster: auto, ray://host:port (default: "
        "RAY_ADDRESS, else a local Ray instance sized to the config)",
    )
    ray.add_argument(
        "--storage",
        help="Ray storage path or URI (default: ray.storage, "
        "else run.out_dir); a path also holds the run's files",
    )
    ray.add_argument("--max-failures", type=int, help="worker-group restarts (ray.max_failures)")
    ray.add_argument("--dry-run", action="store_true", help="print the planned rank map only")
    ray.add_argument("--nodes", type=int, default=1, help="cluster shape for --dry-run")
    ray.add_argument(
        "--workers-per-node",
        type=int,
        default=0,
        help="worker slots per node for --dry-run (default: all on one)",
    )
    ray.set_defaults(run=_ray)

    doctor = commands.add_parser("doctor", help="check a node or a job before a run")
    _config_arguments(doctor, resume=False)
    doctor.add_argument(
        "--nproc", type=int, default=1, help="check as N local ranks under torchrun"
    )
    doctor.set_defaults(run=_doctor)


def _horizon_commands(commands) -> None:
    """probe, select-horizon, compare: choosing h and comparing runs."""
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    probe = commands.add_parser(
        "probe", help="gradient alignment cos(theta_h) with back-propagation, per h and rule"
    )
    _config_arguments(probe, resume=False)
    probe.add_argument("--run", dest="run_dir", help="a run directory: probe each checkpoint")
    probe.add_argument("--checkpoint", action="append", default=[], help="a checkpoint folder")
    probe.add_argument("--horizons", type=ints, help="default: 1, 2, 4, ..., T")
    probe.add_argument("--batches", type=int, help="microbatches (default horizon.probe_batches)")
    probe.add_argument("--out", default="runs/probe", help="folder for probe.csv/json/png")
    probe.set_defaults(run=_probe)

    select = commands.add_parser(
        "select-horizon", help="measure every rule and h; choose for horizon.objective"
    )
    _config_arguments(select, resume=False)
    select.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="horizon.objective (its parameters: --set horizon.*)",
    )
    select.set_defaults(run=_select_horizon)

    compare = commands.add_parser("compare", help="compare two runs' final weights")
    compare.add_argument("run_a", help="run directory, e.g. runs/mnist_4stage")
    compare.add_argument("run_b")
    compare.add_argument("--atol", type=float, help="exit 1 if any difference exceeds this")
    compare.add_argument("--verbose", action="store_true", help="one line per parameter")
    compare.set_defaults(run=_compare)


def _bench_commands(commands) -> None:
    """bench, simulate, bench-engine, bench-compile: the benchmarks."""
    from .bench.bubble import add_arguments as bench_arguments
    from .bench.simulator import add_arguments as simulate_arguments

    pipeline_bench = commands.add_parser(
        "bench", help="measure pipeline schedules against BP baselines (emulated compute)"
    )
    bench_arguments(pipeline_bench)
    pipeline_bench.set_defaults(run=_bench)

    simulate = commands.add_parser("simulate", help="project schedules to large pipelines")
    simulate_arguments(simulate)
    simulate.set_defaults(run=_simulate)

    bench = commands.add_parser("bench-engine", help="engine step time relative to plain BP")
    bench.add_argument("--blocks", type=int, default=8)
    bench.add_argument("--width", type=int, default=256)
    bench.add_argument("--hidden", type=int, default=512)
    bench.add_argument("--batch-size", type=int, default=256)
    bench.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median taken)")
    bench.add_argument(
        "--compile",
        choices=("none", "inductor", "aot_eager"),
        default="none",
        help="also time every block and engine steps compiled with this backend, against eager",
    )
    bench.set_defaults(run=_bench_engine)

    from .bench.compile_cost import add_arguments as compile_arguments

    compiled = commands.add_parser(
        "bench-compile", help="step time and first-step compile cost, eager vs train.compile"
    )
    compile_arguments(compiled)
    compiled.set_defaults(run=_bench_compile)


def _study_commands(commands) -> None:
    """horizon-study, rules-study, data-study: the studies."""
    from .studies.horizon import add_arguments as study_arguments

    study = commands.add_parser(
        "horizon-study", help="accuracy, memory and time against h (docs/horizon-study.md)"
    )
    study_arguments(study)
    study.set_defaults(run=_horizon_study)

    from .studies.rules import add_arguments as rules_arguments

    rules = commands.add_parser(
        "rules-study",
        help="forward-forward, forward gradient and friends next to BP and MPC (docs/rules.md)",
    )
    rules_arguments(rules)
    from .studies.paper_rules import add_arguments as paper_arguments

    paper_arguments(rules)
    rules.set_defaults(run=_rules_study)

    from .studies.data import add_arguments as data_study_arguments

    data_study = commands.add_parser(
        "data-study",
        help="the streaming path on Fashion-MNIST: MPC and BP, 1 and 2 processes (docs/data.md)",
    )
    data_study_arguments(data_study)
    data_study.set_defaults(run=_data_study)


def _data_commands(commands) -> None:
    """export-data, bench-data: data on disk and the loader's speed."""
    export = commands.add_parser(
        "export-data", help="write MNIST / Fashion-MNIST to disk: image folder, tar, wds or hf"
    )
    export.add_argument(
        "--dataset",
        default="fashion_mnist",
        choices=("mnist", "fashion_mnist", "cifar10", "cifar100"),
    )
    export.add_argument("--format", default="folder", choices=("folder", "tar", "wds", "hf"))
    export.add_argument("--out", required=True, help="the folder to write (data.root)")
    export.add_argument("--limit", type=int, help="about this many images per split, balanced")
    export.add_argument("--ext", default="png", choices=("png", "jpg"))
    export.add_argument("--shard-size", type=int, default=1000, help="wds: images per shard")
    export.add_argument("--root", help="where the in-memory set's files are (data.root)")
    export.set_defaults(run=_export_data)

    from .data.bench import add_arguments as bench_data_arguments

    bench_data = commands.add_parser(
        "bench-data", help="decoded + augmented images/s: our Loader next to timm's create_loader"
    )
    bench_data_arguments(bench_data)
    bench_data.set_defaults(run=_bench_data)


def _config_arguments(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    parser.add_argument("--config", help="YAML run config, e.g. configs/quickstart.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set horizon.horizon=2 (repeatable)",
    )
    if resume:
        parser.add_argument(
            "--resume", action="store_true", help="continue from the last checkpoint"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"mpc-dist: error: {_where()}{error}", file=sys.stderr)
        return 1 if isinstance(error, TrainingError) else 2
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        print(
            f"mpc-dist: error: {_where()}could not write {error.filename or 'a file'}: "
            f"{error.strerror}",
            file=sys.stderr,
        )
        return 2
    return 0


def _where() -> str:
    """Name the rank in multi-process runs."""
    return f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""


if __name__ == "__main__":
    sys.exit(main())
