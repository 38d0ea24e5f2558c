"""Corrupt, truncated and missing shards: skipped with a warning and counted; all bad → clear error."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from data_pipeline import CorruptShardWarning, DataConfig, Manifest, NoReadableShardsError, ShardStream, prepare


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "data"
    prepare(DataConfig(dir=str(folder), task="text", max_documents=6, vocab_size=300, num_sentinels=4,
                       shard_samples=10, valid_fraction=0.0, test_fraction=0.0), progress=False, use_ray=False)
    return folder


@pytest.fixture
def data(pristine, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    return copy


def shard_keys(path):
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar}


def damage(path, how):
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":  # same size, bytes overwritten in the middle of the payload
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + b"\xff" * 64 + raw[mid + 64:])
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing"])
def test_bad_shard_is_skipped_with_a_warning_and_counted(data, how):
    shards = Manifest.load(data).shards()
    victim = shards[1].path
    lost = shard_keys(victim)
    everything = set().union(*(shard_keys(s.path) for s in shards))
    damage(victim, how)
    with pytest.warns(CorruptShardWarning, match=victim.name):
        streams = [ShardStream(data / "manifest.json", rank=r, world_size=2, seed=0) for r in range(2)]
    assert streams[0].num_bad_shards == 1 and str(victim) in streams[0].bad_shards
    with pytest.warns(CorruptShardWarning, match=victim.name):  # and again for each pass over the data
        per_rank = [[s["__key__"] for s in stream] for stream in streams]
    assert len(per_rank[0]) == len(per_rank[1])  # still equal: bad shards leave the order before it is built
    assert set(Counter(per_rank[0] + per_rank[1])) == everything - lost


def test_corruption_found_while_reading_is_skipped_and_counted(data):
    shards = Manifest.load(data).shards()
    damage(shards[0].path, "garbage")
    raw = bytearray(shards[0].path.read_bytes())
    raw[0:8] = b"\x00garbag\x01"  # break the first tar header too, so reading fails
    shards[0].path.write_bytes(bytes(raw))
    stream = ShardStream(data, rank=0, world_size=1, seed=0, verify="size")  # sizes match: not caught up front
    assert stream.num_bad_shards == 0
    with pytest.warns(CorruptShardWarning, match=shards[0].path.name):
        keys = [s["__key__"] for s in stream]
    assert stream.num_bad_shards == 1
    assert len(keys) == sum(s.samples for s in shards[1:])


def test_every_shard_bad_is_an_error_naming_the_files(data):
    shards = Manifest.load(data).shards()
    for s in shards:
        damage(s.path, "truncated")
    with pytest.warns(CorruptShardWarning), pytest.raises(NoReadableShardsError) as err:
        ShardStream(data / "manifest.json", rank=0, world_size=1, seed=0)
    for s in shards:
        assert str(s.path) in str(err.value)
