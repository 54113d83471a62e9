"""Schedules are data: generated, validated and simulated without any process."""

import dataclasses

import pytest

from mpc_dist.cli import main
from mpc_dist.core import Plan
from mpc_dist.parallel import (
    Action,
    Costs,
    ScheduleError,
    ScheduleSpec,
    balanced_partition,
    bubble_fraction,
    check_rendezvous,
    generate,
    simulate,
    stage_ranges,
    uniform_partition,
    validate_schedule,
)


def make(
    P, m, h=None, rule="receding", mode="sync", policy="horizon", blocks=None, n=2, defer=False
):
    blocks = blocks or P
    plan = Plan(rule, h or blocks, blocks)
    ranges = stage_ranges(uniform_partition(blocks, P))
    return generate(plan, ranges, ScheduleSpec(m, mode, policy, defer), n)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("rule", ["receding", "shrinking"])
def test_every_horizon_schedule_is_valid(P, mode, rule):
    for m in (1, 2, 3, 5, 8):
        for h in range(1, P + 1):
            validate_schedule(make(P, m, h, rule, mode))


@pytest.mark.parametrize("policy", ["1f1b", "gpipe"])
def test_backprop_schedules_are_valid_with_more_blocks_than_stages(policy):
    for P, blocks in ((2, 5), (3, 8), (4, 4)):
        for m in (1, 4, 7):
            validate_schedule(make(P, m, policy=policy, blocks=blocks))


@pytest.mark.parametrize("policy", ["1f1b", "gpipe"])
@pytest.mark.parametrize("P,m", [(2, 1), (4, 4), (4, 8), (8, 8), (8, 16)])
def test_bp_bubble_is_the_textbook_formula(policy, P, m):
    # Equal stage times: a weight-gradient product per block, no input gradient.
    schedule = make(P, m, policy=policy, n=1)
    events = simulate(schedule, Costs(forward=1, input_grad=0, weight_grad=2))
    assert bubble_fraction(events) == pytest.approx((P - 1) / (m + P - 1))


def test_full_horizon_equals_backprop_1f1b():
    for P, m in ((4, 4), (8, 8)):
        horizon = make(P, m, policy="horizon", n=1)
        bp = make(P, m, policy="1f1b", n=1)
        assert horizon.actions == [[dataclasses.replace(a) for a in stage] for stage in bp.actions]


def test_h1_sends_no_backward_message_and_streams_are_not_bundled():
    schedule = make(4, 4, h=1, mode="async")
    kinds = {a.kind for stage in schedule.actions for a in stage}
    assert "SB" not in kinds and "RB" not in kinds
    receding = make(4, 4, h=3)
    # stage 1 handles the streams of l3 and l4 of each microbatch as separate actions
    b_actions = [a for a in receding.actions[1] if a.kind == "B" and a.minibatch == 0]
    assert sorted(a.stream for a in b_actions if a.microbatch == 0) == [3, 4]
    # at most h - 1 streams cross any boundary per microbatch
    for k in range(1, 4):
        sent = [
            a
            for a in receding.actions[k]
            if a.kind == "SB" and (a.minibatch, a.microbatch) == (0, 0)
        ]
        assert len(sent) <= 2


def test_async_is_faster_than_sync_and_beats_1f1b_at_small_horizons():
    per_minibatch = {}
    for name, h, mode, policy in (
        ("bp", 8, "sync", "1f1b"),
        ("h1", 1, "async", "horizon"),
        ("h2", 2, "async", "horizon"),
        ("h2-sync", 2, "sync", "horizon"),
    ):
        events = validate_schedule(make(8, 8, h=h, mode=mode, policy=policy, n=4))
        per_minibatch[name] = max(e.end for e in events) / 4
    assert per_minibatch["h1"] < per_minibatch["h2"] < per_minibatch["bp"]
    assert per_minibatch["h2"] < per_minibatch["h2-sync"]
    # spec section 5: h = 1 async about 2.75x, h = 2 async about 1.69x faster than BP-1F1B
    assert per_minibatch["bp"] / per_minibatch["h1"] > 2.2
    assert per_minibatch["bp"] / per_minibatch["h2"] > 1.45


def test_validator_catches_broken_schedules():
    schedule = make(3, 2, h=2)
    broken = dataclasses.replace(schedule, actions=[list(a) for a in schedule.actions])
    broken.actions[1].remove(next(a for a in broken.actions[1] if a.kind == "B"))
    with pytest.raises(ScheduleError, match="incomplete"):
        validate_schedule(broken)
    swapped = dataclasses.replace(schedule, actions=[list(a) for a in schedule.actions])
    stage = swapped.actions[2]
    f = next(i for i, a in enumerate(stage) if a.kind == "F")
    b = next(i for i, a in enumerate(stage) if a.kind == "B")
    stage[f], stage[b] = stage[b], stage[f]
    with pytest.raises(ScheduleError, match="depends on"):
        validate_schedule(swapped)
    # a receive placed before the send it waits for, on both ends: deadlock
    deadlock = dataclasses.replace(schedule, actions=[list(a) for a in schedule.actions])
    stage = deadlock.actions[0]
    receive = stage.index(Action(0, "RB", 0, 0, 2))
    stage.insert(0, stage.pop(receive))  # stage 0 waits before its first forward
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(deadlock, Costs())


def test_cli_schedule_prints_a_grid(capsys):
    assert (
        main(
            [
                "schedule",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--horizon",
                "2",
                "--mode",
                "async",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stage 3:" in out and "B0.0s4" in out and "deadlock-free" in out


def test_partitions():
    assert uniform_partition(10, 4) == [3, 3, 2, 2]
    assert balanced_partition([1, 1, 1, 1, 4, 4], 3) == [4, 1, 1]
    assert balanced_partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert sum(balanced_partition([3, 1, 4, 1, 5, 9, 2, 6], 4)) == 8


def test_partition_methods_on_a_model():
    import torch

    from mpc_dist.config import ModelConfig, PipelineConfig
    from mpc_dist.models import build_model
    from mpc_dist.parallel import partition

    model = build_model(ModelConfig(name="resnet18", head="aux"), (1, 16, 16), 10)
    by_params = partition(PipelineConfig(stages=4, partition="params"), model)
    assert sum(by_params) == 8 and by_params[-1] < by_params[0]  # late ResNet blocks are wide
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    by_time = partition(
        PipelineConfig(stages=2, partition="time"), model, torch.randn(4, 1, 16, 16)
    )
    assert sum(by_time) == 8 and len(by_time) == 2
    for name, value in model.state_dict().items():  # profiled on copies: batch-norm untouched
        assert torch.equal(value, buffers[name]), name
    explicit = partition(PipelineConfig(stages=2, blocks_per_stage=[5, 3]), model)
    assert explicit == [5, 3]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("rule", ["receding", "shrinking"])
def test_every_schedule_completes_under_rendezvous_sends(mode, rule):
    """NCCL: a send completes only with its receive, a communicator runs a rank's operations in
    order. With one communicator per direction every schedule of the grid completes."""
    for P in (2, 3, 4, 6, 8):
        for m in (1, 2, 3, 8):
            for h in range(1, P + 1):
                check_rendezvous(make(P, m, h, rule, mode))
    for policy in ("1f1b", "gpipe"):
        check_rendezvous(make(4, 8, policy=policy, mode=mode))


def test_one_communicator_for_both_directions_would_deadlock():
    # what plain isend/irecv between the same neighbours do under NCCL: receives posted ahead
    # of a send block it (the hazard the per-direction groups remove)
    with pytest.raises(ScheduleError, match="deadlock under rendezvous"):
        check_rendezvous(make(2, 1, h=2), split=False)
    check_rendezvous(make(2, 1, h=2), split=True)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("rule", ["receding", "shrinking"])
def test_deferred_weight_schedules_are_valid_and_complete_under_rendezvous(mode, rule):
    for P in (2, 3, 4, 6):
        for m in (1, 3, 8):
            for h in range(1, P + 1):
                schedule = make(P, m, h, rule, mode, defer=True)
                validate_schedule(schedule)
                check_rendezvous(schedule)
                kinds = [a.kind for a in schedule.compute(0)]
                assert kinds.count("W") >= m * schedule.num_minibatches


def test_deferred_weights_reach_zero_bubble_h1_at_equal_peak_memory():
    """F = B = W: back-propagation with deferred weight gradients takes 3m + P - 1 units (1F1B:
    about 3(m + P - 1); block 0 needs no input gradient), the zero-bubble paper's ZB-H1, holding
    at most as many microbatches on any stage as 1F1B does on its busiest."""
    from mpc_dist.parallel import held_microbatches

    costs = Costs(forward=1, input_grad=1, weight_grad=1)
    for P, m in ((4, 8), (8, 8), (8, 32)):
        plain, deferred = make(P, m, policy="1f1b", n=1), make(P, m, policy="1f1b", n=1, defer=True)
        assert max(e.end for e in simulate(plain, costs)) >= 3 * (m + P - 1) - 1
        assert max(e.end for e in simulate(deferred, costs)) == 3 * m + P - 1
        assert max(held_microbatches(deferred)) == max(held_microbatches(plain)) == P


def test_async_drain_between_windows_costs_under_one_percent():
    """Async schedules are made per window of pipeline.async_window minibatches and drain at its
    end (where checkpoints, evaluations and Ray reports happen on every rank alike). With F = B =
    W the fill and drain cost less than 1% of a window's time at the default window."""
    from mpc_dist.config import PipelineConfig
    from mpc_dist.parallel import steady_state

    window = PipelineConfig().async_window
    for P in (4, 8):
        for m in (P, 4 * P):
            for h in (1, 2, 4):
                schedule = make(P, m, h, mode="async", n=window)
                events = simulate(schedule, Costs())
                ends = [
                    [e.end for e in events if e.stage == k and e.action.kind == "S"]
                    for k in range(P)
                ]
                per_minibatch, _ = steady_state(ends, warmup=window // 4)
                overhead = max(e.end for e in events) / (window * per_minibatch) - 1
                assert overhead < 0.01, (P, m, h, overhead)
