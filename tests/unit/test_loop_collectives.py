"""Collectives of the training loop on a real two-process gloo group: ranks with unequal
validation batch counts (token-budget batching) run the same number of forwards."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.loop import equal_count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, counts: list[int], out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(counts))
    try:
        out.put((rank, equal_count(counts[rank])))
    finally:
        dist.destroy_process_group()


def test_equal_count_is_the_minimum_over_ranks():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, [9, 8], out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == {0: 8, 1: 8}
    assert equal_count(5) == 5  # no process group: this rank's own count
