"""`ShardStream`: a rank's share of a prepared dataset, shuffled, balanced and resumable.

Order and rank split: see `data_pipeline.order` (a global order per
(seed, epoch); rank r takes every W-th remaining position; equal counts by
repeating or dropping < W samples).

State. `state_dict()` describes this rank: its epoch, the segment it started
that epoch from, how many samples of its sequence it has consumed (a prefix)
and the few indices consumed beyond that prefix (a consumer that reorders,
such as length bucketing, uses samples out of order), plus `segments`: the
segment starts of other epochs that do not start from scratch (see below).
`load_state_dict(state)`:
- the rank's own state, same world size → **exact resume**: exactly the rest
  of its sequence, in its own epoch;
- anything else (another rank's state, another world size) → **elastic
  resume**: the state is turned into a global cursor and the remaining
  positions are split over the new world size. From one rank's state this
  assumes ranks moved in lockstep (same epoch, same number of samples
  consumed); pass the list of every rank's state (or `merge_states(states)`)
  and nothing is replayed or skipped whatever each rank consumed.

Ranks in different epochs. Ranks do not finish an epoch together: token-budget
batching gives them unequal batch counts, and a step-based loop takes one
batch a rank a step, so a rank with fewer batches moves on first (and the gap
grows epoch after epoch). A state is therefore taken with rank r in epoch
e_r. Merging every rank's state gives, for each epoch e from min(e_r) to
max(e_r), the set of its global positions consumed so far: a rank past e
consumed its whole share of e, a rank in e its prefix and extras, a rank
before e nothing. The merged state starts at e_min with that epoch's
remaining positions and carries the other epochs' consumed sets as
`segments` ({epoch, cursor, done}: every position below `cursor` or in `done`
is consumed). A stream keeps them: `set_epoch(e)` plays only what epoch e has
left. So after a resume on any world size from any step, every epoch the old
ranks had begun is finished exactly once (apart from the < W repeated or
dropped positions of the `remainder` rule, per segment), and later epochs
start from scratch. The new ranks start level, in epoch e_min.

Untrusted shards. A shard that is missing, of the wrong size or sha256, over
`max_shard_bytes`, or malformed is skipped with a `CorruptShardWarning` and
counted (`num_bad_shards`); a sample whose token ids are not all below the
manifest's `vocab_size`, or that lacks one of the manifest's fields, is skipped
with a warning and counted (`num_bad_samples`; it counts as played, so a resume
does not meet it again). Every shard bad → `NoReadableShardsError` up front,
or, when only reading finds out (`verify=size`, remote shards), at the end of
the first pass that yields nothing: never an endless loop over empty epochs.

Workers. Inside a DataLoader each worker plays a sub-slice of the rank's
sequence (round-robin by sample, or by blocks of `block` samples). Samples
carry `__index__`, their index in the rank's sequence; the stream object in
the training process never sees the workers' progress, so the consumer passes
what it consumed: `state_dict(consumed=indices)` (a `Progress` or any iterable
of `__index__` values since the last `load_state_dict`/`set_epoch`). Without
workers, iterating the stream records progress itself.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .manifest import Manifest, ShardInfo
from .order import REMAINDER_RULES, EpochOrder, Segment, compact, rank_positions, segment_positions
from .shards import MAX_SHARD_BYTES, ShardCorrupt, over_cap, read_shard, sha256_file
from .storage import is_remote

STATE_VERSION = 1


class CorruptShardWarning(UserWarning):
    """A shard was skipped because it is missing, truncated or altered."""


class NoReadableShardsError(RuntimeError):
    """Every shard of the stream is missing, truncated or altered."""


class Progress:
    """Which indices of a rank's sequence are consumed: a prefix count and the few beyond it."""

    def __init__(self, prefix: int = 0, extra: Iterable[int] = ()):
        self.prefix = prefix
        self.extra: set[int] = set()
        self.update(extra)

    def add(self, index: int) -> None:
        if index == self.prefix:
            self.prefix += 1
            while self.prefix in self.extra:
                self.extra.remove(self.prefix)
                self.prefix += 1
        elif index > self.prefix:
            self.extra.add(index)

    def update(self, indices: Iterable[int]) -> "Progress":
        for i in indices:
            self.add(int(i))
        return self

    def __contains__(self, index: int) -> bool:
        return index < self.prefix or index in self.extra

    def __len__(self) -> int:
        return self.prefix + len(self.extra)

    def copy(self) -> "Progress":
        return Progress(self.prefix, self.extra)

    def union(self, other: "Progress") -> "Progress":
        return Progress(max(self.prefix, other.prefix), self.extra | other.extra)


class ShardStream(IterableDataset):
    """An iterable over rank `rank`'s samples of a prepared dataset.

    Each sample is a dict: `__key__` (unique in the dataset), `__index__` (its
    index in this rank's sequence for the current segment), `tgt` and, for
    pair datasets, `src` (read-only numpy arrays of token ids, no bos/eos).

    Args:
        manifest: path of manifest.json (or of the folder holding it).
        rank, world_size: this rank and the number of ranks.
        seed: shuffles shard and sample order together with the epoch.
        shuffle: False plays shards and samples in manifest order.
        split: `train`, `valid`, `test`, or None for every shard of the manifest.
        remainder: `repeat` (default) or `drop`: how every rank gets the same count.
        verify: `sha256` checks every byte of every shard up front, `size` only the sizes.
        max_shard_bytes: a larger shard is skipped unread (it would be held in memory whole).
    """

    def __init__(self, manifest: str | Path, *, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 split: str | None = None, remainder: str = "repeat", verify: str = "sha256",
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        super().__init__()
        _check_args(rank, world_size, seed, remainder, verify)
        self.manifest = Manifest.load(manifest)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.split, self.remainder, self.max_shard_bytes = split, remainder, max_shard_bytes
        self.vocab_size = int(self.manifest.data["vocab_size"])
        self.fields = tuple(self.manifest.data.get("fields", ["tgt"]))
        # Remote shards are hashed as they are read (one download each), not all up front on every rank.
        self._sha256_on_read = verify == "sha256" and self.manifest.is_remote
        upfront = "size" if self._sha256_on_read else verify
        self.shards, self.bad_shards = usable_shards(self.manifest.shards(split), upfront, max_shard_bytes)
        self._check_headers = verify != "sha256"  # after a sha256 check, tar header checksums add nothing
        if not self.shards:
            raise NoReadableShardsError(f"{self.manifest.path}: no readable shard"
                                        + (f" in split {split!r}" if split else "") + ": "
                                        + "; ".join(self.bad_shards.values() or ["the split is empty"]))
        self.num_samples_total = sum(s.samples for s in self.shards)
        self.epoch = 0
        self.unreadable: dict[str, str] = {}  # shard -> why it failed while being read in this process (warned)
        self.num_bad_samples = 0  # samples skipped in this process: ids outside the vocabulary, missing fields
        self._segments: dict[int, tuple[int, tuple[int, ...]]] = {}  # epoch -> (cursor, done) not from scratch
        self._restart(self._segment_of(0), Progress())

    # --- counters ---------------------------------------------------------------

    @property
    def num_bad_shards(self) -> int:
        """Shards skipped because they are missing, truncated or altered."""
        return len(self.bad_shards) + len(self.unreadable)

    @property
    def samples_per_rank(self) -> int:
        """Samples every rank plays in the current segment (the same for all ranks)."""
        return len(self._positions())

    def __len__(self) -> int:
        """Samples this rank has still to play from the current start point."""
        n = self.samples_per_rank
        return n - min(self._start.prefix, n) - sum(1 for i in self._start.extra if i < n)

    # --- epoch and state -------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Play epoch `epoch` from its beginning, or from what a merged state left of it (no-op if it
        is the current epoch, e.g. after a resume)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._restart(self._segment_of(epoch), Progress())

    def _segment_of(self, epoch: int) -> Segment:
        cursor, done = self._segments.get(epoch, (0, ()))
        return Segment(self.world_size, cursor, done)

    def state_dict(self, consumed: Progress | Iterable[int] | int | None = None) -> dict:
        """This rank's position after what this object yielded itself, or after `consumed`: the
        `__index__` values the consumer used (a Progress or an iterable), or a count of samples
        taken in stream order (a DataLoader with `batch_size=None` keeps that order)."""
        if consumed is None:
            progress = self._progress
        elif isinstance(consumed, Progress):
            progress = self._start.union(consumed)
        elif isinstance(consumed, int):
            progress = self._start.copy().update(self._remaining_indices(self.samples_per_rank)[:consumed])
        else:
            progress = self._start.copy().update(consumed)
        return {**self._identity(), "epoch": self.epoch, "world_size": self._segment.world_size,
                "cursor": self._segment.cursor, "done": list(self._segment.done), "rank": self.rank,
                "consumed": progress.prefix, "extra": sorted(progress.extra),
                "segments": _segment_list(self._segments)}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue from `state` (this rank's, another rank's, or a list of every rank's)."""
        if isinstance(state, (list, tuple)):
            state = merge_states(list(state))
        self._check_identity(state)
        self.epoch = state["epoch"]
        self._segments = _segment_dict(state.get("segments", []))
        if state["rank"] == self.rank and state["world_size"] == self.world_size:
            segment = Segment(self.world_size, state["cursor"], tuple(state["done"]))
            self._restart(segment, Progress(state["consumed"], state["extra"]))
        else:
            cursor, done = global_cursor(state)
            self._segments = {e: seg for e, seg in self._segments.items() if e > self.epoch}
            self._segments[self.epoch] = (cursor, done)
            self._restart(self._segment_of(self.epoch), Progress())

    def _identity(self) -> dict:
        digest = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]
        return {"version": STATE_VERSION, "seed": self.seed, "shuffle": self.shuffle, "remainder": self.remainder,
                "num_samples": self.num_samples_total, "shards": digest}

    def _check_identity(self, state: dict) -> None:
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"stream state does not fit this stream: {key} is {state.get(key)!r} "
                                 f"in the state, {value!r} here")

    def _restart(self, segment: Segment, start: Progress) -> None:
        self._segment, self._start, self._progress = segment, start, start.copy()

    # --- iteration -----------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        return self.samples()

    def samples(self, block: int = 1) -> Iterator[dict]:
        """This rank's samples from the start point; DataLoader workers take blocks of `block` in turn."""
        for problem in self.bad_shards.values():  # warned at construction too; again for each pass's logs
            warnings.warn(f"skipping shard {problem}", CorruptShardWarning, stacklevel=2)
        positions = self._positions()
        indices = self.share(block, positions)
        order = EpochOrder(tuple(s.samples for s in self.shards), self.seed, self.epoch, self.shuffle)
        shards, offsets = order.locate(positions[indices])
        self._progress = progress = self._start.copy()
        reader = _ShardCache(self, order)
        yielded = 0
        for index, shard, offset in zip(indices.tolist(), shards.tolist(), offsets.tolist()):
            sample = reader.get(shard, offset)
            progress.add(index)  # a sample of an unreadable shard counts as played
            if sample is not None:
                yielded += 1
                yield {**sample, "__index__": index}
        if not yielded and len(indices) and reader.failed:
            reader.check_any_usable()  # else every later epoch would be empty too: stop, don't spin

    def share(self, block: int = 1, positions: np.ndarray | None = None) -> np.ndarray:
        """The `__index__` values this process plays from the start point, in order: all of the rank's,
        or in a DataLoader worker its blocks of `block` (every num_workers-th block)."""
        n = len(self._positions() if positions is None else positions)
        return self._worker_share(self._remaining_indices(n), block)

    def _positions(self) -> np.ndarray:
        return rank_positions(self.num_samples_total, self._segment, self.rank, self.remainder)

    def _remaining_indices(self, n: int) -> np.ndarray:
        rest = np.arange(min(self._start.prefix, n), n)
        return rest[~np.isin(rest, list(self._start.extra))] if self._start.extra else rest

    @staticmethod
    def _worker_share(indices: np.ndarray, block: int) -> np.ndarray:
        info = get_worker_info()
        if info is None or info.num_workers == 1 or len(indices) == 0:
            return indices
        if block == 1:
            slots = np.arange(len(indices))  # keeps DataLoader's round-robin output in sequence order
        else:
            slots = indices // block - indices[0] // block  # whole blocks stay with one worker
        return indices[slots % info.num_workers == info.id]


class _ShardCache:
    """Reads the shard a position falls in, keeping the last one; skips unreadable shards and bad samples."""

    def __init__(self, stream: ShardStream, order: EpochOrder):
        self.stream, self.order = stream, order
        self.shard, self.samples, self.sample_order = -1, None, None
        self.bad: set[int] = set()  # file-order indices of the current shard's bad samples
        self.failed: dict[int, str] = {}  # shard -> why it is unusable

    def get(self, shard: int, offset: int) -> dict | None:
        if shard in self.failed:
            return None
        if shard != self.shard:
            if not self._load(shard):
                return None
        i = self.sample_order[offset]
        if i in self.bad:
            self.stream.num_bad_samples += 1
            return None
        return self.samples[i]

    def _load(self, shard: int) -> bool:
        info = self.stream.shards[shard]
        try:
            samples = read_shard(info.path, expect_samples=info.samples, check_headers=self.stream._check_headers,
                                 sha256=info.sha256 if self.stream._sha256_on_read else None,
                                 max_bytes=self.stream.max_shard_bytes)
            bad = bad_samples(samples, self.stream.fields, self.stream.vocab_size)
            if bad and len(bad) == len(samples):
                raise ShardCorrupt(f"{info.path}: no usable sample ({bad_reason(samples, bad, self.stream)})")
        except ShardCorrupt as err:
            warnings.warn(f"skipping unreadable shard {err}", CorruptShardWarning, stacklevel=4)
            self.stream.unreadable[str(info.path)] = str(err)
            self.failed[shard] = str(err)
            return False
        if bad:
            warnings.warn(f"skipping {info.path}: {len(bad)} sample{'s' * (len(bad) > 1)} "
                          f"{bad_reason(samples, bad, self.stream)}", CorruptShardWarning, stacklevel=4)
        self.shard, self.samples, self.bad, self.sample_order = shard, samples, bad, self.order.sample_order(shard)
        return True

    def check_any_usable(self) -> None:
        """NoReadableShardsError unless some shard of the stream (tried now if not yet) has a usable sample."""
        for shard in range(len(self.stream.shards)):
            if shard not in self.failed and (shard == self.shard or self._load(shard)):
                return
        problems = [*self.stream.bad_shards.values(), *self.failed.values()]
        raise NoReadableShardsError(f"{self.stream.manifest.path}: rank {self.stream.rank} has no readable shard: "
                                    + "; ".join(problems))


def bad_samples(samples: list[dict], fields: tuple[str, ...], vocab_size: int) -> set[int]:
    """File-order indices of samples that lack a field or hold a token id >= vocab_size."""
    return {i for i, s in enumerate(samples)
            if any(f not in s or (len(s[f]) and int(s[f].max()) >= vocab_size) for f in fields)}


def bad_reason(samples: list[dict], bad: set[int], stream: ShardStream) -> str:
    missing = sum(1 for i in bad if any(f not in samples[i] for f in stream.fields))
    parts = [f"with token ids >= {stream.vocab_size} (the vocabulary)"] if len(bad) > missing else []
    parts += [f"without a field of {list(stream.fields)}"] if missing else []
    return " or ".join(parts)


def usable_shards(shards: list[ShardInfo], verify: str,
                  max_bytes: int = MAX_SHARD_BYTES) -> tuple[list[ShardInfo], dict[str, str]]:
    """Shards that pass the check, and {path: reason} for those that do not (each warned about)."""
    good, bad = [], {}
    sizes = remote_sizes(shards) if shards and is_remote(shards[0].path) else None
    for info in shards:
        reason = shard_problem(info, verify, sizes, max_bytes)
        if reason is None:
            good.append(info)
        else:
            bad[str(info.path)] = f"{info.path}: {reason}"
            warnings.warn(f"skipping shard {bad[str(info.path)]}", CorruptShardWarning, stacklevel=3)
    return good, bad


def shard_problem(info: ShardInfo, verify: str, sizes: dict[str, int] | None = None,
                  max_bytes: int = MAX_SHARD_BYTES) -> str | None:
    """Why a shard can't be used, or None; `sizes` (remote shards) holds the listed size of every object."""
    if info.bytes > max_bytes:
        return over_cap(info.path, info.bytes, max_bytes).split(": ", 1)[1]
    if sizes is not None:
        size = sizes.get(info.path.path)
        if size is None:
            return "missing"
    elif not info.path.is_file():
        return "missing"
    else:
        size = info.path.stat().st_size
    if size != info.bytes:
        return f"{size} bytes, the manifest says {info.bytes} (truncated or altered)"
    if verify == "sha256" and sha256_file(info.path) != info.sha256:
        return "sha256 differs from the manifest (altered)"
    return None


def remote_sizes(shards: list[ShardInfo]) -> dict[str, int]:
    """{bucket/key: bytes} of the objects in the shards' folders: one listing a folder, not a request a shard."""
    sizes: dict[str, int] = {}
    for folder in {info.path.parent for info in shards}:
        try:
            entries = folder.fs.ls(folder.path, detail=True, refresh=True)
        except FileNotFoundError:
            continue
        sizes.update({e["name"].rstrip("/"): int(e["size"]) for e in entries if e.get("type") == "file"})
    return sizes


def merge_states(states: list[dict]) -> dict:
    """One state from every rank's state (all taken at the same step of one run; ranks may be in
    different epochs).

    The result starts at the earliest epoch any rank is in, with a global cursor
    and the positions consumed beyond it; later epochs that ranks ahead have
    begun travel in `segments`. It loads into any world size with nothing
    replayed or skipped (see the module docstring).
    """
    first = states[0]
    w = first["world_size"]
    if w is None or sorted(s["rank"] for s in states) != list(range(w)):
        raise ValueError(f"merge_states needs one state per rank 0..{w}-1, got ranks {[s['rank'] for s in states]}")
    for s in states:
        for key in ("world_size", "seed", "shuffle", "num_samples", "shards", "remainder"):
            if s[key] != first[key]:
                raise ValueError(f"merge_states: ranks disagree on {key!r} (states of different runs)")
        if _segment_dict(s.get("segments", [])) != _segment_dict(first.get("segments", [])):
            raise ValueError("merge_states: ranks disagree on 'segments' (states of different runs or resumes)")
    pending = _segment_dict(first.get("segments", []))
    lo, hi = min(s["epoch"] for s in states), max(s["epoch"] for s in states)
    merged = {e: seg for e, seg in pending.items() if e > hi}
    for epoch in range(lo, hi + 1):
        merged[epoch] = _merge_epoch(states, epoch, pending.get(epoch, (0, ())))
    current = merged.pop(lo)
    return {**first, "epoch": lo, "world_size": None, "rank": None, "cursor": current[0], "done": list(current[1]),
            "consumed": 0, "extra": [], "segments": _segment_list(merged)}


def _merge_epoch(states: list[dict], epoch: int, start: tuple[int, tuple[int, ...]]) -> tuple[int, tuple[int, ...]]:
    """(cursor, done) of `epoch` after every rank's share of it: all of it for ranks past it, the
    consumed indices for ranks in it, nothing for ranks before it."""
    inside = {(s["cursor"], tuple(s["done"])) for s in states if s["epoch"] == epoch}
    if len(inside) > 1:
        raise ValueError(f"merge_states: ranks in epoch {epoch} disagree on where it started (states of "
                         "different runs or times)")
    cursor, done = inside.pop() if inside else start
    n, w, rule = states[0]["num_samples"], states[0]["world_size"], states[0]["remainder"]
    segment = Segment(w, cursor, tuple(done))
    consumed = np.zeros(len(segment_positions(n, segment, rule)), dtype=bool)
    for s in states:
        mine = np.arange(s["rank"], len(consumed), w)
        if s["epoch"] > epoch:
            consumed[mine] = True
        elif s["epoch"] == epoch:
            consumed[mine[:s["consumed"]]] = True
            consumed[mine[[i for i in s["extra"] if i < len(mine)]]] = True
    return compact(n, segment, rule, consumed)


def _segment_dict(segments: list[dict]) -> dict[int, tuple[int, tuple[int, ...]]]:
    return {int(s["epoch"]): (int(s["cursor"]), tuple(int(p) for p in s["done"])) for s in segments}


def _segment_list(segments: dict[int, tuple[int, tuple[int, ...]]]) -> list[dict]:
    return [{"epoch": e, "cursor": c, "done": list(d)} for e, (c, d) in sorted(segments.items())]


def global_cursor(state: dict) -> tuple[int, tuple[int, ...]]:
    """(cursor, done) of a merged state, or of one rank's state assuming all ranks moved in lockstep."""
    if state["rank"] is None:
        return state["cursor"], tuple(state["done"])
    n, w = state["num_samples"], state["world_size"]
    segment = Segment(w, state["cursor"], tuple(state["done"]))
    consumed = np.zeros(len(segment_positions(n, segment, state["remainder"])), dtype=bool)
    consumed[:state["consumed"] * w] = True  # every rank consumed the same prefix
    return compact(n, segment, state["remainder"], consumed)


def _check_args(rank: int, world_size: int, seed: int, remainder: str, verify: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"ShardStream: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed < 0:
        raise ValueError(f"ShardStream: seed must be >= 0, got {seed}")
    if remainder not in REMAINDER_RULES:
        raise ValueError(f"ShardStream: remainder must be one of {REMAINDER_RULES}, got {remainder!r}")
    if verify not in ("sha256", "size"):
        raise ValueError(f"ShardStream: verify must be 'sha256' or 'size', got {verify!r}")
