"""The GPU acceptance scripts (scripts/gpu/): they parse, every step they name exists, the
configs of the steps CI does not run are valid, and the steps whose logic does not need CUDA
pass on the CPU (gloo, a tiny ViT instead of ViT-B/16)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpc_dist.config import load_config
from mpc_dist.train import validate_config as validate

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "gpu"
SPEC = importlib.util.spec_from_file_location("acceptance", SCRIPTS / "acceptance.py")
acceptance = sys.modules["acceptance"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(acceptance)


@pytest.mark.parametrize("name", ["accept_1gpu.sh", "accept_multi_gpu.sh"])
def test_scripts_parse_and_name_existing_steps(name):
    subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)
    text = (SCRIPTS / name).read_text()
    named = [s for line in re.findall(r"^step \d+ (.+)$", text, re.MULTILINE) for s in line.split()]
    steps = acceptance.ONE_GPU if name == "accept_1gpu.sh" else acceptance.MULTI_GPU
    assert named == list(steps), named  # every step, in order, once
    assert "--device cuda" in text and 'exit "${fail}"' in text


@pytest.mark.parametrize("layout", [
    ["pipeline.stages=2", "pipeline.mode=sync"], ["pipeline.stages=4", "pipeline.mode=async"],
    ["pipeline.stages=2", "pipeline.replicas=2", "pipeline.sharding=fsdp"],
    ["pipeline.stages=1", "pipeline.replicas=2", "pipeline.sharding=fsdp"],
    ["pipeline.stages=2", "ray.use_gpu=true", "train.device=cuda"],
])  # fmt: skip
def test_the_multi_gpu_layouts_are_valid_configs(layout):
    validate(load_config(None, [*acceptance.TINY, *layout]))


def test_the_steps_that_need_no_gpu_pass_on_the_cpu(tmp_path):
    steps = ["loss-factor", "fp16-overflow", "rng", "noise", "tf32", "runtime", "vit-resume",
             "refusals"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "acceptance.py"),
            *steps,
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [line.split(":")[0] for line in lines] == ["PASS"] * 7 + ["SKIP"], lines
    assert "max |resumed - straight| = 0" in done.stdout  # exact on the CPU


def test_the_block_cost_script_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPTS / "costs.py"), "--device", "cpu", "--small"]
    done = subprocess.run(
        [*command, "--batch", "4", "--out", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "costs.json").read_text())["vit_tiny"]
    assert all(v > 0 for v in report["block_ms"]["4"].values())
    saved = [row["activations_mib"] for row in report["memory"]]
    assert saved == sorted(saved) and saved[0] < saved[-1]  # more h, more saved activations
    assert {row["config"] for row in report["projection_p8"]} >= {"BP-1F1B", "receding h=1 async"}
