"""Bad input on the data path: each fails in one line naming the field and the fix, before any
process starts where that can be known; a corrupt file met while training follows data.on_error."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from data_helpers import AUGMENT, MIXING, copy_of, data_config, exported

from mpc_dist.config import Config, ConfigError, load_config
from mpc_dist.data import DataError, Loader, check_data, check_num_classes, open_source
from mpc_dist.train import validate_config


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def config_for(data, **augment) -> Config:
    config = load_config(None, [f"augment.{k}={v}" for k, v in augment.items()])
    config.data = data
    return config


def test_missing_root_fails_in_validation(tmp_path: Path) -> None:
    config = load_config(None, ["data.dataset=folder", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DataError, match=re.escape("data.root=")) as info:
        validate_config(config)
    assert "no such folder" in one_line(info)
    config.data.root = None
    with pytest.raises(DataError, match=re.escape("data.root: data.dataset=folder")):
        validate_config(config)


def test_missing_split_folder(tmp_path: Path) -> None:
    root = copy_of("folder", tmp_path)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="no val") as info:
        check_data(config_for(data_config("folder", root)))
    assert "root/train and root/val" in one_line(info)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = copy_of("folder", tmp_path)
    for image in (root / "train" / "3").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=re.escape("class folder train/3 holds no images")) as info:
        check_data(config_for(data_config("folder", root)))
    assert "add images or remove the folder" in one_line(info)


def test_train_and_val_with_different_classes(tmp_path: Path) -> None:
    root = copy_of("folder", tmp_path)
    (root / "val" / "9").rename(root / "val" / "nine")
    with pytest.raises(DataError, match="train and val hold different classes") as info:
        check_data(config_for(data_config("folder", root)))
    assert "only in train: ['9'], only in val: ['nine']" in one_line(info)


def test_class_count_that_disagrees_with_the_model() -> None:
    shape, classes = check_data(config_for(data_config("folder")))
    assert shape == (3, 16, 16) and classes == 10
    check_num_classes(classes, 10)
    with pytest.raises(DataError, match="the data has 10 classes but the model's head has 1000"):
        check_num_classes(classes, 1000, "model.weights")


def _damage(root: Path) -> list[Path]:
    """A corrupt image (garbage bytes) and a truncated one (half a PNG) in the training split."""
    images = sorted((root / "train" / "2").iterdir())
    images[0].write_bytes(b"not an image at all")
    images[1].write_bytes(images[1].read_bytes()[: len(images[1].read_bytes()) // 2])
    return images[:2]


def test_corrupt_image_fails_naming_the_file(tmp_path: Path) -> None:
    root = copy_of("folder", tmp_path)
    bad = _damage(root)
    data = data_config("folder", root, shuffle=False, num_workers=2)
    loader = Loader(open_source(data, "train"), data, AUGMENT, "train", 0)
    with pytest.raises(DataError, match=re.escape(str(bad[0]))) as info:
        list(loader.epoch(0))
    assert "data.on_error=skip" in one_line(info)


def test_corrupt_image_skipped_is_counted_and_never_mislabelled(tmp_path: Path) -> None:
    root = copy_of("folder", tmp_path)
    _damage(root)
    data = data_config("folder", root, shuffle=False, on_error="skip")
    source = open_source(data, "train")
    loader = Loader(source, data, AUGMENT, "train", 0)
    got = list(loader.epoch(0))
    assert len(got) == loader.batches_per_epoch and all(len(y) == 40 for _, y in got)
    stats = loader.stats()
    assert stats["skipped"] == 2 and len(stats["skipped_files"]) == 2
    # Rows 40 and 41 (class 2, unshuffled) hold row 42's image and its label, not theirs.
    intact = Loader(open_source(data_config("folder"), "train"), data, AUGMENT, "train", 0)
    clean = list(intact.epoch(0))
    x, y = got[1]
    assert y[:3].tolist() == [2, 2, 2] and torch.equal(y[3:], clean[1][1][3:])
    assert torch.equal(x[0], x[2]) and torch.equal(x[1], x[2]) and torch.equal(x[2], clean[1][0][2])


def _truncate_shard(root: Path, name: str = "train-000001.tar") -> Path:
    shard = root / name
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return shard


def test_truncated_shard_fails_naming_it(tmp_path: Path) -> None:
    root = copy_of("wds", tmp_path)
    shard = _truncate_shard(root)
    data = data_config("wds", root, shuffle=False)
    loader = Loader(open_source(data, "train"), data, MIXING, "train", 0)
    with pytest.raises(DataError, match=re.escape(f"{shard}: shard truncated or corrupt")) as info:
        list(loader.epoch(0))
    assert "data.on_error=skip" in one_line(info)


def test_truncated_shard_skipped_keeps_the_epoch_whole(tmp_path: Path) -> None:
    root = copy_of("wds", tmp_path)
    _truncate_shard(root)
    data = data_config("wds", root, shuffle=False, on_error="skip")
    loader = Loader(open_source(data, "train"), data, MIXING, "train", 0)
    got = list(loader.epoch(0))
    assert len(got) == loader.batches_per_epoch == 5 and all(len(y) == 40 for _, y in got)
    stats = loader.stats()
    assert 0 < stats["skipped"] < 40 and "train-000001.tar" in stats["skipped_files"][0]


def test_truncated_tar_fails_when_listed(tmp_path: Path) -> None:
    root = tmp_path / "tar"
    shutil.copytree(exported("tar"), root)
    tar = root / "train.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(f"cannot index {tar}")) as info:
        check_data(config_for(data_config("tar", root)))
    assert "intact copy" in one_line(info)


def test_shard_list_problems(tmp_path: Path) -> None:
    root = copy_of("wds", tmp_path)
    config = config_for(data_config("wds", root))
    config.pipeline.replicas = 8
    with pytest.raises(DataError, match="5 training shards for pipeline.replicas=8"):
        check_data(config)
    (root / "train-000004.tar").unlink()
    with pytest.raises(DataError, match="train-000004.tar listed in _info.json is missing"):
        check_data(config_for(data_config("wds", root)))
    (root / "_info.json").unlink()
    with pytest.raises(DataError, match="no _info.json") as info:
        check_data(config_for(data_config("wds", root)))
    assert "export-data" in one_line(info)


def test_hf_without_image_and_label_columns(tmp_path: Path) -> None:
    import datasets

    root = tmp_path / "hf"
    parts = {s: datasets.Dataset.from_dict({"x": [1, 2]}) for s in ("train", "validation")}
    datasets.DatasetDict(parts).save_to_disk(str(root))
    with pytest.raises(DataError, match="needs an Image column and a ClassLabel column"):
        check_data(config_for(data_config("hf", root)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.dataset": "imagenet"}, "data.dataset='imagenet': unknown"),
        ({"data.on_error": "ignore"}, "data.on_error=ignore: use one of fail, skip"),
        ({"data.num_workers": -1}, "data.num_workers=-1: must be >= 0"),
        ({"augment.enabled": True}, "data.dataset=synthetic: not images"),
        ({"augment.auto_augment": "rand-x9"}, "augment.auto_augment='rand-x9': timm cannot"),
        ({"augment.scale": [0.5, 0.1]}, "augment.scale=[0.5, 0.1]: two areas"),
        ({"augment.mixup_mode": "row"}, "augment.mixup_mode=row: use one of batch, pair, elem"),
        ({"augment.label_smoothing": 1.0}, "augment.label_smoothing=1.0"),
        (
            {"augment.mixup": 0.8, "data.batch_size": 12, "data.num_microbatches": 4},
            "batch_size / (num_microbatches x replicas) = 3 must be even",
        ),
    ],
)
def test_config_values(overrides: dict, message: str) -> None:
    base = {"data.dataset": "synthetic", **overrides}
    with pytest.raises(ConfigError, match=re.escape(message)) as info:  # on loading, or after
        check_data(load_config(None, [f"{k}={v}" for k, v in base.items()]))
    one_line(info)
