"""Bring your own model, timm ViTs, the meta-device build, pretrained weights and LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from processes import run
from safetensors.torch import save_file

from mpc_dist.config import ConfigError, LoraConfig, ModelConfig, OptimConfig, load_config
from mpc_dist.core import EngineOptions, HorizonEngine, Plan
from mpc_dist.models import build_model, instantiate, load_weights
from mpc_dist.parallel import (
    Groups,
    RuntimeOptions,
    ScheduleSpec,
    Topology,
    stage_ranges,
    uniform_partition,
)
from mpc_dist.train import build_optimizer, build_stage, train

SHAPE = (1, 28, 28)
OWN = ModelConfig(name="own_model:build", num_blocks=4, width=16, head="aux")
TIMM = ModelConfig(
    name="timm/vit_tiny_patch16_224",
    image_size=32,
    head="aux",
    kwargs={"depth": 4, "embed_dim": 16, "num_heads": 2},
)
LORA = LoraConfig(rank=2, alpha=4, targets=["qkv"])
MIXER = ModelConfig(
    name="local_mixer",
    num_blocks=4,
    width=8,
    hidden=8,
    patch_size=14,
    head="aux",
    kwargs={"groups": 2},
)


def meta(spec: ModelConfig):
    return build_model(spec, SHAPE, 10, device="meta")


@pytest.mark.parametrize("spec", [OWN, TIMM, MIXER], ids=["own", "timm", "local_mixer"])
def test_initialisation_does_not_depend_on_the_stage_layout(spec):
    whole = instantiate(meta(spec), "cpu", torch.float64, seed=5)
    expected = dict(whole.state_dict())
    for P in (2, 4):
        for first, last in stage_ranges(uniform_partition(whole.num_blocks, P)):
            part = instantiate(meta(spec).split(first, last), "cpu", torch.float64, seed=5)
            for name, value in part.state_dict().items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    other = instantiate(meta(spec), "cpu", torch.float64, seed=6).state_dict()
    assert any(not torch.equal(other[name], value) for name, value in expected.items())


def check_pipeline_equals_one_process(rank: int, world: int, spec: ModelConfig) -> None:
    """P = 2: each rank allocates only its stage; after 3 Adam steps it holds the weights one
    process has (float64)."""
    groups = Groups.create(Topology(2, 1, rank))
    plan, m, optim = Plan("receding", 2, 4), 2, OptimConfig("adam", lr=0.01)
    g = torch.Generator().manual_seed(3)
    data = [
        (
            torch.randn(8, *SHAPE, dtype=torch.float64, generator=g),
            torch.randint(0, 10, (8,), generator=g),
        )
        for _ in range(3)
    ]
    single = instantiate(meta(spec), "cpu", torch.float64, seed=1, lora=spec.lora)
    optimizer = build_optimizer(optim, single.parameters())
    engine = HorizonEngine(single, plan, EngineOptions(track_memory=False))
    for x, y in data:
        for xs, ys in zip(x.chunk(m), y.chunk(m), strict=True):
            engine.train_microbatch(xs, ys, 1 / m)
        optimizer.step()
        optimizer.zero_grad()
    options = RuntimeOptions(schedule=ScheduleSpec(m, "async"), dtype=torch.float64)
    stage = build_stage(
        model=meta(spec),
        plan=plan,
        ranges=stage_ranges([2, 2]),
        groups=groups,
        optim=optim,
        runtime=options,
        spec=spec,
        seed=1,
    )
    assert sum(p.numel() for p in stage.model.parameters()) < sum(
        p.numel() for p in single.parameters()
    )
    stage.runtime.run(data, [0.01] * 3)
    expected = dict(single.named_parameters())
    for name, p in stage.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize(
    "spec",
    [OWN, TIMM, dataclasses.replace(TIMM, lora=LORA), MIXER],
    ids=["own", "timm", "timm-lora", "local_mixer"],
)
def test_own_and_timm_models_train_through_a_pipeline_as_in_one_process(spec):
    run(check_pipeline_equals_one_process, 2, spec, timeout=240)


def test_local_mixer_is_the_papers_network():
    """M/1/16 (Table 2): one 784-pixel patch, 512 channels in 16 groups, 429K parameters with
    the paper's separate final classifier (ours: the last block's head predicts, 424K)."""
    spec = ModelConfig(
        name="local_mixer",
        num_blocks=1,
        width=512,
        hidden=512,
        patch_size=28,
        head="aux",
        kwargs={"groups": 16},
    )
    model = meta(spec)
    assert model.state_shapes == [(1, 784), (1, 16, 32)]
    assert sum(p.numel() for p in model.parameters()) + 512 * 10 + 10 == 429_076
    block = instantiate(meta(MIXER), "cpu", torch.float64, seed=0).blocks["1"]
    x = torch.randn(3, 4, 2, 4, dtype=torch.float64)
    a = F.layer_norm(x.flatten(2), (8,))
    tokens = F.relu(F.layer_norm(block.tokens.linear.mix(a.transpose(1, 2)).transpose(1, 2), (8,)))
    channels = F.relu(F.layer_norm(block.channels.linear(F.layer_norm(tokens, (8,))), (8,)))
    g = F.layer_norm(channels.reshape(3, 4, 2, 4), (4,))
    w, b = block.grouped.linear.weight, block.grouped.linear.bias
    grouped = torch.stack([g[:, :, k] @ w[k] + b[k] for k in range(2)], dim=2)
    torch.testing.assert_close(block(x), F.relu(F.layer_norm(grouped, (4,)) + x))


def test_timm_weights_load_by_their_own_names(tmp_path):
    import timm

    torch.manual_seed(0)
    reference = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        in_chans=1,
        img_size=32,
        **TIMM.kwargs,
    ).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    spec = dataclasses.replace(TIMM, weights=str(path), head="shared")
    model = instantiate(meta(spec), "cpu", torch.float32, seed=0, weights=spec.weights).eval()
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(model(x), reference(x))  # our split model is timm's model
    part = instantiate(meta(spec).split(2, 4), "cpu", torch.float32, seed=0)
    loaded = load_weights(part, path)["loaded"]
    assert sorted(loaded) == sorted(part.state_dict()) and not any("stem" in n for n in loaded)


def test_torchvision_weights_load_by_their_own_names(tmp_path):
    from torchvision.models import resnet18

    reference = resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    spec = ModelConfig(name="resnet18", head="aux", weights=str(path))
    model = instantiate(
        build_model(spec, (3, 224, 224), 10, device="meta"),
        "cpu",
        torch.float32,
        seed=0,
        weights=spec.weights,
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(model(x), reference(x))
    wrong = ModelConfig(
        name="vit_tiny",
        weights=str(path),
        num_blocks=2,
        width=16,
        hidden=16,
        num_heads=2,
        patch_size=7,
    )
    with pytest.raises(ConfigError, match="model.weights=.*lacks"):
        instantiate(meta(wrong), "cpu", torch.float32, seed=0, weights=wrong.weights)


def test_lora_trains_adapters_and_heads_and_leaves_base_weights_unchanged(tmp_path):
    config = load_config(
        None,
        [
            f"model.name={TIMM.name}",
            "model.image_size=32",
            "model.head=aux",
            "model.kwargs={depth: 4, embed_dim: 16, num_heads: 2}",
            "model.lora={rank: 2, alpha: 4, targets: [qkv]}",
            "horizon.horizon=2",
            "data.dataset=synthetic",
            "data.synthetic_size=256",
            "data.batch_size=32",
            "train.max_steps=4",
            "optim.lr=0.01",
            "optim.weight_decay=0.1",
            f"run.out_dir={tmp_path}",
            "run.progress=false",
            "run.tensorboard=false",
            "run.plot=false",
        ],
    )
    train(config)
    from mpc_dist.train import load_run_weights

    trained = load_run_weights(config.run_dir)
    initial = instantiate(meta(TIMM), "cpu", torch.float32, seed=config.train.seed).state_dict()
    frozen = 0
    for name, value in trained.items():
        base = name.replace(".base_layer.", ".")
        if "lora_" in name or name.startswith(("head.", "aux_heads.")):
            continue
        torch.testing.assert_close(value, initial[base], rtol=0, atol=0, msg=name)  # bitwise
        frozen += 1
    assert frozen > 20
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "every adapter learned"


def test_unknown_builder_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="model.name=nowhere:build: cannot import"):
        meta(ModelConfig(name="nowhere:build"))
    with pytest.raises(ConfigError, match="model.name=timm/vit_nonexistent"):
        meta(ModelConfig(name="timm/vit_nonexistent"))


def test_dry_run_of_vit_l16_on_8_stages_prints_the_stage_map(capsys):
    from mpc_dist.cli import main

    assert main(["train", "--config", "configs/vit_l16_cifar100.yaml", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "vit_l_16: 24 blocks" in err and "8 stages" in err
    rows = [line.split("│")[1:-1] for line in err.splitlines() if line.startswith("│")]
    assert len(rows) == 8
    params = sum(float(r[2]) for r in rows)
    assert 300 < params < 310, params  # ViT-L/16: 304M parameters
    assert all(float(r[-1]) > 0 for r in rows)


def test_dry_run_memory_falls_with_checkpointing_and_sharding():
    from mpc_dist.train.dry_run import dry_run

    base = ["pipeline.replicas=2", "data.batch_size=512", "model.head=aux"]
    config = load_config("configs/vit_l16_cifar100.yaml", base)
    plain = dry_run(config)
    lean = dry_run(
        load_config(
            "configs/vit_l16_cifar100.yaml",
            [*base, "pipeline.sharding=fsdp", "train.activation_checkpointing=blocks"],
        )
    )
    for a, b in zip(plain, lean, strict=True):
        assert b["activations_held_bytes"] < a["activations_held_bytes"]
        assert b["optimizer_bytes"] * 2 == a["optimizer_bytes"]
        assert b["memory_bytes"] < a["memory_bytes"]
