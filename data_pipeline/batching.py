"""Token-budget batches with length bucketing, and collation to padded tensors.

`TokenBatcher` turns a `ShardStream` into batches: each sample goes through
the objective and the length limits (truncate or drop, counted), then a
*pool* of `pool_size` consecutive samples of the rank's sequence is sorted by
length and cut greedily into batches of at most `max_tokens` (batch size x
padded longest source/target), which come out in a shuffled order.

Pools are aligned to the stream's `__index__` (pool j = indices j·P … j·P+P-1,
one DataLoader worker per pool), and the greedy cut of a sorted pool is
unchanged when whole batches are removed from it. So after an exact resume
(stream state from the consumed batches' `indices`) the rest of a half-used
pool is cut into exactly the batches it had left.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .config import BatchConfig
from .objectives import Example, Objective, PairPassThrough
from .stream import Progress, ShardStream
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Batch:
    src: torch.Tensor
    """(B, S) int64 source ids, each row ending with eos, pad 0; S a multiple of pad_multiple."""
    src_lengths: torch.Tensor
    """(B,) int64 source lengths, eos included."""
    tgt_in: torch.Tensor
    """(B, T) int64 decoder input: bos + target, pad 0."""
    tgt_out: torch.Tensor
    """(B, T) int64 decoder labels: target + eos, pad 0."""
    tgt_lengths: torch.Tensor
    """(B,) int64 target lengths (bos or eos included, once)."""
    keys: list[str] = field(default_factory=list)
    """Sample keys, row by row."""
    indices: list[int] = field(default_factory=list)
    """Stream `__index__` values this batch accounts for: its rows and samples dropped before it."""
    num_truncated: int = 0
    """Samples of this batch cut to the length limits."""
    num_dropped: int = 0
    """Over-long samples dropped (counted in the batch that follows them)."""
    bad_shards: tuple[str, ...] = ()
    """Shards first found unreadable, in the process that read this batch, since its previous batch."""
    num_bad_samples: int = 0
    """Samples skipped as bad (ids outside the vocabulary, a missing field) since the previous batch.
    These two carry the stream's counts out of DataLoader worker processes, whose stream is a copy."""

    def __len__(self) -> int:
        return self.src.shape[0]

    @property
    def num_tokens(self) -> int:
        """Target tokens that carry a loss (eos included)."""
        return int(self.tgt_lengths.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(examples: Sequence[Example], *, pad_multiple: int = 8) -> Batch:
    """Examples → Batch: src + eos, bos + tgt, tgt + eos; padded with 0 to a multiple of `pad_multiple`."""
    src_len = np.array([len(e.src) + 1 for e in examples], dtype=np.int64)
    tgt_len = np.array([len(e.tgt) + 1 for e in examples], dtype=np.int64)
    n = len(examples)
    src = np.full((n, round_up(int(src_len.max()), pad_multiple)), PAD_ID, dtype=np.int64)
    tgt_in = np.full((n, round_up(int(tgt_len.max()), pad_multiple)), PAD_ID, dtype=np.int64)
    tgt_out = np.full_like(tgt_in, PAD_ID)
    for i, e in enumerate(examples):
        s, t = len(e.src), len(e.tgt)
        src[i, :s] = e.src
        src[i, s] = EOS_ID
        tgt_in[i, 0] = BOS_ID
        tgt_in[i, 1:t + 1] = e.tgt
        tgt_out[i, :t] = e.tgt
        tgt_out[i, t] = EOS_ID
    return Batch(torch.from_numpy(src), torch.from_numpy(src_len), torch.from_numpy(tgt_in),
                 torch.from_numpy(tgt_out), torch.from_numpy(tgt_len),
                 keys=[e.key for e in examples], indices=[e.index for e in examples])


def cut_batches(examples: list[Example], cfg: BatchConfig) -> list[list[Example]]:
    """Sort by length and cut greedily so that size x padded longest length <= max_tokens."""
    ordered = sorted(examples, key=lambda e: (_length(e), e.index, e.key))
    batches: list[list[Example]] = []
    current: list[Example] = []
    for ex in ordered:
        padded = round_up(_length(ex), cfg.pad_multiple)  # the longest so far: the list is sorted
        full = cfg.max_sentences and len(current) == cfg.max_sentences
        if current and (full or (len(current) + 1) * padded > cfg.max_tokens):
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    return batches


def _length(ex: Example) -> int:
    return max(len(ex.src), len(ex.tgt)) + 1


@dataclass
class _Pool:
    examples: list[Example] = field(default_factory=list)
    truncated: set[int] = field(default_factory=set)
    dropped: list[int] = field(default_factory=list)

    def add(self, index: int, ex: Example | None, over: bool) -> None:
        if ex is None:
            self.dropped.append(index)
            return
        self.examples.append(ex)
        if over:
            self.truncated.add(index)

    def __bool__(self) -> bool:
        return bool(self.examples or self.dropped)


class TokenBatcher(IterableDataset):
    """Batches of a rank's stream; use as a DataLoader dataset with `batch_size=None`.

    Counters `num_truncated`/`num_dropped` count what this process saw; with
    DataLoader workers sum `Batch.num_truncated`/`num_dropped`/`num_bad_samples`
    and unite `Batch.bad_shards` instead.
    """

    def __init__(self, stream: ShardStream, objective: Objective, cfg: BatchConfig, *, seed: int):
        super().__init__()
        self.stream, self.objective, self.cfg, self.seed = stream, objective, cfg, seed
        self.num_truncated = 0
        self.num_dropped = 0
        self._progress = Progress()
        # Noising objectives build the source from the clean text: cut the text to fit both sides.
        self._text_limit = min(cfg.max_source_len, cfg.max_target_len) - 1

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self._progress = Progress()

    def state_dict(self, consumed: Progress | None = None) -> dict:
        """The stream state after the batches yielded here (or after `consumed`: `Batch.indices` seen)."""
        return self.stream.state_dict(consumed=self._progress if consumed is None else consumed)

    def load_state_dict(self, state: dict | list[dict]) -> None:
        self.stream.load_state_dict(state)
        self._progress = Progress()

    def __iter__(self) -> Iterator[Batch]:
        for batches in self.pool_batches():
            yield from batches

    def pool_batches(self) -> Iterator[list[Batch]]:
        """The batches of each pool this process plays, one list per pool (an empty one too). DataLoader
        workers take pools in turn and the DataLoader takes one item from each in turn, so lists come back
        in pool order: the batches are those of one process, in its order, whatever `num_workers`."""
        self._progress = progress = Progress()
        dropped: list[int] = []  # accounted for by the next batch (a pool may drop all it holds)
        stream = self.stream
        reported, bad_samples = set(stream.unreadable), stream.num_bad_samples
        for pool in self._pools():
            dropped += pool.dropped
            batches = []
            for group in self._ordered(cut_batches(pool.examples, self.cfg)):
                batch = collate(group, pad_multiple=self.cfg.pad_multiple)
                batch.num_truncated = sum(1 for e in group if e.index in pool.truncated)
                batch.indices += dropped
                batch.num_dropped, dropped = len(dropped), []
                batch.bad_shards = tuple(s for s in stream.unreadable if s not in reported)
                batch.num_bad_samples, bad_samples = stream.num_bad_samples - bad_samples, stream.num_bad_samples
                reported.update(batch.bad_shards)
                progress.update(batch.indices)
                batches.append(batch)
            yield batches

    def _pools(self) -> Iterator["_Pool"]:
        """Pools of examples, aligned to `__index__ // pool_size`: one for each block of this process's
        share, empty where nothing of it could be read."""
        size = self.cfg.pool_size
        pool_ids = iter(np.unique(self.stream.share(size) // size).tolist())
        pool, pool_id = _Pool(), next(pool_ids, None)
        for sample in self.stream.samples(block=size):
            index = sample["__index__"]
            while index // size != pool_id:
                yield pool
                pool, pool_id = _Pool(), next(pool_ids)
            pool.add(index, *self._example(sample))
        if pool_id is not None:
            yield pool
            yield from (_Pool() for _ in pool_ids)

    def _example(self, sample: dict) -> tuple[Example | None, bool]:
        """The objective's example within the length limits (None if dropped), and whether it was cut."""
        cut = self._cut_sample(sample)
        over = cut is not sample
        if not over or self.cfg.overlong == "truncate":
            ex = self.objective(cut, epoch=self.stream.epoch)
            src_max, tgt_max = self.cfg.max_source_len - 1, self.cfg.max_target_len - 1
            if len(ex.src) <= src_max and len(ex.tgt) <= tgt_max:
                return self._count(ex, over)
            over = True  # noise can lengthen a source a little
            if self.cfg.overlong == "truncate":
                return self._count(Example(ex.key, ex.index, ex.src[:src_max], ex.tgt[:tgt_max]), over)
        self.num_dropped += 1
        return None, True

    def _count(self, ex: Example, truncated: bool) -> tuple[Example, bool]:
        self.num_truncated += truncated
        return ex, truncated

    def _cut_sample(self, sample: dict) -> dict:
        """`sample` itself if within the limits, else a copy cut to them."""
        limits = {"tgt": self.cfg.max_target_len - 1, "src": self.cfg.max_source_len - 1}
        if not isinstance(self.objective, PairPassThrough):
            limits = {"tgt": self._text_limit}
        over = {k: n for k, n in limits.items() if k in sample and len(sample[k]) > n}
        if not over:
            return sample
        return {**sample, **{k: sample[k][:n] for k, n in over.items()}}

    def _ordered(self, batches: list[list[Example]]) -> list[list[Example]]:
        """Batches in a shuffled order that depends only on (seed, epoch, each batch's first key)."""
        def rank(batch: list[Example]) -> bytes:
            return hashlib.blake2b(f"{self.seed}/{self.stream.epoch}/{batch[0].key}".encode(), digest_size=8).digest()

        return sorted(batches, key=rank)
