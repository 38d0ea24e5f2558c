"""Collectives of the training loop on a real two-process gloo group: ranks with unequal
validation batch counts (token-budget batching) run the same number of forwards."""

from __future__ import annotations

import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.loop import equal_count


def _rank(rank: int, store: str, counts: list[int], out) -> None:
    # A file rendezvous: a port picked free and released first can be taken by another process before
    # rank 0 listens on it (EADDRINUSE, seen once in CI with the other xdist worker's Ray running).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(counts))
    try:
        out.put((rank, equal_count(counts[rank])))
    finally:
        dist.destroy_process_group()


def test_equal_count_is_the_minimum_over_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), [9, 8], out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == {0: 8, 1: 8}
    assert equal_count(5) == 5  # no process group: this rank's own count
