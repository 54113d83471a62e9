"""The rules beyond the horizon: each equals a plain reference written from its paper (float64),
the pipeline equals one process, none sends a backward message (PEPITA one top-down message per
microbatch), and each learns MNIST a little."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import engine_grads as gradients
from helpers import train_one_process
from launching import TINY, assert_same_weights, mpc_dist, sets
from processes import run

from mpc_dist.cli import main as cli_main
from mpc_dist.config import ConfigError, ModelConfig, OptimConfig, RulesConfig, load_config
from mpc_dist.core import EngineOptions, Plan
from mpc_dist.models import build_model
from mpc_dist.parallel import (
    Groups,
    RuntimeOptions,
    ScheduleSpec,
    Topology,
    check_rendezvous,
    generate,
    stage_ranges,
    uniform_partition,
    validate_schedule,
)
from mpc_dist.parallel.actions import peer
from mpc_dist.rules import make_engine, predict_by_average, predict_by_goodness
from mpc_dist.rules.common import draws
from mpc_dist.train import build_stage, learning_rate, load_dataset, train
from mpc_dist.train.validate import validate_config

SHAPE, CLASSES, T = (1, 8, 8), 5, 4
SPECS = {
    "ff": ModelConfig(name="relu_mlp", num_blocks=T, width=12),
    "forward_gradient": ModelConfig(name="relu_mlp", num_blocks=T, width=12, head="aux"),
    "sff": ModelConfig(name="resnet_small", num_blocks=T, width=4, head="goodness"),
    "pepita": ModelConfig(name="relu_mlp", num_blocks=T, width=12),
    # the papers' own networks at tiny sizes: LocalMixer (4 patches, 2 groups), PEPITA's
    # bias-free He-uniform MLP with its stabilisers (RULES below)
    "forward_gradient_mixer": ModelConfig(name="local_mixer", num_blocks=T, width=8, hidden=12,
                                          patch_size=4, head="aux", kwargs={"groups": 2}),
    "pepita_stabilised": ModelConfig(name="relu_mlp", num_blocks=T, width=12,
                                     kwargs={"init": "he_uniform", "bias": False}),
}  # fmt: skip
RULE_OF = {"forward_gradient_mixer": "forward_gradient", "pepita_stabilised": "pepita"}
OPTIONS = {"pepita_stabilised": RulesConfig(pepita_dropout=0.25, pepita_normalise=True),
           "ff": RulesConfig(ff_peer_normalisation=0.03, ff_straight_through=True)}  # fmt: skip


def make(case: str):
    return build_model(SPECS[case], SHAPE, CLASSES, seed=3).double()


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, dtype=torch.float64, generator=g)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def engine_grads(rule: str, model, x, y, seed: int = 0, options=None):
    options = EngineOptions(track_memory=False, seed=seed, rules=options)
    return gradients(model, make_engine(model, Plan(rule, 1, T), options), x, y)


def autograd_grads(model, losses):
    """Each local loss's gradient w.r.t. the parameters it reaches (the graphs are disjoint)."""
    out = {}
    named = dict(model.named_parameters())
    for loss in losses:
        params = {n: p for n, p in named.items() if p.requires_grad}
        got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), got, strict=True):
            if g is not None:
                out[n] = out.get(n, 0) + g
    return out


def length_normalised(z):
    return z / z.flatten(1).square().mean(1).add(1e-8).sqrt().view(-1, *[1] * (z.ndim - 1))


# ----------------------------------------------------------------------------- the papers


def ff_reference(model, x, y, seed=0, peer=0.0, straight=False, readout_scale=1.0):
    """Hinton 2022 as written: labels in the first K pixels, every layer's input detached and
    length-normalised, logistic loss on goodness = sum of squares against threshold = units
    (averaged over positive and negative data, as loeweX's BCE); with ``peer``, the squared gap
    between each unit's running mean activity on positive data (0.9 x 0.5 + 0.1 x this batch's
    mean) and the layer's mean, through the ReLU with ``straight``; the readout's gradient x
    ``readout_scale``."""
    wrong = (y + torch.randint(1, CLASSES, y.shape, generator=draws(seed, -1, 0))) % CLASSES

    def labelled(labels):
        flat = x.flatten(1).clone()
        flat[:, :CLASSES] = 1 / CLASSES if labels is None else F.one_hot(labels, CLASSES).double()
        return flat

    h = {k: labelled(v) for k, v in (("pos", y), ("neg", wrong), ("neutral", None))}
    losses = []
    for t in range(T):
        layer = model.blocks[str(t)][0]
        pre = {k: layer(length_normalised(v.detach())) for k, v in h.items()}
        h = {k: F.relu(v) for k, v in pre.items()}
        units = h["pos"].shape[1]
        loss = (
            F.softplus(units - h["pos"].square().sum(1)).sum()
            + F.softplus(h["neg"].square().sum(1) - units).sum()
        ) / (2 * len(y))
        if peer:
            pos = pre["pos"] + (h["pos"] - pre["pos"]).detach() if straight else h["pos"]
            running = 0.9 * 0.5 + 0.1 * pos.mean(0)
            loss = loss + peer * (running.mean() - running).square().mean()
        losses.append(loss)
    readout = model.head(length_normalised(h["neutral"].detach()))
    losses.append(readout_scale * F.cross_entropy(readout, y))
    return autograd_grads(model, losses)


def sff_reference(model, x, y):
    """Krutsylo 2025: BP inside each block and its 1x1-conv goodness head (a class's goodness is
    the mean square of its channel, classes compete by cross-entropy), the next block sees the
    layer-normalised, detached output."""
    losses, z = [], x
    for t in range(T):
        inp = z.detach() if t == 0 else F.layer_norm(z.detach(), z.shape[1:])
        z = model.blocks[str(t)](model.stem(inp) if t == 0 else inp)
        conv = (model.head if t == T - 1 else model.aux_heads[str(t + 1)]).conv
        goodness = conv(z).square().mean(dim=(2, 3))
        losses.append(F.cross_entropy(goodness, y))
    return autograd_grads(model, losses)


def fg_reference(model, x, y, seed=0):
    """Ren et al. 2022, FG-A with local losses: per layer, the per-sample directional derivative
    of the block's loss along the activity noise u (ReLU-masked), times u, outer x; heads exact.
    The directional derivative here comes from reverse mode: sum_l <dL_i/dz_l, u_l>."""
    grads, h = {}, x.flatten(1)
    for t in range(T):
        layer = model.blocks[str(t)][0]
        head = model.head if t == T - 1 else model.aux_heads[str(t + 1)]
        inp = h.detach()
        z = layer(inp)
        u = torch.randn(z.shape, generator=draws(seed, t, 0), dtype=z.dtype) * (z > 0)
        per_sample = F.cross_entropy(head(F.relu(z)), y, reduction="none")
        dz = torch.autograd.grad(per_sample.sum(), z)[0]  # row i: dL_i/dz_i
        d = (dz * u).sum(1)
        grad_z = d[:, None] * u / len(y)
        name = f"blocks.{t}.0"
        grads[f"{name}.weight"], grads[f"{name}.bias"] = grad_z.T @ inp, grad_z.sum(0)
        h = F.relu(z).detach()
        head_loss = F.cross_entropy(head(h), y)
        prefix = "head" if t == T - 1 else f"aux_heads.{t + 1}"
        for n, g in zip(
            ("weight", "bias"), torch.autograd.grad(head_loss, list(head.parameters())), strict=True
        ):
            grads[f"{prefix}.{n}"] = g
    return grads


def pepita_reference(model, x, y, seed=0, dropout=0.0, normalise=False, feedback=None):
    """Dellaferrera & Kreiman 2022, as in their code: pass 1, e = softmax - onehot; pass 2 on
    x + F e; dW_l = (h_l - h_l_err) h_{l-1}_err^T (x_err for the first), dW_L = e_err h_err^T;
    divided by the batch. F ~ U[-1, 1] 0.05 sqrt(6 / d_in) unless given. Srinivasan et al.'s
    stabilisers: dropout of hidden units with one mask for both passes, each hidden layer's
    output scaled to unit RMS."""
    d_in = x[0].numel()
    if feedback is None:
        uniform = torch.rand(d_in, CLASSES, generator=draws(seed, -2, 0), dtype=torch.float64)
        feedback = (2 * uniform - 1) * 0.05 * (6 / d_in) ** 0.5
    layers = [model.blocks[str(t)][0] for t in range(T)]
    masks = []
    for t in range(T):
        keep = torch.rand(len(x), 12, generator=draws(seed, t, 0), dtype=torch.float64) >= dropout
        masks.append(keep.double() / (1 - dropout))

    def hidden(t, a):
        h = F.relu(layers[t](a)) * masks[t]
        return h / h.square().mean(1, keepdim=True).add(1e-8).sqrt() if normalise else h

    with torch.no_grad():
        h = [x.flatten(1)]
        for t in range(T):
            h.append(hidden(t, h[-1]))
        e = model.head(h[-1]).softmax(-1) - F.one_hot(y, CLASSES)
        h_err = [x.flatten(1) + e @ feedback.T]
        for t in range(T):
            h_err.append(hidden(t, h_err[-1]))
        e_err = model.head(h_err[-1]).softmax(-1) - F.one_hot(y, CLASSES)
    grads, B = {}, len(y)
    for t in range(T):
        delta = h[t + 1] - h_err[t + 1]
        grads[f"blocks.{t}.0.weight"] = delta.T @ h_err[t] / B
        if layers[t].bias is not None:
            grads[f"blocks.{t}.0.bias"] = delta.sum(0) / B
    grads["head.weight"] = e_err.T @ h_err[T] / B
    if model.head.bias is not None:
        grads["head.bias"] = e_err.sum(0) / B
    return grads


def mixer_fg_reference(model, x, y, seed=0):
    """Ren et al. 2023, LG-FG-A on LocalMixer, written from the paper: noise u on every
    post-LayerNorm activation (masked where its ReLU is off); the local losses replicated per
    patch p and group g with stop-gradients (equations 4-5: loss (p, g) sees group g of patch p,
    every other group and patch stopped); each loss's directional derivative along u (here by
    reverse mode, at zero noise); a unit's estimate is the derivative of the losses it feeds
    times its noise (token mixing: all groups of its patch; channel mixing: its group; grouped:
    its own), through the LayerNorm back to its linear layer locally; heads exact."""

    def ln(a):
        return F.layer_norm(a, a.shape[-1:])

    def grouped(a):
        return ln(a.reshape(*a.shape[:-1], 2, -1))

    grads, state = {}, x
    for t in range(T):
        block = model.blocks[str(t)]
        head = model.head if t == T - 1 else model.aux_heads[str(t + 1)]
        prefix = "head" if t == T - 1 else f"aux_heads.{t + 1}"
        inp = state.detach()
        if t == 0:
            sites = [(block.channels, ln, False), (block.grouped, grouped, False)]
            first = model.stem(inp)
        else:
            sites = [(block.tokens, ln, False), (block.channels, ln, False),
                     (block.grouped, grouped, True)]  # fmt: skip
            first = inp.flatten(2)

        def run(noise, first=first, sites=sites, inp=inp):  # -> (sites' inputs, their ReLU
            ins, outs, a = [], [], first  # outputs, the block's output)
            for (site, prepare, residual), n in zip(sites, noise, strict=True):
                a = prepare(a)
                ins.append(a)
                z = site.norm(site.linear(a)) + n
                a = F.relu(z + inp if residual else z)
                outs.append(a)
            return ins, outs, a

        with torch.no_grad():
            ins, outs, out = run([0.0] * len(sites))
        generator = draws(seed, t, 0)
        noise = [
            torch.randn(o.shape, generator=generator, dtype=torch.float64) * (o > 0) for o in outs
        ]
        leaves = [torch.zeros_like(u, requires_grad=True) for u in noise]
        normed = ln(run(leaves)[2])
        P, G = normed.shape[1], normed.shape[2]
        directional = torch.zeros(len(y), P, G, dtype=torch.float64)
        stopped = normed.detach().mean(1)
        for p in range(P):
            for g in range(G):
                features = stopped.clone()  # every other group and patch stopped (eq. 4-5)
                own = normed[:, p, g] - normed.detach()[:, p, g]  # patch p's group g only
                features[:, g] = stopped[:, g] + own / P
                loss = F.cross_entropy(head.linear(features.flatten(1)), y, reduction="sum")
                per_sample = torch.autograd.grad(loss, leaves, retain_graph=True)
                pairs = zip(per_sample, noise, strict=True)
                directional[:, p, g] = sum((d * u).flatten(1).sum(1) for d, u in pairs)
        names = {"token": "tokens", "channel": "channels", "group": "grouped"}
        for (site, _, _), a, u in zip(sites, ins, noise, strict=True):
            if site.kind == "token":
                spread = directional.sum(2, keepdim=True)
            elif site.kind == "channel":
                spread = directional.repeat_interleave(u.shape[-1] // G, -1)
            else:
                spread = directional[..., None]
            params = dict(site.linear.named_parameters())
            got = torch.autograd.grad(
                site.norm(site.linear(a)), list(params.values()), spread * u / len(y)
            )
            for n, g_ in zip(params, got, strict=True):
                grads[f"blocks.{t}.{names[site.kind]}.linear.{n}"] = g_
        head_loss = F.cross_entropy(head(out), y)
        for n, g_ in zip(
            dict(head.named_parameters()),
            torch.autograd.grad(head_loss, list(head.parameters())),
            strict=True,
        ):
            grads[f"{prefix}.{n}"] = g_
        state = out
    return grads


REFERENCES = {
    "ff": ff_reference,
    "sff": sff_reference,
    "forward_gradient": fg_reference,
    "pepita": pepita_reference,
    "forward_gradient_mixer": mixer_fg_reference,
    "pepita_stabilised": partial(pepita_reference, dropout=0.25, normalise=True),
}


def test_forward_forward_with_peer_normalisation_equals_the_codes():
    """Hinton's and loeweX's peer normalisation, the straight-through ReLU, the readout's rate."""
    x, y = batch()
    options = RulesConfig(
        ff_peer_normalisation=0.03, ff_straight_through=True, ff_readout_lr_scale=10.0
    )
    got = engine_grads("ff", make("ff"), x, y, options=options)
    want = ff_reference(make("ff"), x, y, peer=0.03, straight=True, readout_scale=10.0)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    plain = ff_reference(make("ff"), x, y, peer=0.03)  # the gradient does stop at the ReLU
    assert not torch.allclose(plain["blocks.0.0.weight"], want["blocks.0.0.weight"])


@pytest.mark.parametrize("case", list(REFERENCES))
def test_engine_equals_the_papers_rule(case):
    x, y = batch()
    options = OPTIONS.get(case) if case != "ff" else None
    got = engine_grads(RULE_OF.get(case, case), make(case), x, y, options=options)
    want = REFERENCES[case](make(case), x, y)
    assert set(got) == set(want), set(got) ^ set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.slow
def test_forward_gradient_is_unbiased():
    """Averaged over many noise draws, the estimate approaches block-local back-propagation."""
    x, y = batch(16)
    exact = engine_grads("receding", make("forward_gradient"), x, y)  # h = 1: block-local BP
    model = make("forward_gradient")
    engine = make_engine(model, Plan("forward_gradient", 1, T), EngineOptions(track_memory=False))
    draws_ = 600  # cosines measured: 0.992 and 0.975 at 500 draws, 0.999 and 0.998 at 3000
    for _ in range(draws_):
        engine.train_microbatch(x, y, loss_scale=1 / draws_)
    for name in ("blocks.0.0.weight", "blocks.2.0.weight"):
        estimate, truth = dict(model.named_parameters())[name].grad, exact[name]
        cosine = F.cosine_similarity(estimate.flatten(), truth.flatten(), dim=0)
        assert cosine > 0.9, (name, float(cosine))


def test_pepita_weight_mirroring():
    """F = B_0 ... B_L at the fixed F's scale; each B_l moves towards its layer's mirror
    (-W_0^T below, W_l^T above), so F comes to point along -(W_L ... W_0)^T."""
    x, y = batch()
    options = RulesConfig(pepita_dropout=0.25, pepita_normalise=True, pepita_mirror_lr=0.5)
    model = make("pepita_stabilised")
    engine = make_engine(
        model, Plan("pepita", 1, T), EngineOptions(track_memory=False, rules=options)
    )
    layers = [model.blocks[str(t)][0] for t in range(T)] + [model.head]
    before = [layer.pepita_mirror.clone() for layer in layers]
    product = before[0]
    for b in before[1:]:
        product = product @ b
    scale = 0.05 * (6 / x[0].numel()) ** 0.5
    fixed = (
        2 * torch.rand(x[0].numel(), CLASSES, generator=draws(0, -2, 0), dtype=torch.float64) - 1
    ) * scale
    feedback = product * fixed.std() / product.std()
    engine.train_microbatch(x, y)
    want = pepita_reference(
        make("pepita_stabilised"), x, y, dropout=0.25, normalise=True, feedback=feedback
    )
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
    for i, (layer, b) in enumerate(zip(layers, before, strict=True)):
        noise = 0.1 * torch.randn(
            len(x), layer.in_features, generator=draws(0, -3, i), dtype=torch.float64
        )
        out = layer(noise).softmax(-1) if i == T else F.relu(layer(noise))
        mirror = (-1 if i == 0 else 1) * noise.T @ out / (len(x) * 0.01)
        torch.testing.assert_close(layer.pepita_mirror, 0.5 * b + 0.5 * mirror)
    big, _ = batch(512, seed=5)
    for _ in range(30):
        engine.train_microbatch(big, torch.zeros(512, dtype=torch.long), loss_scale=0.0)
    with torch.no_grad():
        total = layers[0].weight.T
        for layer in layers[1:]:
            total = total @ layer.weight.T
        cosine = F.cosine_similarity(engine._feedback().flatten(), -total.flatten(), dim=0)
    assert cosine > 0.5, float(cosine)  # random directions: about 0 +- 0.05


def test_rule_predictions_over_the_whole_model():
    x, _ = batch()
    ff = make("ff")
    assert predict_by_goodness(ff, x, CLASSES).shape == (6, CLASSES)
    sff = make("sff")
    votes = predict_by_average(sff.eval(), x)
    assert votes.shape == (6, CLASSES) and (votes >= 0).all()


# ----------------------------------------------------------------------------- the pipeline


RULES = ("ff", "sff", "forward_gradient", "pepita")


@pytest.mark.parametrize("rule", RULES)
def test_no_backward_messages(rule):
    """Every stage trains its blocks alone: schedules have forward messages only (and PEPITA's
    one top-down message per microbatch, from the last stage to the first)."""
    plan = Plan(rule, 1, 8)
    for mode in ("sync", "async"):
        schedule = generate(plan, stage_ranges([2, 2, 2, 2]), ScheduleSpec(4, mode), 3)
        validate_schedule(schedule)
        check_rendezvous(schedule)
        actions = [a for stage in schedule.actions for a in stage]
        kinds = {a.kind for a in actions}
        assert {"SF", "RF"} <= kinds and not kinds & {"SB", "RB"}
        top_down = [(a.stage, peer(a)) for a in actions if a.kind == "ST"]
        assert top_down == ([(3, 0)] * 4 * 3 if rule == "pepita" else [])


STEPS, M = 3, 2


def single_process(case: str, data):
    model = make(case)
    rule = RULE_OF.get(case, case)
    options = EngineOptions(track_memory=False, rules=OPTIONS.get(case))
    return train_one_process(model, make_engine(model, Plan(rule, 1, T), options), data, M)


def check_pipeline(rank: int, world: int, rules=tuple(REFERENCES)) -> None:
    data = [batch(8, seed=10 + n) for n in range(STEPS)]
    groups = Groups.create(Topology(world, 1, rank))
    ranges = stage_ranges(uniform_partition(T, world))
    for case in rules:
        want = single_process(case, data)
        rule = RULE_OF.get(case, case)
        for mode in ("sync", "async"):
            options = RuntimeOptions(schedule=ScheduleSpec(M, mode), dtype=torch.float64)
            stage = build_stage(
                model=make(case),
                plan=Plan(rule, 1, T),
                ranges=ranges,
                groups=groups,
                optim=OptimConfig("adam", lr=0.01),
                runtime=options,
                rules=OPTIONS.get(case),
            )
            if mode == "async":
                stage.runtime.run(data, [0.01] * STEPS)
            else:
                for b in data:
                    stage.runtime.run([b], [0.01])
            for name, p in stage.model.named_parameters():
                torch.testing.assert_close(p, want[name], msg=f"{case} {mode} {name}")


@pytest.mark.multiprocess
def test_pipeline_equals_single_process():
    run(check_pipeline, 2, timeout=300)


@pytest.mark.multiprocess
def test_pepita_top_down_message_crosses_four_stages():
    """The error goes from stage 3 straight to stage 0, past the stages between."""
    run(check_pipeline, 4, ("pepita", "pepita_stabilised"), timeout=300)


# ----------------------------------------------------------------------------- runs


LEARN = {
    "ff": ["model.name=relu_mlp", "model.width=256", "model.num_blocks=2"],
    "forward_gradient": ["model.name=relu_mlp", "model.width=256", "model.num_blocks=2",
                         "model.head=aux"],
    "sff": ["model.name=resnet_small", "model.width=8", "model.num_blocks=2",
            "model.head=goodness"],
    "pepita": ["model.name=relu_mlp", "model.width=256", "model.num_blocks=2", "optim.name=sgd",
               "optim.lr=0.01", "optim.schedule=constant"],
    "forward_gradient_mixer": ["model.name=local_mixer", "model.num_blocks=1", "model.width=64",
                               "model.hidden=64", "model.patch_size=28", "model.head=aux",
                               "model.kwargs={groups: 4}", "optim.name=sgd", "optim.lr=0.05"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LEARN))
def test_each_rule_learns_mnist(case, tmp_path):
    rule = RULE_OF.get(case, case)
    config = load_config(
        None,
        [
            *LEARN[case],
            f"horizon.rule={rule}",
            "horizon.horizon=1",
            "train.max_steps=100",
            "train.epochs=1",
            "data.batch_size=128",
            f"run.out_dir={tmp_path}",
            "run.progress=false",
            "run.tensorboard=false",
            "run.plot=false",
        ],
    )
    summary = train(config)
    assert summary["test accuracy"] > 0.4  # chance is 0.1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["horizon.rule=ff", "horizon.horizon=2"], "horizon.horizon=2"),
        (["horizon.rule=sff", "horizon.horizon=1", "model.head=aux"], "model.head=aux"),
        (["horizon.rule=forward_gradient", "horizon.horizon=1"], "model.head=shared"),
        (["horizon.rule=ff", "horizon.horizon=1", "pipeline.defer_weights=true"],
         "pipeline.defer_weights"),
        (["horizon.rule=forward_gradient", "horizon.horizon=1", "model.head=aux",
          "model.name=vit_tiny"], "outside linear layers"),
        (["horizon.rule=pepita", "horizon.horizon=1"], "model.name=relu_mlp"),
        (["horizon.rule=ff", "horizon.horizon=auto"], "horizon.horizon=auto"),
        (["horizon.rule=pepita", "horizon.horizon=1", "model.name=relu_mlp",
          "train.compile=blocks"], "train.compile=blocks"),
        (["horizon.rule=pepita", "horizon.horizon=1", "model.name=relu_mlp",
          "rules.pepita_mirror_lr=0.01", "pipeline.stages=2"], "rules.pepita_mirror_lr"),
        (["horizon.rule=pepita", "horizon.horizon=1", "model.name=relu_mlp",
          "rules.pepita_dropout=1.0"], "rules.pepita_dropout"),
        (["horizon.rule=ff", "horizon.horizon=1", "model.name=residual_mlp",
          "rules.ff_straight_through=true"], "rules.ff_straight_through"),
        (["model.name=relu_mlp", "model.kwargs={init: zeros}"], "model.kwargs"),
        (["model.name=local_mixer", "model.patch_size=5"], "model.patch_size=5"),
        (["model.name=local_mixer", "model.patch_size=7", "model.kwargs={groups: 3}"],
         "model.kwargs.groups=3"),
        (["optim.schedule=step", "optim.decay_at=[60, 90]"], "optim.decay_at"),
    ],
)  # fmt: skip
def test_bad_rule_configs_fail_in_one_line(overrides, field):
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        validate_config(config)
    assert "\n" not in str(error.value)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("config", "mode", "extra"),
    [("pepita_mnist", "async", []), ("ff_mnist", "sync", []),
     ("forward_gradient_mnist", "async", ["model.hidden=32", "model.patch_size=14"]),
     ("sff_mnist", "sync", [])],
)  # fmt: skip
def test_torchrun_pipeline_of_a_rule_matches_single_process(config, mode, extra, tmp_path):
    """`mpc-dist train --nproc 2`: every rule at its shipped recipe (PEPITA's top-down message
    and dropout, forward-forward's three states per sample and peer normalisation, LocalMixer's
    replicated losses) over real processes ends with one process's weights."""
    config = f"configs/{config}.yaml"
    tiny = [*TINY, "model.width=16", *extra, "data.num_microbatches=2", f"run.out_dir={tmp_path}"]
    assert cli_main(["train", "--config", config, *sets(*tiny, "run.name=single")]) == 0
    pipe = mpc_dist(
        "train",
        "--nproc",
        "2",
        "--config",
        config,
        *sets(
            *tiny,
            "pipeline.stages=2",
            f"pipeline.mode={mode}",
            "run.name=pipe",
        ),
    )
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    assert_same_weights(tmp_path / "single", tmp_path / "pipe")


@pytest.mark.parametrize("case", list(REFERENCES))
def test_held_activations_are_counted_until_the_update(case):
    """What a microbatch keeps between its forward and its update (autograd's graphs, or the
    tensors forward gradient and PEPITA keep themselves) is activation memory, then freed."""
    x, y = batch()
    rule = RULE_OF.get(case, case)
    engine = make_engine(make(case), Plan(rule, 1, T), EngineOptions(rules=OPTIONS.get(case)))
    result = engine.forward(0, x, y, eager=False)
    assert engine.memory.current_bytes > 0
    if rule == "pepita":
        engine.second_pass(0, result.top_down)
    else:
        for s in range(1, T + 1):
            engine.backward(0, s)
    assert engine.memory.current_bytes == 0 and engine.outstanding == 0


def test_the_recipes_schedules():
    """Forward-forward's (constant, then linear to zero over the second half) and PEPITA's
    (x 0.1 after 60 % and 90 % of training)."""
    halfway = OptimConfig("sgd", lr=1.0, schedule="halfway_linear")
    rates = [learning_rate(halfway, s, 100) for s in (0, 49, 50, 75, 99)]
    torch.testing.assert_close(rates, [1.0, 1.0, 1.0, 0.5, 0.02])
    step = OptimConfig("sgd", lr=1.0, schedule="step", decay_at=[0.6, 0.9], decay_factor=0.1)
    rates = [learning_rate(step, s, 100) for s in (0, 59, 60, 89, 90, 99)]
    torch.testing.assert_close(rates, [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_pixels_in_unit_range_for_pepita():
    """data.standardise=false gives the raw pixels PEPITA's codes feed (its F is scaled to them)."""
    raw = load_dataset("mnist", "test", standardise=False)
    assert raw.inputs.min() == 0 and raw.inputs.max() == 1
    torch.testing.assert_close(raw.inputs, load_dataset("mnist", "test").inputs * 0.3081 + 0.1307)


def test_paper_study_resumes_and_reports(tmp_path, capfd):
    """`rules-study --paper`: a run stopped part-way resumes from its checkpoint; a finished one
    is read back; the report (table, per-epoch accuracies, plot) replaces its block only. In
    this process: the command's own entry point, its messages read from stderr."""
    doc = tmp_path / "rules.md"
    doc.write_text(
        "# Rules\n\nbefore\n<!-- results: mpc-dist rules-study --paper -->\nold\n"
        "<!-- end of paper results -->\nafter\n"
    )
    out = str(tmp_path / "p")
    args = ["rules-study", "--paper", "--recipes", "pepita", "--recipe-epochs", "pepita=1",
            "--paper-out", out, "--doc", str(doc), "--checkpoint-every", "5"]  # fmt: skip

    def study(*extra: str) -> str:
        assert cli_main([*args, *extra]) == 0, capfd.readouterr().err[-3000:]
        return capfd.readouterr().err

    run_dir = tmp_path / "p" / "runs" / "pepita"
    study("--max-steps", "10")
    (run_dir / "result.json").unlink()  # as if stopped part-way
    assert "pepita: " not in study("--report-only").split("| run |")[0]  # trains nothing
    assert "(stopped at step 10)" in doc.read_text()
    assert "pepita: resuming" in study("--max-steps", "20")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]
    seconds = json.loads((run_dir / "train_seconds.json").read_text())
    assert len(seconds) == 2  # two sittings of one run
    third = study("--max-steps", "20")
    assert "pepita: " not in third.split("| run |")[0], "a finished run is read back"
    text = doc.read_text()
    assert text.startswith("# Rules\n\nbefore\n") and text.endswith("after\n")
    assert "| PEPITA, 1 x 1024 | 0 of 1 |" in text and "old" not in text
    assert (tmp_path / "figures" / "rules_paper_accuracy.png").exists()


@pytest.mark.slow
def test_rules_study_at_a_small_size(tmp_path):
    """The one command behind docs/rules.md: trains, measures, and rewrites only its results
    block of the document."""
    doc = tmp_path / "rules.md"
    doc.write_text(
        "# Rules\n\nnotes before\n<!-- results: mpc-dist rules-study -->\nold\n"
        "<!-- end of results -->\nnotes after\n"
    )
    result = mpc_dist(
        "rules-study",
        "--out",
        str(tmp_path / "study"),
        "--doc",
        str(doc),
        "--networks",
        "mlp",
        "--datasets",
        "mnist",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# Rules\n\nnotes before\n") and text.endswith("notes after\n")
    assert "old" not in text
    for label in ("ff", "forward_gradient", "pepita", "MPC h = 1", "back-propagation"):
        assert f"| mlp | {label} |" in text
    assert "| mlp | pepita | async |" in text and "| mlp | back-propagation | 1F1B |" in text


@pytest.mark.parametrize("rule", ["ff", "sff"])
def test_checkpointed_blocks_hold_less_until_the_update_and_give_the_same_gradients(rule):
    """A block-local rule that back-propagates inside a block keeps its graph from the forward
    to the update (a pipeline's B action); checkpointed, the block keeps its input only."""
    from mpc_dist.core import ComputeOptions

    x, y = batch()
    held, grads = {}, {}
    for checkpoint in (False, True):
        model = make(rule)
        options = EngineOptions(ComputeOptions(checkpoint_blocks=checkpoint))
        engine = make_engine(model, Plan(rule, 1, T), options)
        engine.forward(0, x, y, eager=False)
        held[checkpoint] = engine.memory.current_bytes
        for s in range(1, T + 1):
            engine.backward(0, s)
        grads[checkpoint] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert held[True] < held[False], held
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0, msg=name)


def test_ff_first_epoch_script_reports_both_predictions_and_skips_what_it_did(tmp_path):
    """scripts/ff_first_epoch.py (docs/rules.md), at 16 units for 3 steps."""
    command = [sys.executable, "scripts/ff_first_epoch.py", "--out", str(tmp_path), "--steps", "3",
               "tiny=model.width=16,optim.lr=0.0005"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (result,) = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["name"] == "tiny" and result["overrides"] == "model.width=16,optim.lr=0.0005"
    assert 0 <= result["readout_accuracy"] <= 1 and 0 <= result["goodness_accuracy"] <= 1
    ran = load_config(str(tmp_path / "runs" / "tiny" / "config.yaml"), [])
    assert (ran.model.width, ran.optim.lr, ran.train.max_steps) == (16, 0.0005, 3)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == "", again.stderr[-3000:]
