"""Corrupt, truncated and missing shards: skipped with a warning and counted; all bad → clear error."""

from __future__ import annotations

import shutil
import warnings
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


# --- a hostile bucket: shards that match their manifest entry but hold bad content ------------------


def rewrite_shard(folder, index, edit):
    """Rewrite shard `index` with `edit(members) -> members` ((name, bytes) pairs) and make the manifest
    agree with the new file (sizes and sha256), as someone who can write the bucket would."""
    import hashlib
    import io
    import json
    import tarfile

    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["shards"][index]
    path = folder / entry["path"]
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, raw in edit(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(raw), 0, 0o444
            tar.addfile(info, io.BytesIO(raw))
    path.write_bytes(out.getvalue())
    entry["bytes"], entry["sha256"] = len(out.getvalue()), hashlib.sha256(out.getvalue()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path, [name.split(".")[0] for name, _ in members]


def test_token_ids_outside_the_vocabulary_are_skipped_and_counted(data):
    import numpy as np

    vocab = Manifest.load(data).vocab_size
    bad_keys = []

    def poison(members):
        out = []
        for i, (name, raw) in enumerate(members):
            if i in (1, 4):  # two samples: one id past the vocabulary
                ids = np.frombuffer(raw, dtype="<u2").copy()
                ids[len(ids) // 2] = vocab + 7
                raw = ids.tobytes()
                bad_keys.append(name.split(".")[0])
            out.append((name, raw))
        return out

    path, keys = rewrite_shard(data, 0, poison)
    everything = {k for s in Manifest.load(data).shards() for k in shard_keys(s.path)}
    stream = ShardStream(data, rank=0, world_size=1, seed=0)
    with pytest.warns(CorruptShardWarning, match=rf"{path.name}: 2 samples? .*token ids? >= {vocab}"):
        played = [s["__key__"] for s in stream]
    assert set(played) == everything - set(bad_keys)
    assert stream.num_bad_samples == 2 and stream.num_bad_shards == 0


def test_a_sample_missing_a_field_is_skipped_and_counted(data):
    path, keys = rewrite_shard(data, 0, lambda members: [(n.replace(".tgt.", ".other.") if i == 0 else n, raw)
                                                         for i, (n, raw) in enumerate(members)])
    stream = ShardStream(data, rank=0, world_size=1, seed=0)
    with pytest.warns(CorruptShardWarning, match=path.name):
        played = [s["__key__"] for s in stream]
    assert keys[0] not in played and stream.num_bad_samples == 1


def test_reserved_member_names_make_a_shard_unreadable(data):
    path, keys = rewrite_shard(data, 0, lambda members: [(n.replace(".tgt.", ".__key__.") if i == 0 else n, raw)
                                                         for i, (n, raw) in enumerate(members)])
    stream = ShardStream(data, rank=0, world_size=1, seed=0)
    with pytest.warns(CorruptShardWarning, match=path.name):
        played = [s["__key__"] for s in stream]
    assert not set(keys) & set(played) and stream.num_bad_shards == 1
    assert all(isinstance(k, str) for k in played)


def test_a_shard_over_the_memory_cap_is_refused_by_name(data):
    from data_pipeline.shards import MAX_SHARD_BYTES, ShardCorrupt, read_shard

    assert MAX_SHARD_BYTES >= 2**28  # generous by default: tens of MB is the recommended shard size
    # Shard 0 grows (one sample of 30000 valid ids); the manifest agrees, as a hostile bucket's would.
    path, _ = rewrite_shard(data, 0, lambda members: [(n, b"\x05\x00" * 30000 if i == 0 else raw)
                                                      for i, (n, raw) in enumerate(members)])
    shards = Manifest.load(data).shards()
    cap = max(s.bytes for s in shards[1:])
    assert shards[0].bytes > cap
    with pytest.warns(CorruptShardWarning, match=rf"{path.name}: {shards[0].bytes} bytes, over the {cap}-byte cap"):
        stream = ShardStream(data, rank=0, world_size=1, seed=0, max_shard_bytes=cap)
    with pytest.warns(CorruptShardWarning, match=path.name):  # and again for each pass
        assert len(list(stream)) == sum(s.samples for s in shards[1:])
    assert stream.num_bad_shards == 1
    with pytest.raises(ShardCorrupt, match=rf"{path.name}: {shards[0].bytes} bytes, over the {cap}-byte cap"):
        read_shard(path, expect_samples=shards[0].samples, max_bytes=cap)
    with pytest.warns(CorruptShardWarning), pytest.raises(NoReadableShardsError, match="cap"):
        ShardStream(data, rank=0, world_size=1, seed=0, max_shard_bytes=100)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_rank_whose_every_shard_fails_while_reading_stops_with_a_clear_error(data, num_workers):
    from torch.utils.data import DataLoader

    shards = Manifest.load(data).shards()
    for s in shards:  # same sizes, so only reading finds out (verify=size, or a remote shard hashed on read)
        raw = bytearray(s.path.read_bytes())
        raw[0:8] = b"\x00garbag\x01"
        s.path.write_bytes(bytes(raw))
    stream = ShardStream(data, rank=1, world_size=2, seed=0, verify="size")
    with warnings.catch_warnings(), pytest.raises(NoReadableShardsError, match=shards[0].path.name):
        warnings.simplefilter("ignore", CorruptShardWarning)  # warned in the workers' processes, if any
        list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def test_a_rank_that_only_meets_bad_shards_in_one_pass_goes_on(data):
    """A worker (or a resumed segment) whose share lies in bad shards yields nothing; others are fine: no error."""
    shards = Manifest.load(data).shards()
    raw = bytearray(shards[0].path.read_bytes())
    raw[0:8] = b"\x00garbag\x01"
    shards[0].path.write_bytes(bytes(raw))
    stream = ShardStream(data, rank=0, world_size=1, seed=0, shuffle=False, verify="size")
    stream.load_state_dict({**stream.state_dict(), "cursor": 0, "done": list(range(shards[0].samples,
                                                                                       stream.num_samples_total))})
    with pytest.warns(CorruptShardWarning):
        assert list(stream) == []  # only shard 0's samples were left, and shard 0 is unreadable
    stream.set_epoch(1)
    with pytest.warns(CorruptShardWarning):
        assert len(list(stream)) == stream.num_samples_total - shards[0].samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_what_dataloader_workers_skip_reaches_the_trainer_through_the_batches(data, num_workers):
    """A worker reads a copy of the stream: its skips come back in `Batch.bad_shards`/`num_bad_samples`,
    the same totals as reading in the training process (each pass meets them again; a shard counts once)."""
    import numpy as np

    from data_pipeline import BatchConfig, ObjectiveConfig, Specials
    from data_pipeline.batching import TokenBatcher
    from data_pipeline.loader import data_loader
    from data_pipeline.objectives import build_objective

    vocab = Manifest.load(data).vocab_size

    def poison(members):  # one sample of shard 2 gets an id past the vocabulary
        name, raw = members[0]
        ids = np.frombuffer(raw, dtype="<u2").copy()
        ids[0] = vocab + 1
        return [(name, ids.tobytes()), *members[1:]]

    rewrite_shard(data, 2, poison)
    broken = Manifest.load(data).shards()[0].path
    raw = bytearray(broken.read_bytes())
    raw[0:8] = b"\x00garbag\x01"  # the same size: found only while reading
    broken.write_bytes(bytes(raw))
    stream = ShardStream(data, rank=0, world_size=1, seed=0, verify="size")
    manifest = Manifest.load(data)
    noise = build_objective(ObjectiveConfig(name="bart"), manifest.specials, seed=0, fields=manifest.fields)
    batcher = TokenBatcher(stream, noise, BatchConfig(max_tokens=1024), seed=0)
    loader = data_loader(batcher, num_workers=num_workers)
    shards, samples = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptShardWarning)
        for epoch in range(2):
            batcher.set_epoch(epoch)
            for batch in loader:
                shards.update(batch.bad_shards)
                samples += batch.num_bad_samples
    assert shards == {str(broken)}
    assert samples == 2  # the poisoned sample, once per pass
