"""The Loader: the same minibatches wherever it runs (workers, replicas, resume), the sources
agreeing with each other on the same images, and no image opened off the first stage."""

from __future__ import annotations

import builtins
import itertools
import random

import numpy as np
import pytest
import torch
from data_helpers import AUGMENT, MIXING, data_config, exported

from mpc_dist.config import AugmentConfig, DataConfig
from mpc_dist.data import Loader, Shard, load_dataset, minibatches, open_source

NO_AUGMENT = AugmentConfig()


def batches(
    fmt: str,
    augment: AugmentConfig = AUGMENT,
    count: int | None = None,
    epoch: int = 1,
    start_batch: int = 0,
    shard: Shard | None = None,
    m: int = 1,
    **fields,
) -> list:
    data = data_config(fmt, **fields)
    loader = Loader(open_source(data, "train"), data, augment, "train", 7, shard or Shard(), m)
    return list(itertools.islice(loader.epoch(epoch, start_batch), count))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for (x, y), (u, v) in zip(a, b, strict=True):
        torch.testing.assert_close(x, u, rtol=0, atol=0)
        torch.testing.assert_close(y, v, rtol=0, atol=0)


@pytest.fixture(scope="module", autouse=True)
def _images() -> None:
    for fmt in ("folder", "wds"):
        exported(fmt)


def test_in_memory_without_augmentation_is_minibatches_exactly() -> None:
    data = DataConfig(dataset="mnist", batch_size=64)
    source = open_source(data, "train")
    shard = Shard(1, 2)
    loader = Loader(source, data, NO_AUGMENT, "train", 3, shard)
    assert loader._loader is None and loader.batches_per_epoch == 60000 // 64
    ours = list(itertools.islice(loader.epoch(2, start_batch=5), 3))
    reference = minibatches(load_dataset("mnist", "train"), 64, 3, 2, start_batch=5, shard=shard)
    assert_same(ours, list(itertools.islice(reference, 3)))
    assert loader._loader is None  # no DataLoader, no transform: the tensors as held


def test_workers_0_and_2_give_identical_tensors() -> None:
    serial = batches("folder", MIXING, m=2, num_workers=0)
    parallel = batches("folder", MIXING, m=2, num_workers=2)
    assert serial[0][0].shape == (40, 3, 16, 16) and serial[0][1].shape == (40, 10)
    assert_same(serial, parallel)


def test_epochs_and_seeds_differ() -> None:
    first, second = batches("folder", count=1, epoch=1), batches("folder", count=1, epoch=2)
    assert not torch.equal(first[0][0], second[0][0])


def test_resume_mid_epoch_equals_the_tail() -> None:
    full = batches("folder", MIXING)
    assert_same(batches("folder", MIXING, start_batch=3), full[3:])


def test_in_memory_augmented_resume_and_workers() -> None:
    fields = dict(batch_size=32)
    full = batches("mnist", AUGMENT, count=4, **fields)
    assert full[0][0].shape == (32, 1, 28, 28)
    assert_same(batches("mnist", AUGMENT, count=2, start_batch=2, **fields), full[2:4])
    assert_same(batches("mnist", AUGMENT, count=2, num_workers=2, **fields), full[:2])


def test_replicas_partition_each_minibatch() -> None:
    whole = batches("folder", AUGMENT, count=2)
    parts = [batches("folder", AUGMENT, count=2, shard=Shard(d, 2)) for d in range(2)]
    for b, (x, y) in enumerate(whole):
        assert_same(
            [(x, y)], [(torch.cat([p[b][0] for p in parts]), torch.cat([p[b][1] for p in parts]))]
        )


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixup_per_global_microbatch_is_layout_independent(mode: str) -> None:
    """D = 2 replicas with m = 2 microbatches each mix what one process with m * D = 4 does."""
    augment = AugmentConfig(**{**vars(MIXING), "mixup_mode": mode})
    one = batches("folder", augment, count=2, m=4)
    parts = [batches("folder", augment, count=2, m=2, shard=Shard(d, 2)) for d in range(2)]
    joined = [
        (torch.cat([p[b][0] for p in parts]), torch.cat([p[b][1] for p in parts])) for b in range(2)
    ]
    assert_same(one, joined)
    soft = one[0][1]
    torch.testing.assert_close(soft.sum(1), torch.ones(40))
    assert (soft.max(1).values < 1).all()  # smoothed (and mixed)
    other = batches("folder", augment, count=1, m=2)  # other microbatches: other pairs
    assert not torch.equal(other[0][1], one[0][1])


def test_no_image_is_opened_without_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_config("folder")
    source = open_source(data, "train")
    loader = Loader(source, data, MIXING, "train", 0, Shard(1, 2, inputs=False), 2)

    def refuse(*args, **kwargs):
        raise AssertionError(f"opened {args[0]}")

    monkeypatch.setattr(builtins, "open", refuse)
    got = list(loader.epoch(0))
    assert got == [(None, None)] * loader.batches_per_epoch and len(got) == 5


def test_trainer_generators_untouched() -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    batches("folder", MIXING, count=2, num_workers=0)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


# --- sources agree on the same images --------------------------------------------------------


def test_wds_unshuffled_equals_the_folder() -> None:
    folder = batches("folder", MIXING, m=2, shuffle=False)
    shards = batches("wds", MIXING, m=2, shuffle=False, num_workers=2)
    assert_same(folder, shards)


@pytest.mark.parametrize("fmt", ["tar", "hf"])
def test_tar_and_hf_equal_the_folder(fmt: str) -> None:
    exported(fmt)
    assert_same(batches(fmt, MIXING, count=2), batches("folder", MIXING, count=2))


def test_wds_shuffled_is_a_function_of_seed_and_epoch() -> None:
    fields = dict(shuffle_buffer=64)
    first, again = batches("wds", MIXING, **fields), batches("wds", MIXING, num_workers=2, **fields)
    assert_same(first, again)
    unshuffled = batches("wds", MIXING, shuffle=False)
    assert not torch.equal(first[0][1], unshuffled[0][1])
    assert not torch.equal(first[0][1], batches("wds", MIXING, count=1, epoch=2, **fields)[0][1])
    assert_same(batches("wds", MIXING, start_batch=2, **fields), first[2:])


def test_wds_replicas_read_disjoint_shards() -> None:
    data = data_config("wds")
    source = open_source(data, "train")
    loaders = [Loader(source, data, AUGMENT, "train", 0, Shard(d, 2)) for d in range(2)]
    seen = [{i for batch in loader.plan for _, i, *_ in batch} for loader in loaders]
    shards = [{i // 40 for i in s} for s in seen]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 5
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 80 // 20


def test_evaluation_resizes_and_crops_in_order() -> None:
    data = data_config("folder", eval_batch_size=64)
    source = open_source(data, "test")
    loader = Loader(source, data, MIXING, "test", 0)
    got = list(loader.epoch(0))
    assert [len(y) for _, y in got] == [64, 64, 64, 8] and got[0][1].dtype == torch.int64
    assert torch.equal(torch.cat([y for _, y in got]), torch.tensor(source.targets))
    wds = Loader(
        open_source(data_config("wds"), "test"),
        data_config("wds", eval_batch_size=64),
        MIXING,
        "test",
        0,
        Shard(0, 2),
    )
    first = next(wds.epoch(0))
    assert_same([first], [(got[0][0][:32], got[0][1][:32])])


def test_in_memory_evaluation_at_own_size_stays_the_tensors() -> None:
    data = DataConfig(dataset="mnist", eval_batch_size=500)
    loader = Loader(open_source(data, "test"), data, MIXING, "test", 0)
    x, y = next(loader.epoch(0))
    test = load_dataset("mnist", "test")
    assert torch.equal(x, test.inputs[:500]) and torch.equal(y, test.targets[:500])


def test_tiny_cpu_recipe_feeds_its_model_a_training_step() -> None:
    """configs/vit_tiny_folder_cpu.yaml on exported images: validated, loaded with augmentation
    and mixup, and its model takes a step on the soft targets (torch's cross-entropy takes
    class probabilities)."""
    from mpc_dist.config import load_config
    from mpc_dist.models import build_model
    from mpc_dist.train import validate_config

    root = exported("folder")
    config = load_config("configs/vit_tiny_folder_cpu.yaml", [f"data.root={root}"])
    validate_config(config)
    d = config.data
    source = open_source(d, "train", config.train.seed)
    loader = Loader(
        source, d, config.augment, "train", config.train.seed, Shard(), d.num_microbatches
    )
    model = build_model(config.model, source.input_shape, source.num_classes, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    losses = []
    for x, y in itertools.islice(loader.epoch(0), 2):
        assert x.shape == (64, 3, 32, 32) and y.shape == (64, 10)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and loader.stats()["batches"] == 2


def test_in_memory_mixup_without_augmentation_is_layout_independent() -> None:
    """Mixup on the held tensors (no image path): the same per-global-microbatch rule."""
    mixing = AugmentConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    one = batches("mnist", mixing, count=2, m=4, batch_size=32)
    parts = [
        batches("mnist", mixing, count=2, m=2, shard=Shard(d, 2), batch_size=32) for d in range(2)
    ]
    joined = [
        (torch.cat([p[b][0] for p in parts]), torch.cat([p[b][1] for p in parts])) for b in range(2)
    ]
    assert_same(one, joined)
    plain = batches("mnist", NO_AUGMENT, count=1, batch_size=32)
    assert one[0][1].shape == (32, 10) and not torch.equal(one[0][0], plain[0][0])
    off_stage = Loader(
        open_source(DataConfig(), "train"), DataConfig(), mixing, "train", 7, Shard(0, 1, False)
    )
    assert next(off_stage.epoch(0)) == (None, None)
