"""Bad input fails in one line naming the field and the fix, before any training starts."""

from pathlib import Path

import pytest
from data_helpers import exported

from mpc_dist.cli import main
from mpc_dist.config import ConfigError, load_config
from mpc_dist.data import DISK_DATASETS
from mpc_dist.train import validate_config


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("horizon:\n  horizon: 3\ndata:\n  batch_size: 64\noptim:\n  lr: 1\n")
    config = load_config(path, ["horizon.rule=shrinking", "data.root=/tmp/x"])
    assert (config.horizon.horizon, config.horizon.rule) == (3, "shrinking")
    assert config.data.batch_size == 64 and config.data.root == "/tmp/x"
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.model.name == "residual_mlp"  # default kept
    assert load_config(None, []).to_dict() == load_config(None, []).to_dict()


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["bogus.key=1"], "bogus"),
        (["model.colour=red"], "model.colour"),
        (["horizon.horizon=two"], "horizon.horizon"),
        (["horizon"], "--set horizon"),
    ],
)
def test_unknown_or_mistyped_keys(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["horizon.horizon=0"], "horizon.horizon=0"),
        (["horizon.horizon=9"], "horizon.horizon=9"),
        (["model.name=resnet50", "horizon.horizon=17"], "horizon.horizon=17"),
        (["horizon.rule=greedy"], "horizon.rule"),
        (["model.name=mlp"], "model.name"),
        (["data.dataset=imagenet"], "data.dataset"),
        (["data.batch_size=100", "data.num_microbatches=3"], "data.batch_size=100"),
        (["optim.lr=-1"], "optim.lr"),
        (["pipeline.stages=4", "pipeline.mode=async", "horizon.horizon=2"], "pipeline.mode=async"),
        (["pipeline.stages=9"], "pipeline.stages=9"),
        (["pipeline.stages=2", "pipeline.blocks_per_stage=[5, 2]"], "pipeline.blocks_per_stage"),
        (["pipeline.replicas=3"], "data.batch_size=128"),
        (["pipeline.schedule=gpipe"], "pipeline.schedule=gpipe"),
        (["pipeline.backend=nccl", "train.device=cpu"], "pipeline.backend=nccl"),
        (["ray.placement=STRICT_SPREAD"], "ray.placement"),
        (["pipeline.sharding=zero1"], "pipeline.sharding=zero1"),
        (["horizon.horizon=auto", "horizon.objective=cheap"], "horizon.objective"),
        (["horizon.horizon=auto", "horizon.objective=memory"], "horizon.memory_budget_mib"),
        (
            ["horizon.horizon=auto", "horizon.reselect_every=1", "pipeline.stages=2"],
            "horizon.reselect_every",
        ),
        (["pipeline.stages=2", "pipeline.sharding=fsdp", "horizon.horizon=2"], "model.head=aux"),
        (["train.precision=bf16-mixed", "train.dtype=float64"], "train.dtype=float32"),
        (
            [
                "pipeline.stages=2",
                "pipeline.mode=async",
                "model.head=aux",
                "train.precision=fp16-mixed",
            ],
            "train.precision=fp16-mixed",
        ),
    ],
)
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(load_config(None, overrides))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["horizon.horizon=0"], "horizon.horizon=0: must be in [1, 8]"),
        (["model.name=resnet18"], "model.head=shared"),  # widths change: needs aux heads
        (["data.dataset=cifar10", "data.root=RUNDIR/none"], "data.root"),
        (["data.batch_size=10", "data.num_microbatches=4"], "data.num_microbatches=4"),
    ],
)
def test_cli_exits_nonzero_with_one_line_before_training(tmp_path, capsys, overrides, message):
    overrides = [o.replace("RUNDIR", str(tmp_path)) for o in overrides]
    args = ["train", "--set", f"run.out_dir={tmp_path}/runs", "--set", "run.progress=false"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists(), "nothing may start before the config is valid"


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    if config.data.dataset in DISK_DATASETS:  # its images are elsewhere: a few exported here
        config.data.root = str(exported(config.data.dataset))
    validate_config(config)
