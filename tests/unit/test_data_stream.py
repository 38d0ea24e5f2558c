"""ShardStream: per-epoch coverage, equal per-rank counts, shuffling, exact and elastic resume."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from data_pipeline import DataConfig, Progress, ShardStream, merge_states, prepare


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "data"
    cfg = DataConfig(dir=str(folder), task="text", max_documents=8, vocab_size=300, num_sentinels=4,
                     shard_samples=9, valid_fraction=0.0, test_fraction=0.0)
    prepare(cfg, progress=False, use_ray=False)
    return str(folder / "manifest.json")


@pytest.fixture(scope="module")
def all_keys(manifest):
    return {s["__key__"] for s in ShardStream(manifest, rank=0, world_size=1, seed=0, shuffle=False)}


def keys_of(stream, num_workers=0):
    return [s["__key__"] for s in DataLoader(stream, batch_size=None, num_workers=num_workers)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch_and_equal_counts_per_rank(manifest, all_keys, world_size, num_workers):
    per_rank = [keys_of(ShardStream(manifest, rank=r, world_size=world_size, seed=7), num_workers)
                for r in range(world_size)]
    n = len(all_keys)
    assert [len(k) for k in per_rank] == [math.ceil(n / world_size)] * world_size
    counts = Counter(k for keys in per_rank for k in keys)
    assert set(counts) == all_keys
    assert sum(counts.values()) - n == (-n) % world_size  # only the `repeat` rule adds samples


def test_workers_keep_the_rank_order(manifest):
    stream = ShardStream(manifest, rank=1, world_size=2, seed=3)
    assert keys_of(stream, 2) == keys_of(stream, 0)


def test_drop_rule_gives_floor_and_never_repeats(manifest, all_keys):
    n = len(all_keys)
    world_size = next(w for w in (2, 3, 4, 5, 7) if n % w)
    per_rank = [keys_of(ShardStream(manifest, rank=r, world_size=world_size, seed=1, remainder="drop"))
                for r in range(world_size)]
    assert [len(k) for k in per_rank] == [n // world_size] * world_size
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == n - n % world_size


def test_order_is_a_deterministic_function_of_seed_and_epoch(manifest):
    def order(seed, epoch):
        stream = ShardStream(manifest, rank=0, world_size=1, seed=seed)
        stream.set_epoch(epoch)
        return keys_of(stream)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(order(1, 0)) == sorted(order(1, 1))
    plain = keys_of(ShardStream(manifest, rank=0, world_size=1, seed=1, shuffle=False))
    assert plain == sorted(plain)  # manifest order: documents and paragraphs in corpus order


def test_set_epoch_restarts_and_reiterating_replays(manifest):
    stream = ShardStream(manifest, rank=0, world_size=2, seed=0)
    first = keys_of(stream)
    assert keys_of(stream) == first  # no set_epoch: the same epoch again, like DistributedSampler
    stream.set_epoch(1)
    assert keys_of(stream) != first and len(stream) == len(first)


@pytest.mark.parametrize("world_size", [1, 3])
def test_exact_resume_at_random_cursors(manifest, world_size):
    rng = random.Random(0)
    for _ in range(6):
        rank, epoch = rng.randrange(world_size), rng.randrange(3)
        stream = ShardStream(manifest, rank=rank, world_size=world_size, seed=11)
        stream.set_epoch(epoch)
        full = keys_of(stream)
        cut = rng.randrange(len(full) + 1)
        it = iter(stream)
        head = [next(it)["__key__"] for _ in range(cut)]
        resumed = ShardStream(manifest, rank=rank, world_size=world_size, seed=11)
        resumed.load_state_dict(stream.state_dict())
        assert len(resumed) == len(full) - cut
        assert head + keys_of(resumed) == full


def test_exact_resume_with_dataloader_workers_counts_consumed_indices(manifest):
    stream = ShardStream(manifest, rank=0, world_size=2, seed=5)
    full = keys_of(stream, 2)
    seen, consumed = [], Progress()
    for sample in DataLoader(stream, batch_size=None, num_workers=2):
        seen.append(sample["__key__"])
        consumed.add(sample["__index__"])
        if len(seen) == 13:
            break
    state = stream.state_dict(consumed=consumed)  # the stream object itself never iterated
    assert stream.state_dict(consumed=len(seen)) == state  # in-order consumer: a count will do
    resumed = ShardStream(manifest, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert seen + keys_of(resumed, 2) == full


def test_state_survives_a_second_resume(manifest):
    stream = ShardStream(manifest, rank=0, world_size=1, seed=2)
    full = keys_of(stream)
    it = iter(stream)
    head = [next(it)["__key__"] for _ in range(5)]
    second = ShardStream(manifest, rank=0, world_size=1, seed=2)
    second.load_state_dict(stream.state_dict())
    it = iter(second)
    head += [next(it)["__key__"] for _ in range(7)]
    third = ShardStream(manifest, rank=0, world_size=1, seed=2)
    third.load_state_dict(second.state_dict())
    assert head + keys_of(third) == full


def consume(streams, counts):
    """Iterate each stream for its count; return the keys seen and each stream's state."""
    seen = []
    for stream, n in zip(streams, counts):
        it = iter(stream)
        seen += [next(it)["__key__"] for _ in range(n)]
    return seen, [s.state_dict() for s in streams]


@pytest.mark.parametrize("old, new", [(2, 3), (3, 2)])
def test_elastic_resume_from_one_rank_state_in_lockstep(manifest, all_keys, old, new):
    rng = random.Random(old * 10 + new)
    for _ in range(5):
        streams = [ShardStream(manifest, rank=r, world_size=old, seed=9) for r in range(old)]
        for s in streams:
            s.set_epoch(2)
        k = rng.randrange(streams[0].samples_per_rank + 1)
        seen, states = consume(streams, [k] * old)
        resumed = [ShardStream(manifest, rank=r, world_size=new, seed=9) for r in range(new)]
        rest = []
        for s in resumed:
            s.load_state_dict(states[0])  # rank 0's state is enough when ranks move together
            rest.append(keys_of(s))
        check_continuation(seen, rest, all_keys, old, new)


@pytest.mark.parametrize("old, new", [(2, 3), (3, 2)])
def test_elastic_resume_from_all_rank_states_at_any_progress(manifest, all_keys, old, new):
    rng = random.Random(old + new)
    for _ in range(5):
        streams = [ShardStream(manifest, rank=r, world_size=old, seed=4) for r in range(old)]
        seen, states = consume(streams, [rng.randrange(s.samples_per_rank + 1) for s in streams])
        resumed = [ShardStream(manifest, rank=r, world_size=new, seed=4) for r in range(new)]
        rest = []
        for s in resumed:
            s.load_state_dict(states)  # the list of every rank's state: merged, exact
            rest.append(keys_of(s))
        check_continuation(seen, rest, all_keys, old, new)
        assert merge_states(states)["cursor"] >= 0


def check_continuation(seen, rest, all_keys, old, new):
    """Nothing skipped; nothing replayed beyond the < world_size repeats of each segment; equal counts."""
    counts = Counter(seen + [k for keys in rest for k in keys])
    assert set(counts) == all_keys
    assert sum(counts.values()) - len(all_keys) < old + new
    assert len({len(keys) for keys in rest}) == 1


def test_state_of_another_run_is_refused(manifest):
    state = ShardStream(manifest, rank=0, world_size=1, seed=1).state_dict()
    other = ShardStream(manifest, rank=0, world_size=1, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_samples_carry_key_index_and_token_ids(manifest):
    sample = next(iter(ShardStream(manifest, rank=0, world_size=1, seed=0)))
    assert isinstance(sample["__key__"], str) and sample["__index__"] == 0
    assert sample["tgt"].dtype.name == "uint16" and len(sample["tgt"]) > 0
