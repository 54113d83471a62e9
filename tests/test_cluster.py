"""The cluster files parse, and what a typo would break holds: the scripts and configs they name
exist, and the resources they ask for fit the config's pipeline.stages x pipeline.replicas."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from mpc_dist.config import Config, load_config
from mpc_dist.train import validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def run_config(path: str) -> Config:
    config = load_config(ROOT / path)
    validate_config(config)
    return config


def check_fits(config: Config, nodes: int, gpus_per_node: int) -> None:
    """Every rank gets a GPU and every node holds whole pipelines (no pipeline spans nodes)."""
    assert nodes * gpus_per_node >= config.world_size, (nodes, gpus_per_node)
    assert gpus_per_node % config.pipeline.stages == 0, (gpus_per_node, config.pipeline.stages)


def check_command(command: str, app: str = "", config: str | None = None) -> Config:
    """The script a command runs exists, and so does the --config it passes (a valid one, with
    the command's --set overrides)."""
    words = shlex.split(command.replace('"${CONFIG}"', "CONFIG"))
    script = next(w for w in words if w.endswith(".py"))
    assert (ROOT / script.removeprefix(app)).is_file(), script
    named = words[words.index("--config") + 1]
    path = config if named == "CONFIG" else named.removeprefix(app)
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    config = load_config(ROOT / path, overrides)
    validate_config(config)
    return config


NCCL_EXPORTED = ("NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING")  # set for every GPU job
NCCL_NAMED = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA")  # shown, commented: the cluster's own names


def test_gpu_configs_ask_ray_for_gpus():
    """A Ray job of a GPU config waits for GPU workers rather than falling back to CPUs."""
    for name in ("vit_b16_cifar100", "vit_l16_cifar100", "vit_b16_lora"):
        assert run_config(f"configs/{name}.yaml").ray.use_gpu is True, name


def test_ray_cluster_launcher_yaml():
    spec = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(spec, schema)  # Ray's own schema: a misspelt key fails here
    for source in spec["file_mounts"].values():
        assert (ROOT / source).resolve() == ROOT, "the checkout travels (ray up from its root)"
    workers = spec["available_node_types"]["gpu_worker"]
    readme = (CLUSTER / "README.md").read_text()
    (command,) = re.findall(r"ray job submit .*? -- (python launch/ray_train\.py [^\n]*)", readme)
    config = check_command(command)
    assert config.ray.use_gpu is True
    check_fits(config, workers["min_workers"], workers["resources"]["GPU"])


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    config = check_command(job["spec"]["entrypoint"], app="/app/")
    cluster = job["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    check_fits(config, group["replicas"], int(container["resources"]["limits"]["nvidia.com/gpu"]))
    assert config.ray.use_gpu is True
    for template in [cluster["headGroupSpec"]["template"], group["template"]]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for c in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert set(mounts.values()) <= set(volumes)
            shm = volumes[mounts["/dev/shm"]]  # not the 64 MB a container gets by default
            assert shm["emptyDir"]["medium"] == "Memory", shm
            memory = int(c["resources"]["limits"]["memory"].removesuffix("Gi"))
            assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) <= memory / 2
            env = {e["name"]: e["value"] for e in c["env"]}
            assert set(NCCL_EXPORTED) <= set(env), env
            assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    for name in NCCL_NAMED:
        assert re.search(rf"^\s*# - {{name: {name}, value: \S+}}", text, re.MULTILINE), name
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{cluster['rayVersion']}-" in dockerfile
    assert "COPY --chown=ray:users . /app" in dockerfile


def sbatch(name: str) -> tuple[str, dict[str, str]]:
    """Its text and #SBATCH options; it parses, activates the checkout's venv before running
    anything of it, and sets NCCL's variables (the interface and adapters shown, commented)."""
    text = (CLUSTER / name).read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / name)], check=True)
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.MULTILINE))
    lines = text.splitlines()
    (activate,) = [i for i, line in enumerate(lines) if re.match(r"source .*/bin/activate", line)]
    assert ".venv" in lines[activate]
    first_use = min(
        i for i, line in enumerate(lines) if re.match(r"\s*(srun|python|ray|torchrun)\b", line)
    )
    assert activate < first_use, (activate, first_use)
    for name in NCCL_EXPORTED:
        assert re.search(rf"^export {name}=", text, re.MULTILINE), name
    for name in NCCL_NAMED:
        assert re.search(rf"^# export {name}=\S+", text, re.MULTILINE), name
    return text, options


def test_slurm_ray_script():
    text, options = sbatch("slurm-ray.sbatch")
    (config,) = re.findall(r"^CONFIG=(\S+)", text, re.MULTILINE)
    joined = text.replace("\\\n", " ")  # continuation lines
    (command,) = re.findall(r"^python launch/\S+ [^\n]*", joined, re.MULTILINE)
    config = check_command(command, config=config)
    assert config.ray.use_gpu is True
    check_fits(config, int(options["nodes"]), int(options["gpus-per-node"]))


def test_slurm_torchrun_script():
    text, options = sbatch("slurm-torchrun.sbatch")
    (config,) = re.findall(r"^CONFIG=(\S+)", text, re.MULTILINE)
    (per_node,) = re.findall(r"^NPROC_PER_NODE=(\d+)", text, re.MULTILINE)
    (script,) = re.findall(r"^\s+(launch/\S+\.py)", text, re.MULTILINE)
    assert (ROOT / script).is_file()
    config = run_config(config)
    assert int(options["nodes"]) * int(per_node) == config.world_size
    assert int(per_node) <= int(options["gpus-per-node"])
    check_fits(config, int(options["nodes"]), int(per_node))
