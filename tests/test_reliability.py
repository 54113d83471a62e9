"""Reliability: restarts without Ray, a hang that explains itself, faults at the worst moments.

Every scenario ends with nothing lost: the weights of the uninterrupted run (float64), or the
last complete checkpoint intact and loadable. Faults are injected by ``fault_drill.py`` (in
launched ranks) or set up here (a file linked to /dev/full, a damaged checkpoint, a NaN in one
replica's data); none lives in the product.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import BIN, ENV, TINY, assert_same_weights, sets
from processes import free_port, run

from mpc_dist import cli
from mpc_dist.config import ModelConfig, OptimConfig, load_config
from mpc_dist.core import EngineOptions, HorizonEngine, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import (
    Action,
    FlightRecord,
    Groups,
    Message,
    MessageKind,
    RuntimeOptions,
    ScheduleSpec,
    Topology,
    Wait,
    Watchdog,
    stage_ranges,
)
from mpc_dist.train import (
    Checkpointer,
    TrainingError,
    build_optimizer,
    build_stage,
    load_run_weights,
    read_attempts,
)
from mpc_dist.train.attempts import begin_attempt

DRILL = str(Path(__file__).with_name("fault_drill.py"))
# 8 steps of a 2-stage async pipeline (aux heads, h = 2), a checkpoint every 2 steps
RUN = ["train.max_steps=8", "run.checkpoint_every=2", "horizon.horizon=2", "model.head=aux",
       "pipeline.mode=async"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run every interrupted one must end equal to: one process (this one), never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main(["train", *sets(*TINY, *RUN, f"run.out_dir={out}", "run.name=single")]) == 0
    return out / "single"


def launch(command: list[str], env=None, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or ENV)


# ---------------------------------------------------- launched: restarts, a hang, a full disk


@pytest.mark.multiprocess
def test_random_kills_under_torchrun_restarts_lose_nothing(tmp_path, uninterrupted):
    """Chaos: in each of three attempts a random rank is SIGKILLed before a random step; torchrun
    restarts the job, which resumes from its latest complete checkpoint by itself."""
    rng = random.Random(21)
    kills = [f"{attempt}@{rng.randrange(2)}:{rng.randint(2, 4)}:kill" for attempt in range(3)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=3", DRILL, ",".join(kills),
        *sets(*TINY, *RUN, "pipeline.stages=2", f"run.out_dir={tmp_path}", "run.name=chaos"),
    ]  # fmt: skip
    result = launch(command)
    run_dir = tmp_path / "chaos"
    assert result.returncode == 0, (kills, result.stderr[-4000:])
    attempts = read_attempts(run_dir)
    assert [a["restart"] for a in attempts] == [0, 1, 2, 3], attempts
    assert {a["launcher"] for a in attempts} == {"torchrun"}
    assert attempts[0]["resume_from"] is None
    for attempt, kill in zip(attempts[1:], kills, strict=True):
        # restarted: from the latest complete checkpoint then, if any; the killed rank left no
        # record, the other rank's (stopped by torchrun) is kept per attempt
        assert attempt["resume_from"] is None or "step_0000000" in attempt["resume_from"]
        killed = int(kill.split("@")[1].split(":")[0])
        archive = run_dir / f"failure.{attempt['restart']}"
        assert not (archive / f"rank_{killed}.json").exists(), kill
        survivor = json.loads((archive / f"rank_{1 - killed}.json").read_text())
        assert survivor["reason"] and survivor["state"].startswith(f"stage {1 - killed}")
    print(f"kills {kills}; resumed from {[a['resume_from'] for a in attempts]}")
    assert_same_weights(uninterrupted, run_dir)


@pytest.mark.multiprocess
def test_hang_then_kill_in_a_checkpoint_under_accelerate_restarts(tmp_path, uninterrupted, capsys):
    """One accelerate job (--max_restarts 2), three attempts:
    0. stage 0 never sends the activation of microbatch 1 of step 3 (a forced hang): within
       pipeline.timeout both ranks stop, naming that message, and write their flight records;
    1. resumed from step 2 by itself, rank 1 dies after writing its part of step 4's checkpoint,
       before the commit;
    2. resumed from step 2 again, step 4's partial folder removed; it ends with the weights of
       the uninterrupted run."""
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "--max_restarts", "2", DRILL,
        "0@0:3:withhold,1@1:4:kill-checkpoint",
        *sets(*TINY, *RUN, "pipeline.stages=2", "pipeline.timeout=12", f"run.out_dir={tmp_path}",
              "run.name=acc"),
    ]  # fmt: skip
    result = launch(command, env={**ENV, "ACCELERATE_USE_CPU": "true"})
    run_dir = tmp_path / "acc"
    assert result.returncode == 0, result.stderr[-4000:]
    attempts = read_attempts(run_dir)
    assert [(a["launcher"], a["restart"]) for a in attempts] == [
        ("accelerate", n) for n in range(3)
    ]
    assert attempts[0]["resume_from"] is None
    assert all(a["resume_from"].endswith("step_00000002") for a in attempts[1:]), attempts
    assert attempts[2]["removed_partial"] == ["step_00000004.partial"], attempts[2]
    # the hang: every rank's line, the summary and both records name the missing message
    missing = r"stage 1 waits \d+ s for the activation of microbatch 1 of step 3 from stage 0"
    assert re.search(missing, attempts[1]["previous_failure"]), attempts[1]
    assert "(pipeline.timeout=12 s)" in attempts[1]["previous_failure"], attempts[1]
    for rank in (0, 1):
        said = [x for x in result.stderr.splitlines() if x.startswith(f"mpc-dist: rank {rank} ")]
        assert any(re.search(missing, x) and "timed out" in x for x in said), said
    hang = run_dir / "failure.1"
    records = {r: json.loads((hang / f"rank_{r}.json").read_text()) for r in (0, 1)}
    assert records[1]["waiting"]["message"] == "F0.1s0" and records[1]["waiting"]["peer_stage"] == 0
    assert all(re.search(missing, records[r]["failure"]) for r in (0, 1)), records
    assert records[0]["recent"] and len(records[1]["recent"]) <= 32
    assert cli.main(["why", str(hang)]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # rich wraps lines at 80 columns here
    assert "the activation of microbatch 1 of step 3" in shown and "1RF0.1" in shown, shown
    # the kill inside the checkpoint: rank 0, stopped by the launcher there, says so
    record = json.loads((run_dir / "failure.2" / "rank_0.json").read_text())
    assert "writing the checkpoint of step 4" in record["state"], record
    assert_same_weights(uninterrupted, run_dir)


@pytest.mark.multiprocess
def test_full_disk_on_one_rank_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path, uninterrupted
):
    """Rank 1's disk is full while it writes its part of step 4's checkpoint (torchrun, two
    ranks): every rank stops with one line naming the checkpoint, step 2 stays the latest and
    loads; resumed (here in one process: checkpoints are keyed by parameter name), the run ends
    with the uninterrupted run's weights."""
    common = [*TINY, *RUN, f"run.out_dir={tmp_path}", "run.name=full"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        DRILL, "1:4:full-disk", *sets(*common, "pipeline.stages=2"),
    ]  # fmt: skip
    result = launch(command)
    run_dir = tmp_path / "full"
    assert result.returncode != 0
    errors = [x for x in result.stderr.splitlines() if "could not write checkpoint" in x]
    assert errors, result.stderr[-4000:]
    for line in errors:
        assert "step_00000004.partial" in line and "No space left on device" in line, line
        assert "step_00000002 is intact" in line, line
    assert Checkpointer(run_dir / "checkpoints").latest().name == "step_00000002"
    load_run_weights(run_dir)  # the previous checkpoint loads
    assert cli.main(["train", "--resume", *sets(*common)]) == 0  # space freed
    assert read_attempts(run_dir)[-1]["removed_partial"] == ["step_00000004.partial"]
    assert_same_weights(uninterrupted, run_dir)


# ------------------------------------------------------------------ storage faults, one process


def error_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("mpc-dist: error")]


def test_full_disk_while_writing_metrics_keeps_the_last_checkpoint(tmp_path, uninterrupted, capsys):
    run_dir = tmp_path / "metrics"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # its first line comes at step 8
    arguments = ["train", *sets(*TINY, *RUN, f"run.out_dir={tmp_path}", "run.name=metrics")]
    assert cli.main(arguments) == 2
    (line,) = error_lines(capsys)
    assert f"could not write {run_dir / 'metrics.jsonl'}" in line, line
    assert "No space left on device" in line and "step_00000006 is intact" in line, line
    (run_dir / "metrics.jsonl").unlink()  # space freed
    assert cli.main([*arguments, "--resume"]) == 0
    assert_same_weights(uninterrupted, run_dir)


def test_corrupt_checkpoint_is_named_and_skipped_only_when_asked(tmp_path, uninterrupted, capsys):
    common = [*TINY, *RUN, f"run.out_dir={tmp_path}", "run.name=corrupt"]
    assert cli.main(["train", *sets(*common, "train.max_steps=6")]) == 0  # steps 4 and 6 kept
    latest = Checkpointer(tmp_path / "corrupt" / "checkpoints").latest()
    shard = next(latest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size: only the CRC tells
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["train", "--resume", *sets(*common)]) == 2
    (line,) = error_lines(capsys)
    assert f"checkpoint file {shard} is corrupt" in line, line
    assert "run.resume_fallback=true to resume from step_00000004" in line, line
    assert cli.main(["train", "--resume", *sets(*common, "run.resume_fallback=true")]) == 0
    assert latest.with_name(latest.name + ".damaged").is_dir()  # kept aside, written anew
    assert [p.name for p in Checkpointer(latest.parent).all()] == [latest.name, "step_00000008"]
    assert_same_weights(uninterrupted, tmp_path / "corrupt")


# ------------------------------------------------------------------ a non-finite replica

T, SHAPE = 4, (1, 6, 6)
SPEC = ModelConfig(name="residual_mlp", num_blocks=T, width=8, hidden=12, head="aux")


def minibatches():
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(8, *SHAPE, dtype=torch.float64, generator=g),
            torch.randint(0, 5, (8,), generator=g),
        )
        for _ in range(3)
    ]


def nonfinite_optim(policy: str) -> OptimConfig:
    return OptimConfig("sgd", lr=0.05, momentum=0.9, on_nonfinite=policy)


def one_process(plan: Plan, optim: OptimConfig, trained: list[int]) -> dict[str, torch.Tensor]:
    """SGD with momentum on the minibatches ``trained``, in one process (4 microbatches each)."""
    model = build_model(SPEC, SHAPE, 5, seed=0).double()
    engine = HorizonEngine(model, plan, EngineOptions(track_memory=False))
    optimizer = build_optimizer(optim, model.parameters())
    for n, (x, y) in enumerate(minibatches()):
        if n in trained:
            for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
                engine.train_microbatch(xs, ys, loss_scale=1 / 4)
            optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters()}


def check_nonfinite_replica(rank: int, world: int, expected: dict[str, dict]) -> None:
    """P = 2 x D = 2, FSDP, async: replica 0's share of minibatch 1 holds a NaN. ``skip``: no
    replica steps on it and training goes on (one schedule of 3 minibatches); ``stop``: every
    rank raises. Either way every replica holds the weights of one process trained without it."""
    groups, plan = Groups.create(Topology(2, 2, rank)), Plan("receding", 2, T)
    replica = groups.topology.replica
    for policy in ("skip", "stop"):
        optim = nonfinite_optim(policy)
        stage = build_stage(
            model=build_model(SPEC, SHAPE, 5, device="meta"),
            plan=plan,
            ranges=stage_ranges([2, 2]),
            groups=groups,
            optim=optim,
            spec=SPEC,
            seed=0,
            runtime=RuntimeOptions(schedule=ScheduleSpec(2, "async"), dtype=torch.float64),
            sharding="fsdp",
        )
        batches = [(x[4 * replica :][:4].clone(), y[4 * replica :][:4]) for x, y in minibatches()]
        if replica == 0:
            batches[1][0][0, 0, 0, 0] = float("nan")
        if policy == "skip":
            stage.runtime.run(batches, [optim.lr] * 3)
        else:
            stage.runtime.run(batches[:1], [optim.lr])
            with pytest.raises(TrainingError, match="non-finite"):
                stage.runtime.run(batches[1:2], [optim.lr])
        for name, p in stage.model.named_parameters():
            case, full = f"{policy} {name}", p.full_tensor().detach()
            torch.testing.assert_close(
                full,
                expected[policy][name],
                rtol=0,
                atol=1e-9,
                msg=lambda m, case=case: f"{case}: {m}",
            )


@pytest.mark.multiprocess
def test_nonfinite_gradient_in_one_fsdp_replica_skips_or_stops_everywhere():
    plan = Plan("receding", 2, T)
    expected = {  # skip: minibatches 0 and 2 trained; stop: training ends after minibatch 0
        policy: one_process(plan, nonfinite_optim(policy), trained)
        for policy, trained in (("skip", [0, 2]), ("stop", [0]))
    }
    run(check_nonfinite_replica, 4, expected, timeout=300)


# ------------------------------------------------------------------ the parts, without processes


def test_flight_record_names_what_a_rank_waits_for(tmp_path):
    flight = FlightRecord(Topology(4, 2, rank=6))  # stage 2 of replica 1
    flight.note("training", step=6)
    flight.in_schedule = True
    flight.begin(Action(2, "F", minibatch=1, microbatch=3))
    assert flight.describe().startswith(
        "stage 2 of replica 1 runs the forward of microbatch 3 of step 8"
    )
    cotangent = Message(MessageKind.COTANGENT, 0, 3, 5)
    flight.waiting = Wait(cotangent, 3, False, 0.0)
    assert re.fullmatch(
        r"stage 2 of replica 1 waits \d+ s for the cotangent of stream 5 of "
        r"microbatch 3 of step 7 from stage 3",
        flight.describe(),
    )
    flight.waiting = Wait(Message(MessageKind.ACTIVATION, 0, 1, 0), 3, True, 0.0)
    assert (
        "waits" in flight.describe() and "for stage 3 to take the activation" in flight.describe()
    )
    for n in range(40):
        flight.begin(Action(2, "B", microbatch=n, stream=4))
    flight.waiting, flight.in_schedule = None, False
    flight.note("writing the checkpoint of step 8", 8)
    assert (
        flight.describe() == "stage 2 of replica 1: writing the checkpoint of step 8 (last "
        "action 2B0.39s4)"
    )
    path = flight.write(tmp_path / "failure", "stopped", "the failure")
    record = json.loads(path.read_text())
    assert path.name == "rank_6.json" and len(record["recent"]) == 32
    assert record["recent"][-1]["action"] == "2B0.39s4" and record["failure"] == "the failure"
    assert not list(path.parent.glob(".*tmp")), "the atomic write left its temporary file"


def test_the_watchdog_waits_for_a_message_as_long_as_the_message_groups_do(monkeypatch):
    """While blocks compile (train.compile=blocks) the message groups wait
    pipeline.collective_timeout; the watchdog must not call that wait a hang at
    pipeline.timeout."""
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    topology = Topology(2, 1, rank=1)
    watchdog, flight = Watchdog(topology, timeout_s=5), FlightRecord(topology)  # not started
    watchdog.watch(flight)
    since = time.time() - 60  # a message waited for a minute
    flight.waiting = Wait(Message(MessageKind.ACTIVATION, 0, 1, 0), 0, False, since)
    assert watchdog.overdue() and "(pipeline.timeout=5 s)" in watchdog._hang()
    watchdog.set_message_timeout(1800, "pipeline.collective_timeout")
    assert not watchdog.overdue()
    assert "(pipeline.collective_timeout=1800 s)" in watchdog._hang()
    watchdog.set_message_timeout(5)  # compiled: back to pipeline.timeout
    assert watchdog.overdue()
    del store


def test_a_restart_resumes_by_itself_and_a_first_attempt_does_not(tmp_path, monkeypatch):
    config = load_config(None, [*TINY, f"run.out_dir={tmp_path}", "run.name=r"])
    checkpoints = config.run_dir / "checkpoints"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert begin_attempt(config, resume=False)["resume_from"] is None  # died before any
    for name in ("step_00000002", "step_00000004", "step_00000006.partial"):
        (checkpoints / name).mkdir(parents=True)
    (config.run_dir / "failure").mkdir()
    record = begin_attempt(config, resume=False)
    assert record["resume_from"].endswith("step_00000004")
    assert record["removed_partial"] == ["step_00000006.partial"]
    assert (config.run_dir / "failure.1").is_dir() and not (config.run_dir / "failure").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        begin_attempt(config, resume=False)  # a new run over an old one's checkpoints
    assert begin_attempt(config, resume=True)["resume_from"].endswith("step_00000004")
    assert [a["restart"] for a in read_attempts(config.run_dir)] == [1, 1, 0]


def test_train_passes_max_restarts_to_torchrun(monkeypatch):
    commands = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli.subprocess, "call", lambda command, env: commands.append(command) or 0)
    arguments = ["train", "--nproc", "2", "--max-restarts", "3", *sets(*TINY, "pipeline.stages=2")]
    assert cli.main(arguments) == 0
    assert "--max-restarts=3" in commands[0] and "--nproc-per-node=2" in commands[0]
