"""Collation, token-budget batches with length bucketing, over-long samples, batch-exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_pipeline import (BOS_ID, EOS_ID, PAD_ID, BatchConfig, DataConfig, Example, Manifest, ObjectiveConfig,
                           Progress, ShardStream, TokenBatcher, build_objective, collate, cut_batches, prepare)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching") / "data"
    prepare(DataConfig(dir=str(folder), task="restore", max_documents=8, vocab_size=300, num_sentinels=8,
                       shard_samples=16, valid_fraction=0.0, test_fraction=0.0), progress=False, use_ray=False)
    return Manifest.load(folder)


def example(i, src_len, tgt_len):
    return Example(f"k{i}", i, np.arange(10, 10 + src_len), np.arange(20, 20 + tgt_len))


def test_collate_adds_eos_and_bos_and_pads_to_a_multiple_of_8():
    batch = collate([example(0, 3, 2), example(1, 9, 5)], pad_multiple=8)
    assert batch.src.shape == (2, 16) and batch.tgt_in.shape == (2, 8) and batch.src.dtype == torch.int64
    assert batch.src[0, :4].tolist() == [10, 11, 12, EOS_ID] and batch.src[0, 4:].eq(PAD_ID).all()
    assert batch.tgt_in[0, :3].tolist() == [BOS_ID, 20, 21] and batch.tgt_out[0, :3].tolist() == [20, 21, EOS_ID]
    assert batch.src_lengths.tolist() == [4, 10] and batch.tgt_lengths.tolist() == [3, 6]
    assert torch.equal(batch.tgt_in[:, 1:][batch.tgt_out[:, :-1] != EOS_ID],
                       batch.tgt_out[:, :-1][batch.tgt_out[:, :-1] != EOS_ID])  # tgt_out is tgt_in shifted


def test_batches_respect_the_token_budget_and_bucket_by_length():
    rng = np.random.default_rng(0)
    exs = [example(i, int(rng.integers(1, 60)), int(rng.integers(1, 60))) for i in range(300)]
    cfg = BatchConfig(max_tokens=256, max_source_len=64, max_target_len=64, pool_size=300)
    batches = cut_batches(exs, cfg)
    assert sorted(e.key for b in batches for e in b) == sorted(e.key for e in exs)
    for b in batches:
        longest = max(max(len(e.src), len(e.tgt)) + 1 for e in b)
        assert len(b) * (-(-longest // 8) * 8) <= 256
    length = [[max(len(e.src), len(e.tgt)) for e in b] for b in batches]
    assert np.mean([max(x) - min(x) for x in length]) < 5  # bucketing: similar lengths together


def test_max_sentences_caps_the_batch_size():
    cfg = BatchConfig(max_tokens=4096, max_source_len=64, max_target_len=64, max_sentences=5)
    assert max(len(b) for b in cut_batches([example(i, 3, 3) for i in range(23)], cfg)) == 5


def test_batch_tensors_match_what_a_model_expects(manifest):
    stream = ShardStream(manifest.path, rank=0, world_size=1, seed=0)
    obj = build_objective(ObjectiveConfig(name="pairs"), manifest.specials, seed=0, fields=("src", "tgt"))
    batch = next(iter(TokenBatcher(stream, obj, BatchConfig(max_tokens=512, max_source_len=64,
                                                             max_target_len=64, pool_size=32), seed=0)))
    rows = torch.arange(len(batch))
    assert batch.src[rows, batch.src_lengths - 1].eq(EOS_ID).all()
    assert batch.tgt_in[:, 0].eq(BOS_ID).all() and batch.tgt_out[rows, batch.tgt_lengths - 1].eq(EOS_ID).all()
    assert batch.src.shape[1] % 8 == 0 and batch.tgt_in.shape == batch.tgt_out.shape
    assert len(batch) * max(batch.src.shape[1], batch.tgt_in.shape[1]) <= 512


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped_and_counted(manifest, policy):
    cfg = BatchConfig(max_tokens=256, max_source_len=24, max_target_len=24, pool_size=32, overlong=policy)
    stream = ShardStream(manifest.path, rank=0, world_size=1, seed=0)
    obj = build_objective(ObjectiveConfig(name="pairs"), manifest.specials, seed=0, fields=("src", "tgt"))
    batcher = TokenBatcher(stream, obj, cfg, seed=0)
    batches = list(batcher)
    over = sum(1 for s in stream if len(s["src"]) > 23 or len(s["tgt"]) > 23)
    assert over > 0
    assert all(b.src_lengths.max() <= 24 and b.tgt_lengths.max() <= 24 for b in batches)
    rows = sum(len(b) for b in batches)
    if policy == "truncate":
        assert batcher.num_truncated == sum(b.num_truncated for b in batches) == over and rows == len(stream)
    else:
        assert batcher.num_dropped == over and rows == len(stream) - over


@pytest.mark.parametrize("name", ["bart", "t5", "pairs"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_exact_resume_with_and_without_workers(manifest, name, num_workers):
    obj = build_objective(ObjectiveConfig(name=name), manifest.specials, seed=1, fields=("src", "tgt"))
    cfg = BatchConfig(max_tokens=384, max_source_len=64, max_target_len=64, pool_size=24)

    def batches(state=None, stop=None):
        batcher = TokenBatcher(ShardStream(manifest.path, rank=1, world_size=2, seed=3), obj, cfg, seed=1)
        if state is not None:
            batcher.load_state_dict(state)
        out, consumed = [], Progress()
        for batch in DataLoader(batcher, batch_size=None, num_workers=num_workers):
            out.append(batch)
            consumed.update(batch.indices)
            if len(out) == stop:
                return out, batcher.state_dict(consumed=consumed)
        return out, None

    def signature(bs):
        return sorted((tuple(b.keys), b.src.numpy().tobytes(), b.tgt_in.numpy().tobytes()) for b in bs)

    full, _ = batches()
    for stop in (1, 4):
        head, state = batches(stop=stop)
        tail, _ = batches(state=state)
        assert signature(head + tail) == signature(full)  # the same batches, noise included


@pytest.mark.parametrize("resume_after", [0, 3])
def test_the_loader_gives_the_same_batches_in_the_same_order_for_any_number_of_workers(manifest, resume_after):
    """DataLoader workers take whole pools; the loader hands them back in pool order: the training sequence
    does not depend on `data.num_workers` (a run resumed with another count continues the same sequence)."""
    from data_pipeline import data_loader

    obj = build_objective(ObjectiveConfig(name="bart"), manifest.specials, seed=1)
    cfg = BatchConfig(max_tokens=384, max_source_len=64, max_target_len=64, pool_size=12)

    def run(num_workers, state=None):
        batcher = TokenBatcher(ShardStream(manifest.path, rank=0, world_size=2, seed=3), obj, cfg, seed=1)
        if state is not None:
            batcher.load_state_dict(state)
        out = []
        for epoch in range(2):
            batcher.set_epoch(epoch)
            out += [(tuple(b.keys), b.src.numpy().tobytes()) for b in data_loader(batcher, num_workers=num_workers)]
        return out

    reference = run(0)
    assert len(reference) > 8 and len({keys for keys, _ in reference}) == len(reference)
    state = None
    if resume_after:  # consumed the first batches in one process; the rest with workers
        batcher = TokenBatcher(ShardStream(manifest.path, rank=0, world_size=2, seed=3), obj, cfg, seed=1)
        consumed = Progress()
        for batch, _ in zip(data_loader(batcher, num_workers=0), range(resume_after)):
            consumed.update(batch.indices)
        state, reference = batcher.state_dict(consumed=consumed), reference[resume_after:]
    for num_workers in (0, 2, 3):
        assert run(num_workers, state) == reference, num_workers


def test_build_batcher_from_config_slices(manifest):
    from data_pipeline import build_batcher, data_loader

    data = DataConfig(dir=str(manifest.folder), batch=BatchConfig(max_tokens=512, max_source_len=64,
                                                                  max_target_len=64, pool_size=16))
    batchers = [build_batcher(data, ObjectiveConfig(name="t5"), rank=r, world_size=2, seed=0) for r in range(2)]
    rows = [sum(len(b) for b in data_loader(batcher, num_workers=0)) for batcher in batchers]
    assert rows[0] == rows[1] == -(-manifest.data["splits"]["train"]["num_samples"] // 2)
