"""The streaming data path in training: images read from disk, augmented (RandAugment, random
erasing) and mixed (mixup, cutmix, label smoothing), trained through a P = 2 x D = 2 pipeline to
the single-process weights (float64); a run resumed mid-epoch and a run with loader workers
equal the uninterrupted run; only the first stage of a replica opens an image file."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from data_helpers import exported
from launching import ENV, assert_same_weights, mpc_dist, sets

from mpc_dist.config import load_config
from mpc_dist.train import train

pytestmark = pytest.mark.multiprocess

STREAMING = [
    "data.dataset=folder", "data.image_size=16", "data.batch_size=16", "data.eval_batch_size=100",
    "augment.enabled=true", "augment.auto_augment=rand-m9-mstd0.5-inc1", "augment.re_prob=0.25",
    "augment.mixup=0.8", "augment.cutmix=1.0", "augment.label_smoothing=0.1",
    "model.name=residual_mlp", "model.num_blocks=4", "model.width=16", "model.hidden=24",
    "model.head=aux", "horizon.horizon=2", "train.dtype=float64", "train.epochs=1",
    "train.max_steps=6", "run.progress=false", "run.tensorboard=false", "run.plot=false",
    "pipeline.timeout=60",
]  # fmt: skip

# Every file a process opens under the data root, by rank: installed in each process of the
# pipeline through Python's audit hooks (a test hook, in the tests only).
AUDIT = """
import os, sys
_root, _out = os.environ["MPC_AUDIT_ROOT"], os.environ["MPC_AUDIT_DIR"]
def _hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(_root):
        with open(os.path.join(_out, "rank_" + os.environ.get("RANK", "x")), "a") as f:
            f.write(args[0] + "\\n")
sys.addaudithook(_hook)
"""


def config(tmp_path: Path, name: str, *extra: str, source: str = "folder"):
    root = exported(source)
    items = [*STREAMING, f"data.dataset={source}", f"data.root={root}", f"run.out_dir={tmp_path}"]
    return load_config(None, [*items, f"run.name={name}", *extra])


def single(
    tmp_path: Path, name: str, *extra: str, resume: bool = False, source: str = "folder"
) -> Path:
    run = config(tmp_path, name, "data.num_microbatches=4", *extra, source=source)
    train(run, resume=resume)
    return tmp_path / name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, four microbatches (the pipeline's D x m), no loader workers."""
    return single(tmp_path_factory.mktemp("reference"), "single")


def test_pipeline_on_images_equals_one_process_and_only_first_stages_read(tmp_path, reference):
    hooks, audit = tmp_path / "hooks", tmp_path / "audit"
    hooks.mkdir(), audit.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    root = str(exported("folder").resolve())
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    env = {**ENV, "PYTHONPATH": path, "MPC_AUDIT_ROOT": root, "MPC_AUDIT_DIR": str(audit)}
    items = [*STREAMING, f"data.root={root}", f"run.out_dir={tmp_path}", "run.name=pipeline"]
    layout = ["pipeline.stages=2", "pipeline.replicas=2", "data.num_microbatches=2"]
    result = mpc_dist("train", "--nproc", "4", *sets(*items, *layout), timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(tmp_path / "pipeline", reference)
    stages = {
        int(rank): int(stage)
        for rank, stage in re.findall(r"rank (\d+) \(stage (\d+), replica \d+\)", result.stderr)
    }
    assert sorted(stages.values()) == [0, 0, 1, 1], result.stderr[-2000:]
    opened = {
        r: (audit / f"rank_{r}").read_text().split()
        for r in stages
        if (audit / f"rank_{r}").exists()
    }
    images = {r: [p for p in paths if p.endswith(".png")] for r, paths in opened.items()}
    for rank, stage in stages.items():
        if stage == 0:
            assert len(images.get(rank, [])) >= 6 * 8, f"rank {rank} read {images.get(rank)}"
        else:
            assert not images.get(rank), f"stage {stage} (rank {rank}) opened {images[rank][:3]}"


def test_loader_workers_and_a_mid_epoch_resume_equal_the_uninterrupted_run(tmp_path, reference):
    workers = single(tmp_path, "workers", "data.num_workers=2")
    assert_same_weights(workers, reference)
    first = ["run.checkpoint_every=3", "train.max_steps=3"]
    single(tmp_path, "resumed", *first)
    resumed = single(tmp_path, "resumed", "run.checkpoint_every=3", resume=True)
    assert_same_weights(resumed, reference)


def test_webdataset_shards_train_like_the_image_folder(tmp_path):
    """Unshuffled, shards of the same images give the folder's weights; shuffled (the order a
    function of the seed, the epoch and the shard list), two runs give the same weights."""
    folder = single(tmp_path, "folder", "data.shuffle=false")
    shards = single(tmp_path, "shards", "data.shuffle=false", source="wds")
    assert_same_weights(shards, folder)
    first = single(tmp_path, "shuffled_a", source="wds")
    second = single(tmp_path, "shuffled_b", source="wds")
    assert_same_weights(first, second)
    with pytest.raises(AssertionError):  # shuffling changed the order: the weights differ
        assert_same_weights(first, shards)
