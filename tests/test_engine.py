"""The engine equals the reference definition (spec section 2) for every h, rule and model."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MODELS, grads, make_batch, make_model
from helpers import engine_grads as horizon_grads

from mpc_dist.config import ModelConfig
from mpc_dist.core import HorizonEngine, Plan, reference_gradients
from mpc_dist.models import build_model


def engine_grads(model, plan, x, y, num_microbatches=1):
    return horizon_grads(model, HorizonEngine(model, plan), x, y, num_microbatches)


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rule", ["receding", "shrinking"])
def test_engine_equals_reference_for_every_horizon(name, rule):
    model = make_model(name)
    x, y = make_batch()
    T = model.num_blocks
    for h in range(1, T + 1):
        plan = Plan(rule, h, T)
        assert_same(engine_grads(model, plan, x, y), reference_gradients(model, plan, x, y))


@pytest.mark.parametrize("name", ["residual_mlp", "vit_tiny", "resnet18_aux"])
def test_full_horizon_is_backpropagation(name):
    model = make_model(name)
    x, y = make_batch()
    T = model.num_blocks
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    expected = grads(model)
    # aux heads are not part of back-propagation: an h = T plan never evaluates them
    assert_same(engine_grads(model, Plan("receding", T, T), x, y), expected)


@pytest.mark.parametrize("name", ["residual_mlp", "residual_mlp_aux"])
def test_horizon_one_is_block_local_learning(name):
    model = make_model(name)
    x, y = make_batch()
    T = model.num_blocks
    model.zero_grad(set_to_none=True)
    state = x
    for t in range(T):
        out = model.block_forward(t, state.detach())
        head, trainable = model.loss_head(t + 1)
        if trainable:
            F.cross_entropy(head(out), y).backward()
        else:  # a shared head below T is read-only
            params = model.block_parameters(t)
            local = torch.autograd.grad(F.cross_entropy(head(out), y), params)
            for p, g in zip(params, local, strict=True):
                p.grad = g if p.grad is None else p.grad + g
        state = out
    expected = grads(model)
    assert_same(engine_grads(model, Plan("receding", 1, T), x, y), expected)


def test_aux_heads_get_exactly_their_local_gradient():
    model = make_model("residual_mlp_aux")
    x, y = make_batch()
    T = model.num_blocks
    plan = Plan("receding", 2, T)
    got = engine_grads(model, plan, x, y)
    with torch.no_grad():
        states = [x]
        for t in range(T):
            states.append(model.block_forward(t, states[-1]))
    for s in range(1, T):
        head = model.aux_heads[str(s)]
        names = [f"aux_heads.{s}.{n}" for n, _ in head.named_parameters()]
        if s not in plan.loss_points:
            assert not any(n in got for n in names), f"aux head {s} has no loss in this plan"
            continue
        local = torch.autograd.grad(F.cross_entropy(head(states[s]), y), list(head.parameters()))
        for n, g in zip(names, local, strict=True):
            torch.testing.assert_close(got[n], g)


def test_shared_head_learns_from_the_final_loss_only():
    model = make_model("residual_mlp")
    x, y = make_batch()
    T = model.num_blocks
    got = engine_grads(model, Plan("receding", 2, T), x, y)
    with torch.no_grad():
        final_state = x
        for t in range(T):
            final_state = model.block_forward(t, final_state)
    head_params = list(model.head.parameters())
    expected = torch.autograd.grad(F.cross_entropy(model.head(final_state), y), head_params)
    for (n, _), g in zip(model.head.named_parameters(), expected, strict=True):
        torch.testing.assert_close(got[f"head.{n}"], g)


@pytest.mark.parametrize("rule,h", [("receding", 2), ("receding", 3), ("shrinking", 2)])
def test_microbatches_accumulate_to_the_minibatch_gradient(rule, h):
    model = make_model("residual_mlp")
    x, y = make_batch(n=12)
    plan = Plan(rule, h, model.num_blocks)
    assert_same(
        engine_grads(model, plan, x, y, num_microbatches=4), engine_grads(model, plan, x, y)
    )


@pytest.mark.parametrize(
    "rule,h", [("receding", 1), ("receding", 2), ("receding", 4), ("shrinking", 3)]
)
@pytest.mark.parametrize("cut", [1, 3])
def test_engines_over_split_runs_chain_to_the_whole(rule, h, cut):
    """Two stages, wired by hand the way the pipeline runtime wires them, equal one engine."""
    model = make_model("residual_mlp")
    x, y = make_batch()
    T = model.num_blocks
    plan = Plan(rule, h, T)
    expected = engine_grads(model, plan, x, y)
    model.zero_grad(set_to_none=True)
    copy = plan.reads_shared_head_below_top(model.head_mode)
    lower = HorizonEngine(model.split(0, cut, copy), plan)
    upper = HorizonEngine(model.split(cut, T, copy), plan)
    crossing = {s.loss_point for s in plan.crossing(cut)}
    assert crossing == {s.loss_point for s in plan.part(0, cut).incoming}
    below = lower.forward(0, x, y, eager=False)
    above = upper.forward(0, below.output, y, eager=True)
    assert set(above.cotangents) == crossing
    for s, cotangent in above.cotangents.items():
        assert lower.backward(0, s, cotangent) is None
    for s in below.losses:  # streams born on the lower stage, run after the upper ones
        assert lower.backward(0, s) is None
    assert lower.outstanding == upper.outstanding == 0
    assert_same(grads(model), expected)


def test_peak_activation_memory_grows_with_the_horizon():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_blocks=8, width=64, hidden=128), (1, 8, 8), 10)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    peaks = {}
    for h in (1, 4, 8):
        engine = HorizonEngine(model, Plan("receding", h, 8))
        engine.train_microbatch(x, y)
        peaks[h] = engine.memory.peak_bytes
        assert engine.memory.current_bytes == 0, "all saved activations released after backward"
    assert 0 < peaks[1] < peaks[4] < peaks[8]


@pytest.mark.parametrize("name", ["residual_mlp", "vit_tiny", "resnet18_aux"])
def test_weight_pass_split_from_the_input_pass_computes_nothing_twice(name):
    """B then W equals one backward (float64), and costs the same floating-point operations."""
    from torch.utils.flop_counter import FlopCounterMode

    from mpc_dist.core.deferral import input_backward

    model = make_model(name)
    x, _ = make_batch()
    with torch.no_grad():
        state = model.block_forward(0, x)
    leaf = state.detach().requires_grad_()
    out = model.block_forward(1, leaf)
    cotangent = torch.randn_like(out)
    params = model.block_parameters(1)
    with FlopCounterMode(display=False) as whole:
        expected = torch.autograd.grad(out, [leaf, *params], cotangent, retain_graph=True)
    with FlopCounterMode(display=False) as split:
        grad, deferred = input_backward(out, cotangent, leaf, params)
        for p in params:
            p.grad = None
        deferred.run()
    torch.testing.assert_close(grad, expected[0], rtol=0, atol=0)
    for p, g in zip(params, expected[1:], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert split.get_total_flops() == whole.get_total_flops()


@pytest.mark.parametrize("rule", ["receding", "shrinking"])
def test_deferred_weight_gradients_equal_the_fused_ones(rule):
    model = make_model("residual_mlp_aux")
    x, y = make_batch()
    T = model.num_blocks
    for h in range(1, T + 1):
        plan = Plan(rule, h, T)
        expected = engine_grads(model, plan, x, y)
        model.zero_grad(set_to_none=True)
        engine = HorizonEngine(model, plan)
        losses = engine.forward(0, x, y, eager=False).losses
        for s in sorted(losses, reverse=True):
            engine.backward(0, s, defer_weights=True)
        assert engine.outstanding == 1, "graphs are kept until the weight pass"
        for s in losses:
            engine.weight_backward(0, s)
        assert engine.outstanding == 0
        assert_same(grads(model), expected)
