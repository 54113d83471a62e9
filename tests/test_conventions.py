"""accelerate's and DeepSpeed's settings are mapped onto the config, or refused in one line."""

from __future__ import annotations

import json
import subprocess

import pytest
from launching import BIN, ENV, TINY, sets
from processes import free_port

from mpc_dist.config import ConfigError, load_config
from mpc_dist.launchers.conventions import apply_launcher_settings

ACCELERATE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


def mapped(environ=None, deepspeed=None, overrides=()):
    return apply_launcher_settings(load_config(None, list(overrides)), deepspeed, environ or {})


def test_accelerate_settings_are_mapped():
    config, notes = mapped({**ACCELERATE, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert config.train.precision == "bf16-mixed" and len(notes) == 1
    fsdp = {**ACCELERATE, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_ACTIVATION_CHECKPOINTING": "true"}  # fmt: skip
    config, notes = mapped(fsdp)
    assert config.pipeline.sharding == "fsdp"
    assert config.train.activation_checkpointing == "blocks"
    config, notes = mapped(
        {**ACCELERATE, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "default"}
    )
    assert (config.train.compile, config.train.compile_backend) == ("blocks", "inductor")
    assert notes == [
        "train.compile=blocks with train.compile_backend=inductor (from accelerate "
        "--dynamo_backend inductor)"
    ]
    with pytest.raises(ConfigError, match="train.compile_backend=aot_eager; make them agree"):
        mapped(
            {**ACCELERATE, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"},
            overrides=["train.compile=blocks", "train.compile_backend=aot_eager"],
        )
    config, notes = mapped({})  # not started by accelerate: nothing changes
    assert config == load_config(None, []) and not notes


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "--mixed_precision fp8"),
        ({**ACCELERATE, "ACCELERATE_DYNAMO_BACKEND": "CUDAGRAPHS"}, "--dynamo_backend cudagraphs"),
        ({**ACCELERATE, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
          "ACCELERATE_DYNAMO_MODE": "max-autotune"}, "--dynamo_mode max-autotune"),
        ({**ACCELERATE, "ACCELERATE_USE_FSDP": "true"}, "--fsdp_version 1"),
        ({**ACCELERATE, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
          "FSDP_OFFLOAD_PARAMS": "true"}, "--fsdp_offload_params"),
        ({**ACCELERATE, "ACCELERATE_USE_DEEPSPEED": "true",
          "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "ZeRO stage 2"),
    ],
)  # fmt: skip
def test_accelerate_settings_we_cannot_honour_stop_in_one_line(environ, message):
    with pytest.raises(ConfigError, match=message) as error:
        mapped(environ)
    assert "\n" not in str(error.value)


def test_deepspeed_json_is_mapped_or_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "bf16": {"enabled": True},
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 0},
                "steps_per_print": 10,
                "train_batch_size": 128,
            }
        )
    )
    config, notes = mapped(deepspeed=str(path))
    assert config.train.precision == "bf16-mixed" and config.optim.grad_clip == 1.0
    for bad, message in (
        ({"zero_optimization": {"stage": 1}}, "ZeRO stage 1"),
        ({"optimizer": {"type": "Adam"}}, "optim"),
        ({"train_batch_size": 64}, "train_batch_size=64"),
        ({"fp16": {"enabled": True}, "amp": {}}, r"\['amp'\]"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            mapped(deepspeed=str(path))


def test_deepspeed_launcher_with_a_zero2_config_stops_before_training(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "launch/train.py", "--deepspeed", "--deepspeed_config", str(path),
               *sets(*TINY, "pipeline.stages=2", f"run.out_dir={tmp_path}")]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**ENV, "DS_ACCELERATOR": "cpu"}
    )
    assert result.returncode != 0
    assert "ZeRO stage 2 does not fit" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may start"


def test_accelerate_launch_in_bf16_trains_a_pipeline(tmp_path):
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "launch/train.py",
        *sets(*TINY, "train.dtype=float32", "pipeline.stages=2", f"run.out_dir={tmp_path}",
              "run.name=acc"),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.precision=bf16-mixed (from accelerate" in result.stderr
    assert load_config(tmp_path / "acc" / "config.yaml").train.precision == "bf16-mixed"
