"""The one builder a trainer calls: config slices + rank → batches in a DataLoader.

    batcher = build_batcher(cfg.data, cfg.objective, rank=rank, world_size=world_size, seed=cfg.run.seed)
    loader = data_loader(batcher, num_workers=cfg.data.num_workers)
    consumed = Progress()
    for epoch in range(start_epoch, epochs):
        batcher.set_epoch(epoch)              # keeps a just-loaded position of this epoch
        for batch in loader:
            ...train on batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out...
            consumed.update(batch.indices)
            state = batcher.state_dict(consumed=consumed)   # at checkpoint time
        consumed = Progress()

Save every rank's state (e.g. gathered with `all_gather_object`) and give the
list to `load_state_dict`: then a resume on another world size replays and
skips nothing, whatever each rank consumed.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .batching import Batch, TokenBatcher
from .config import DataConfig, ObjectiveConfig
from .manifest import Manifest
from .objectives import build_objective
from .stream import ShardStream


def build_batcher(data: DataConfig, objective: ObjectiveConfig, *, rank: int, world_size: int, seed: int,
                  split: str | None = None) -> TokenBatcher:
    """Token-budget batches of `split` (default `data.split`) of the prepared data in `data.dir`."""
    manifest = Manifest.load(data.dir)
    stream = ShardStream(manifest.path, rank=rank, world_size=world_size, seed=seed, shuffle=data.shuffle,
                         split=split or data.split, remainder=data.remainder, verify=data.verify)
    noise = build_objective(objective, manifest.specials, seed=seed, fields=manifest.fields)
    return TokenBatcher(stream, noise, data.batch, seed=seed)


def data_loader(batcher: TokenBatcher, *, num_workers: int, pin_memory: bool = False) -> "BatchLoader":
    """Batches from a DataLoader over whole pools: the same batches in the same order for any
    `num_workers` (see `TokenBatcher.pool_batches`). Workers are not persistent, so `set_epoch` and
    `load_state_dict` reach them (each `iter(loader)` sends them the current stream)."""
    # Its own generator: every `iter(loader)` draws a base seed, which from the global RNG would
    # shift the model's dropout stream after a resume (exact resume needs the same draws).
    return BatchLoader(DataLoader(_Pools(batcher), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                  generator=torch.Generator().manual_seed(0)))


class _Pools(IterableDataset):
    def __init__(self, batcher: TokenBatcher):
        self.batcher = batcher

    def __iter__(self) -> Iterator[list[Batch]]:
        return self.batcher.pool_batches()


class BatchLoader:
    """Iterates a DataLoader of per-pool batch lists batch by batch."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        for batches in self.loader:
            yield from batches
