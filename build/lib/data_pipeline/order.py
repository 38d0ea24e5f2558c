"""The global sample order of an epoch and how it is split between ranks.

Pure functions of (shard sizes, seed, epoch, cursor, world size): every rank
computes the same order without talking to the others.

- **Global order.** Shards are permuted from `(seed, epoch)`, then the samples
  inside each shard from `(seed, epoch, shard)`; position `p` (0 ≤ p < N) of
  the epoch is the p-th sample of that concatenation.
- **Segment.** An epoch is played from a *segment start*: a cursor `c` (every
  position below it is consumed) and a few consumed positions `done` above it.
  A fresh epoch starts at `c = 0`; a resumed one where the state left off.
- **Rank split.** The positions still to play, `[c, N) − done`, in order, are
  made a multiple of the world size `W` (rule `repeat`: append the first
  positions of the order again, as torch's DistributedSampler does; rule
  `drop`: drop the last few), and rank `r` takes the `r`-th, `(r+W)`-th, …
  of them. Every rank gets the same count; every sample is played once per
  epoch apart from the < W repeated or dropped ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

REMAINDER_RULES = ("repeat", "drop")


@dataclass(frozen=True)
class EpochOrder:
    sizes: tuple[int, ...]
    """Samples in each shard, in manifest order."""
    seed: int
    epoch: int
    shuffle: bool = True

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @cached_property
    def shard_order(self) -> np.ndarray:
        """Shard indices in play order."""
        if not self.shuffle:
            return np.arange(len(self.sizes))
        return np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.sizes))

    @cached_property
    def _ends(self) -> np.ndarray:
        return np.cumsum(np.asarray(self.sizes, dtype=np.int64)[self.shard_order])

    def sample_order(self, shard: int) -> np.ndarray:
        """Sample indices of `shard` (in file order) in play order."""
        n = self.sizes[shard]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, 1, shard]).permutation(n)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset in play order within the shard) of each global position (taken mod N)."""
        p = np.asarray(positions, dtype=np.int64) % self.num_samples
        k = np.searchsorted(self._ends, p, side="right")
        starts = self._ends[k] - np.asarray(self.sizes, dtype=np.int64)[self.shard_order[k]]
        return self.shard_order[k], p - starts


@dataclass(frozen=True)
class Segment:
    """Where an epoch (re)starts: positions below `cursor` and those in `done` are consumed."""

    world_size: int
    cursor: int = 0
    done: tuple[int, ...] = field(default=())


def segment_positions(num_samples: int, segment: Segment, remainder: str) -> np.ndarray:
    """Global positions still to play, made a multiple of the world size (all ranks interleaved)."""
    real = np.arange(segment.cursor, num_samples, dtype=np.int64)
    if segment.done:
        real = real[~np.isin(real, np.asarray(segment.done, dtype=np.int64))]
    w = segment.world_size
    if remainder == "repeat":
        # Positions N, N+1, … stand for the first positions of the order (taken mod N).
        return np.concatenate([real, num_samples + np.arange((-len(real)) % w, dtype=np.int64)])
    return real[:len(real) - len(real) % w]


def rank_positions(num_samples: int, segment: Segment, rank: int, remainder: str) -> np.ndarray:
    """The global positions rank `rank` plays, in order."""
    return segment_positions(num_samples, segment, remainder)[rank::segment.world_size]


def compact(num_samples: int, segment: Segment, remainder: str, consumed: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """A new (cursor, done) from a boolean mask over `segment_positions` of what was consumed."""
    positions = segment_positions(num_samples, segment, remainder)
    unconsumed = np.flatnonzero(~consumed)
    cursor = int(positions[unconsumed[0]]) if len(unconsumed) else num_samples
    cursor = min(cursor, num_samples)  # repeated positions (>= N) are never carried over
    done = set(int(p) for p in positions[consumed] if cursor <= p < num_samples)
    done |= {p for p in segment.done if p >= cursor}
    return cursor, tuple(sorted(done))
