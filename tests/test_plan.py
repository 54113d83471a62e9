"""Plans are plain data: checked against the spec's section 2 without any model."""

import pytest

from mpc_dist.cli import main
from mpc_dist.core import Plan

SPEC_RECEDING_T4_H2 = """\
block   l2  l3  l4
    0    W
    1    ·   W
    2        ·   W
    3            W"""

SPEC_SHRINKING_T4_H2 = """\
block   l2  l4
    0    W
    1    W
    2        W
    3        W"""


def test_plan_tables_match_the_spec():
    assert str(Plan("receding", 2, 4)).split("\n", 1)[1] == SPEC_RECEDING_T4_H2
    assert str(Plan("shrinking", 2, 4)).split("\n", 1)[1] == SPEC_SHRINKING_T4_H2


def test_cli_plan_prints_the_spec_table(capsys):
    assert main(["plan", "--blocks", "4", "--horizon", "2", "--rule", "receding"]) == 0
    assert SPEC_RECEDING_T4_H2 in capsys.readouterr().out


@pytest.mark.parametrize("rule", ["receding", "shrinking"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_every_block_has_exactly_one_gradient_source(rule, T):
    for h in range(1, T + 1):
        plan = Plan(rule, h, T)
        for t in range(T):
            owners = [s for s in plan.streams if t in s.weight_blocks]
            assert len(owners) == 1
            assert owners[0].passes(t)


@pytest.mark.parametrize("T", [1, 4, 7])
def test_receding_is_the_papers_g_h(T):
    for h in range(1, T + 1):
        plan = Plan("receding", h, T)
        for t in range(T):
            assert plan.trainer_of(t).loss_point == min(t + h, T)
        for boundary in range(1, T):
            assert len(plan.crossing(boundary)) <= h - 1
        assert all(s.loss_point - s.low == h for s in plan.streams)


def test_end_points():
    T = 6
    bp = Plan("receding", T, T)
    assert [(s.loss_point, s.low) for s in bp.streams] == [(T, 0)]
    assert Plan("shrinking", T, T).streams == bp.streams
    assert Plan("receding", 1, T).streams == Plan("shrinking", 1, T).streams
    assert not any(Plan("receding", 1, T).crossing(b) for b in range(1, T))


def test_shrinking_groups():
    plan = Plan("shrinking", 3, 8)
    assert [s.weight_blocks for s in plan.streams] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert plan.loss_points == (3, 6, 8)


def test_input_gradient_products_match_the_cost_model():
    # Receding: h-1 products per block and microbatch in the steady state; BP: one per block.
    T = 8
    assert Plan("receding", T, T).input_gradient_products == T - 1
    assert Plan("receding", 2, T).input_gradient_products == T - 1
    assert Plan("receding", 1, T).input_gradient_products == 0
    assert Plan("receding", 3, T).input_gradient_products > T - 1


@pytest.mark.parametrize("args", [("receding", 0, 4), ("receding", 5, 4), ("greedy", 1, 4)])
def test_bad_plans_are_rejected(args):
    with pytest.raises(ValueError, match=r"horizon\.(horizon|rule)"):
        Plan(*args)
