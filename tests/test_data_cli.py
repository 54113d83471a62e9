"""The data commands as a user runs them: export-data, bench-data, and a dry run of a recipe
that reads images from disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_helpers import DATASET, exported

from mpc_dist.cli import main


def test_export_data_writes_shards_and_their_info(tmp_path: Path, capsys) -> None:
    out = tmp_path / "wds"
    args = ["export-data", "--dataset", DATASET, "--format", "wds", "--out", str(out)]
    assert main([*args, "--limit", "30", "--shard-size", "8", "--ext", "jpg"]) == 0
    assert "train 30 images, val 30 images" in capsys.readouterr().out
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [8, 8, 8, 6]
    assert info["classes"] == [str(c) for c in range(10)]
    assert sorted(p.name for p in out.glob("train-*.tar"))[-1] == "train-000003.tar"


def test_bench_data_prints_both_loaders(capsys) -> None:
    root = str(exported("folder"))
    args = ["bench-data", "--root", root, "--image-size", "16", "--workers", "0"]
    assert main([*args, "--batch-size", "8", "--batches", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("mpc_dist Loader", "timm create_loader", "timm create_loader prefetcher"):
        assert re.search(rf"{name} +\d+\.\d \[\d+, \d+\] images/s per worker", out)
    assert "ours / timm create_loader:" in out and "ours / timm create_loader prefetcher:" in out


def test_dry_run_of_the_imagenet_recipe_on_an_image_folder(capsys) -> None:
    config = "configs/vit_b16_imagenet_deit.yaml"
    assert (
        main(["train", "--config", config, "--dry-run", "--set", f"data.root={exported('folder')}"])
        == 0
    )
    err = capsys.readouterr().err
    assert "12 blocks" in err and "4 stages" in err
