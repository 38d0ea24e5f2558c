"""Elastic resume from any step of a step-based run whose ranks drift into different epochs.

Token-budget batching gives ranks unequal batch counts per epoch, and the
training loop takes one batch a rank a step, so ranks stand in different
epochs at most steps. Pure data pipeline, no Ray: the ranks below step as
`trainers/loop.py`'s `Worker.batches` does.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from data_pipeline import (BatchConfig, DataConfig, Manifest, PairPassThrough, Progress, ShardStream, TokenBatcher,
                           merge_states, prepare)

SEED = 3
STEPS = 120
BATCH = BatchConfig(max_tokens=96, max_source_len=64, max_target_len=64, pool_size=6)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    """90 pairs of very unequal lengths: the ranks' batch counts per epoch differ by up to ~10%."""
    folder = tmp_path_factory.mktemp("elastic")
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([2, 3, 25, 40]))) + f" {i}" for i in range(90)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"src": t.upper(), "tgt": t}) + "\n" for t in texts))
    prepare(DataConfig(dir=str(folder / "data"), task="pairs", sources=[str(folder / "pairs.jsonl")],
                       vocab_size=300, num_sentinels=4, shard_samples=10, valid_fraction=0.0, test_fraction=0.0),
            progress=False, use_ray=False)
    return Manifest.load(folder / "data")


@pytest.fixture(scope="module")
def all_keys(manifest) -> set[str]:
    return {s["__key__"] for s in ShardStream(manifest.path, rank=0, world_size=1, seed=0, shuffle=False)}


class Rank:
    """One rank of the step-based loop: epoch after epoch, one batch a step, recording what it trained on."""

    def __init__(self, manifest: Manifest, rank: int, world_size: int, state=None):
        stream = ShardStream(manifest.path, rank=rank, world_size=world_size, seed=SEED, verify="size")
        self.batcher = TokenBatcher(stream, PairPassThrough(), BATCH, seed=SEED)
        if state is not None:
            self.batcher.load_state_dict(state)
        self.consumed = Progress()
        self.seen: list[tuple[int, str]] = []  # (epoch, key) of every sample trained on
        self._batches = self._forever()

    def _forever(self):
        epoch = self.batcher.stream.epoch
        while True:
            self.batcher.set_epoch(epoch)
            self.consumed = Progress()
            for batch in self.batcher:
                self.consumed.update(batch.indices)
                yield epoch, batch
            epoch += 1

    @property
    def epoch(self) -> int:
        return self.batcher.stream.epoch

    def step(self) -> None:
        epoch, batch = next(self._batches)
        self.seen += [(epoch, key) for key in batch.keys]

    def state(self) -> dict:
        return self.batcher.state_dict(consumed=self.consumed)


@pytest.fixture(scope="module")
def drifting_run(manifest):
    """A 2-rank run of STEPS steps: after every step, each rank's state and what it trained on so far."""
    ranks = [Rank(manifest, r, 2) for r in range(2)]
    checkpoints = []
    for step in range(1, STEPS + 1):
        for r in ranks:
            r.step()
        checkpoints.append((step, [r.state() for r in ranks], [list(r.seen) for r in ranks]))
    return checkpoints


def test_the_ranks_do_drift_into_different_epochs(drifting_run):
    apart = {min(s["epoch"] for s in states): step for step, states, _ in drifting_run
             if len({s["epoch"] for s in states}) > 1}
    assert len(apart) >= 3, "ranks must stand in different epochs at several epoch ends for the tests to mean much"
    assert max(s["epoch"] for _, states, _ in drifting_run for s in states) >= 3


@pytest.mark.parametrize("new_world, own", [(1, False), (2, False), (3, False), (2, True)],
                         ids=["2to1", "2to2-merged", "2to3", "2to2-own-state"])
def test_resume_from_every_step_finishes_each_begun_epoch_exactly_once(manifest, all_keys, drifting_run, new_world,
                                                                       own):
    """At every step: the old ranks' samples of each epoch they began plus the new ranks' samples of it
    cover that epoch as an uninterrupted run would (nothing lost, nothing twice beyond the repeat rule)."""
    n, old_world = len(all_keys), 2
    for step, states, seen_before in drifting_run:
        lo, hi = min(s["epoch"] for s in states), max(s["epoch"] for s in states)
        resumed = [Rank(manifest, r, new_world, state=states[r] if own else states) for r in range(new_world)]
        if not own:
            assert {r.epoch for r in resumed} == {lo}, f"step {step}: the new ranks start level, in epoch {lo}"
        for r in resumed:
            while r.epoch <= hi:
                r.step()
        for epoch in range(lo, hi + 1):
            played = Counter(key for seen in seen_before + [r.seen for r in resumed]
                             for e, key in seen if e == epoch)
            assert set(played) == all_keys, f"step {step}, epoch {epoch}: {len(all_keys - set(played))} lost"
            # An uninterrupted run repeats < W samples of an epoch (remainder=repeat); a resume adds < W' more.
            assert sum(played.values()) - n <= (old_world - 1) + (0 if own else new_world - 1), \
                f"step {step}, epoch {epoch}: {sum(played.values()) - n} samples played twice"


def test_a_merged_state_of_ranks_in_different_epochs_carries_the_later_epochs(drifting_run):
    step, states, _ = next(c for c in drifting_run if len({s["epoch"] for s in c[1]}) > 1)
    merged = merge_states(states)
    lo, hi = sorted(s["epoch"] for s in states)
    assert merged["epoch"] == lo and [s["epoch"] for s in merged["segments"]] == list(range(lo + 1, hi + 1))
    assert merge_states(list(reversed(states))) == merged


def test_a_resumed_run_can_be_checkpointed_and_resumed_again(manifest, all_keys, drifting_run):
    """2 ranks → 3 (mid-drift) → after more steps → 1: each epoch still finished exactly once overall."""
    step, states, seen_before = next(c for c in drifting_run[10:] if len({s["epoch"] for s in c[1]}) > 1)
    middle = [Rank(manifest, r, 3, state=states) for r in range(3)]
    for _ in range(7):
        for r in middle:
            r.step()
    states2 = [r.state() for r in middle]
    lo, hi = min(s["epoch"] for s in states), max(s["epoch"] for s in states + states2)
    last = Rank(manifest, 0, 1, state=states2)
    while last.epoch <= hi:
        last.step()
    for epoch in range(lo, hi + 1):
        played = Counter(key for seen in seen_before + [r.seen for r in middle] + [last.seen]
                         for e, key in seen if e == epoch)
        assert set(played) == all_keys
        assert sum(played.values()) - len(all_keys) <= 1 + 2 + 0
