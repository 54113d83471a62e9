"""`mpc-dist data-study` (docs/data.md): back-propagation under torch's pipelining schedules is
our back-propagation (float64, the same images, augmentation and mixup), and the study runs end
to end at a tiny size."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import DATASET, exported
from launching import mpc_dist
from processes import run

from mpc_dist.config import Config, load_config
from mpc_dist.studies import torch_bp
from mpc_dist.studies.common import load_final_weights
from mpc_dist.train import open_run, train

MODELS = {  # network -> overrides, and torch's schedules it is checked under
    "mlp": (["model.num_blocks=4", "model.width=32", "model.hidden=64"],
            ("Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleZBVZeroBubble")),
    # its blocks' outputs are not contiguous: the stage makes them so for gloo
    "vit": (["model.name=vit_tiny", "model.num_blocks=4", "model.width=16", "model.hidden=32",
             "model.num_heads=2", "model.patch_size=4"], ("Schedule1F1B",)),
}  # fmt: skip


def tiny_config(out, name: str, model: list[str]) -> Config:
    """A 4-block network with auxiliary heads, back-propagation, 16 px Fashion-MNIST from disk
    with RandAugment, mixup and label smoothing, float64, 3 steps of 40 images in 4
    microbatches."""
    return load_config(
        None,
        [
            *model,
            "model.head=aux",
            "horizon.rule=receding",
            "horizon.horizon=4",
            "data.dataset=folder",
            f"data.root={exported('folder')}",
            "data.image_size=16",
            "data.batch_size=40",
            "data.num_microbatches=4",
            "data.eval_batch_size=100",
            "augment.enabled=true",
            "augment.auto_augment=rand-m6-n1-mstd0.5-inc1",
            "augment.scale=[0.35,1.0]",
            "augment.mixup=0.2",
            "augment.label_smoothing=0.1",
            "optim.warmup_steps=1",
            "train.dtype=float64",
            "train.epochs=1",
            "train.max_steps=3",
            "train.eval_every=2",
            f"run.out_dir={out}",
            f"run.name={name}",
            "run.progress=false",
            "run.tensorboard=false",
            "run.plot=false",
        ],
    )


def _torch_ranks(rank: int, world: int, out) -> None:
    for network, (model, schedules) in MODELS.items():
        for schedule in schedules:
            torch_bp.run(tiny_config(out, f"{network}_{schedule}", model), [schedule], 0, 0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_back_propagation_under_torch_schedules_is_ours(tmp_path):
    """1F1B, looped and V-shaped layouts (two stages per rank, rank 0 holding the first and the
    last) end with the single-process trainer's weights, and evaluate at the same steps."""
    run(_torch_ranks, 2, tmp_path, timeout=300)
    for network, (model, schedules) in MODELS.items():
        single = tiny_config(tmp_path, f"{network}_single", model)
        train(single)
        meta, _, _ = open_run(single)
        start = torch_bp.fresh_model(single, meta.input_shape, 10).state_dict()
        ours = load_final_weights(single, torch_bp.fresh_model(single, meta.input_shape, 10))
        moved = [k for k, v in ours.state_dict().items() if not torch.equal(v, start[k])]
        assert any(k.startswith("blocks.2.") for k in moved) and any(
            k.startswith("head.") for k in moved
        )
        for schedule in schedules:
            theirs = torch.load(tmp_path / f"{network}_{schedule}" / "final.pt")
            torch.testing.assert_close(theirs, ours.state_dict(), rtol=0, atol=1e-12)
            steps = [r["step"] for r in evaluations(tmp_path / f"{network}_{schedule}")]
            assert steps == [r["step"] for r in evaluations(single.run_dir)] == [2, 3]


def evaluations(run_dir):
    from mpc_dist.train.metrics import MetricsLogger

    return [r for r in MetricsLogger.read(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_data_study_at_a_small_size(tmp_path):
    """The one command behind docs/data.md's study: exports, measures the loaders, trains every
    setting (one process, `--nproc 2`, torch's schedule), writes only its section of the
    document; run again, it reads every result back."""
    doc = tmp_path / "data.md"
    doc.write_text("# Data\n\nnotes before\n")
    command = (
        "data-study", "--out", str(tmp_path / "study"), "--doc", str(doc), "--models", "mlp",
        "--dataset", DATASET, "--train-images", "260", "--test-images", "100", "--epochs", "1",
        "--eval-every", "1", "--max-steps", "2", "--schedules", "Schedule1F1B,ScheduleGPipe",
        "--probe-steps", "1", "--probe-rounds", "1", "--bench-batches", "1",
        "--bench-repeats", "1",
    )  # fmt: skip
    result = mpc_dist(*command, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# Data\n\nnotes before\n\n## Study: the streaming path on")
    for label in (
        "back-propagation | 1 (",
        "MPC h = 1 | 1 (",
        "MPC shrinking h = 2 | 1 (",
        "MPC receding h = 4 (T/2) | 1 (",
        "MPC h = 1 async | 2 (",
        "MPC shrinking h = 2 async | 2 (",
        "back-propagation | 2 (torch",
    ):
        assert f"| {label}" in text, label
    assert "| Schedule1F1B | 0." in text and "| timm `create_loader`, prefetcher |" in text
    assert "](img/data_study.png)" in text and (tmp_path / "img" / "data_study.png").stat().st_size
    runs = json.loads((tmp_path / "study" / "results.json").read_text())["runs"]
    by = {(r["where"], r["rule"], r["horizon"]): r for r in runs}
    assert len(by) == 7 and all(r["steps"] == 2 for r in runs)
    # back-propagation under torch's schedule is ours (float32 here: within 2 of 100 images)
    theirs, ours = by["torch", "receding", 8]["evals"], by["single", "receding", 8]["evals"]
    assert [e[0] for e in theirs] == [e[0] for e in ours] == [1, 2]
    assert abs(theirs[-1][1] - ours[-1][1]) <= 0.02
    again = mpc_dist(*command, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "study" / "results.json").read_text())["runs"]
    assert rerun == runs  # read back, not trained again (the times would differ)
    assert doc.read_text().count("## Study: the streaming path on") == 1
