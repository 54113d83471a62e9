"""Single-process training end to end: learning, outputs, resume, NaN stop, damaged checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpc_dist.config import load_config
from mpc_dist.models import build_model
from mpc_dist.train import (
    Checkpointer,
    CheckpointError,
    TrainingError,
    build_optimizer,
    load_dataset,
    train,
)

SMALL = [
    "model.num_blocks=4", "model.width=32", "model.hidden=64",
    "horizon.horizon=2", "data.dataset=synthetic", "data.synthetic_size=512",
    "data.batch_size=64", "data.num_microbatches=2", "optim.lr=0.003",
    "run.progress=false", "run.tensorboard=false",
]  # fmt: skip


def small_config(tmp_path: Path, *extra: str):
    return load_config(None, [*SMALL, f"run.out_dir={tmp_path}", *extra])


def final_weights(config) -> dict[str, torch.Tensor]:
    data = load_dataset("synthetic", "train", None, config.data.synthetic_size, config.train.seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    optimizer = build_optimizer(config.optim, model.parameters())
    checkpointer = Checkpointer(config.run_dir / "checkpoints")
    checkpointer.load(checkpointer.latest(), model, optimizer)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_learns_and_writes_its_outputs(tmp_path):
    config = small_config(tmp_path, "train.epochs=3", "train.log_every=2", "run.name=a")
    summary = train(config)
    assert summary["test accuracy"] > 0.9
    run = config.run_dir
    assert load_config(run / "config.yaml").to_dict() == config.to_dict()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2, 3]
    assert {"loss", "accuracy", "samples_per_s", "lr"} <= set(records[0])
    assert (run / "plot.png").stat().st_size > 10_000
    assert len(list((run / "checkpoints").glob("step_*"))) == config.run.keep_checkpoints


@pytest.mark.parametrize("rule", ["receding", "shrinking"])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, rule):
    common = ["train.epochs=2", f"horizon.rule={rule}"]
    straight = small_config(tmp_path, *common, "run.name=straight")
    train(straight)
    # Stop mid-epoch (step 5 of 8 per epoch), then resume to the end.
    interrupted = small_config(tmp_path, *common, "run.name=resumed", "train.max_steps=5")
    train(interrupted)
    resumed = small_config(tmp_path, *common, "run.name=resumed")
    train(resumed, resume=True)
    expected, got = final_weights(straight), final_weights(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (resumed.run_dir / "metrics.jsonl").open()]
    assert steps == sorted(steps), "metrics of the redone steps are not duplicated"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(
        tmp_path,
        "optim.name=sgd",
        "optim.lr=1e12",
        "optim.schedule=constant",
        "run.checkpoint_every=1",
        "train.epochs=5",
        "run.name=nan",
    )
    with pytest.raises(TrainingError, match="non-finite loss") as error:
        train(config)
    checkpoints = Checkpointer(config.run_dir / "checkpoints")
    assert str(checkpoints.latest()) in str(error.value)
    weights = final_weights(config)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_truncated_checkpoint_gives_a_clear_error_on_resume(tmp_path):
    config = small_config(tmp_path, "train.max_steps=3", "run.name=trunc")
    train(config)
    latest = Checkpointer(config.run_dir / "checkpoints").latest()
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated or missing.*delete"):
        train(small_config(tmp_path, "run.name=trunc"), resume=True)


def test_existing_run_is_not_overwritten(tmp_path):
    train(small_config(tmp_path, "train.max_steps=2", "run.name=keep"))
    with pytest.raises(ValueError, match="--resume"):
        train(small_config(tmp_path, "train.max_steps=2", "run.name=keep"))


def test_console_script_trains(tmp_path):
    """The installed `mpc-dist` entry point, as a user runs it."""
    script = Path(sys.executable).with_name("mpc-dist")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mpc_dist.cli"]
    sets = [
        x
        for item in [*SMALL, f"run.out_dir={tmp_path}", "train.max_steps=4"]
        for x in ("--set", item)
    ]
    result = subprocess.run([*command, "train", *sets], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stderr
