"""Samples/s of the data stream vs plain `tarfile` + `numpy.frombuffer` on the same shards.

Three readers over the same prepared shards, in one process, alternated in
the same run (best of `--repeats` passes each):

- plain tar:       tarfile.open → every member → extractfile().read() → np.frombuffer
                   (samples grouped by key; no shuffling, no batching);
- stream:          ShardStream (shuffled, rank split, resumable) → pairs as stored →
                   TokenBatcher (length bucketing, token budget, collation to tensors);
- stream + BART:   the same with BART text infilling (mask 0.3, Poisson 3.5).

    python benchmarks/stream_vs_raw_tar.py                 # prepares the built-in corpus in a temp dir
    python benchmarks/stream_vs_raw_tar.py --data data/builtin --repeats 5

Target: the stream without noising at least 1.0x the plain reader.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline import (BatchConfig, DataConfig, Manifest, ObjectiveConfig, ShardStream, TokenBatcher,
                           build_objective, prepare)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a prepared folder (default: prepare the built-in corpus into a temp dir)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per reader (best one counts)")
    p.add_argument("--max-tokens", type=int, default=4096, help="batch token budget of the stream")
    return p.parse_args()


def plain_tar(paths: list[Path], dtype: np.dtype) -> int:
    """Read every sample with tarfile + np.frombuffer; returns the number of samples."""
    samples, last_key = 0, None
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                ids = np.frombuffer(tar.extractfile(member).read(), dtype=dtype)
                key = member.name.split(".", 1)[0]
                samples += key != last_key
                last_key = key
                del ids
    return samples


def stream_batches(manifest: Manifest, objective_name: str, max_tokens: int) -> int:
    """Read, decode, noise (or not), bucket and collate; returns the number of samples batched."""
    stream = ShardStream(manifest.path, rank=0, world_size=1, seed=0)
    objective = build_objective(ObjectiveConfig(name=objective_name), manifest.specials, seed=0,
                                fields=tuple(manifest.data["fields"]))
    cfg = BatchConfig(max_tokens=max_tokens, max_source_len=512, max_target_len=512)
    return sum(len(batch) for batch in TokenBatcher(stream, objective, cfg, seed=0))


def best_rate(run: Callable[[], int], repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or str(Path(tmp) / "builtin")
        if not args.data:
            prepare(DataConfig(dir=folder, vocab_size=8000, shard_samples=2000), progress=False, use_ray=False)
        manifest = Manifest.load(folder)
        paths = [s.path for s in manifest.shards()]
        dtype = np.dtype(manifest.dtype).newbyteorder("<")
        readers = {
            "plain tarfile + np.frombuffer": lambda: plain_tar(paths, dtype),
            "ShardStream → batches (no noise)": lambda: stream_batches(manifest, "pairs", args.max_tokens),
            "ShardStream → BART noise → batches": lambda: stream_batches(manifest, "bart", args.max_tokens),
        }
        for run in readers.values():
            run()  # warm the page cache and imports
        rates = {name: 0.0 for name in readers}
        for _ in range(args.repeats):  # alternate readers so that machine noise hits all of them
            for name, run in readers.items():
                rates[name] = max(rates[name], best_rate(run, 1))
    base = rates["plain tarfile + np.frombuffer"]
    print(f"{manifest.data['num_samples']} samples, {len(paths)} shards, {manifest.data['num_tokens']} tokens "
          f"({manifest.data['task']}: src+tgt per sample)")
    print(f"{'reader':<38} {'samples/s':>12} {'vs plain':>9}")
    for name, rate in rates.items():
        print(f"{name:<38} {rate:>12,.0f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
