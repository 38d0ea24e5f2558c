"""Prepare a user corpus as Ray tasks; the driver keeps counts, object references and the manifest.

    scan     one streaming task a file: read, filter and split a batch of items at a time, as columns
             (`formats.record_batches`, `filters.judge_arrays`); yields the kept texts in `Texts` chunks
             while it reads (into the object store, where they wait for `encode`), then a (hash,
             position) array for the de-duplication, the file's bottom-k sample for the tokenizer (by
             content hash) and its counts
    dedup    one task a hash range (P equal ranges of the hash's first 64 bits): each file's table comes
             sorted by hash, so a task reads only its slice of every table; it sorts its entries by
             (hash, file, position) and drops all but the first of each hash; returns the dropped
             (file, position) pairs
    train    (when no tokenizer is given) a tree of merge tasks, submitted as the scans return
             (`SampleTree`), then one training task: the globally
             smallest content hashes whose normalised text adds up to `data.tokenizer_sample_bytes`, in
             hash order (samples pass between tasks as arrays and one string: `Sample`)
    encode   one streaming task a file: reads its scan's chunks (not the file), drops the duplicates,
             tokenizes in batches
             and yields pieces of at most `shard_samples` samples of one split (tar bytes + offsets)
    write    one task a shard, on the driver's node: the slices of pieces that make samples
             [k·S, (k+1)·S) of a split, concatenated and closed into `<split>-<k>.tar`

Every result is a function of the files and the config: file order, position in the file and content
hashes decide everything, never how many tasks ran or which finished first. Shard boundaries are cut in
the global sample order of each split (files in order), as pieces arrive in that order. The driver's
memory holds object references (a few a file, one per 16 M characters of kept text), one counter row per file
and at most a shard's worth of pieces a split.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import sys
import warnings
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from .chunks import token_chunks
from .filters import FILTERS
from .formats import Kept, ReadSpec, SourceFile, record_batches
from .parts import parts_of, splittable
from .shards import END_OF_ARCHIVE, NumberedKeys, WrittenShard, tar_samples
from .sources import SPLITS
from .tokenizer import encode_texts, shared_tokenizer

HASH_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("pos", "<u8"), ("split", "u1")])
DROP_DTYPE = np.dtype([("file", "<u4"), ("pos", "<u8")])
ENCODE_BATCH = 1024
PARTITION_ENTRIES = 1_000_000
"""About how many hashes one dedup task sorts (~25 MB, ~80 MB at its peak): the partition count follows the
corpus size, so that a worker's memory does not."""


@dataclass(frozen=True)
class EncodeSpec:
    tok_json: str
    dtype: str
    shard_samples: int
    sample_tokens: int = 0
    sentence_ends: tuple[int, ...] = ()


@dataclass
class ScanSummary:
    samples: list[int]
    """Samples kept by the filters, per split (SPLITS order)."""
    documents: list[int]
    drops: dict[str, int]
    read: int
    """Samples offered to the filters."""


# --- running stage functions as Ray tasks or in this process -----------------------------------------


class Runner:
    """Submits stage functions as Ray tasks (or calls them here); `get` gives the same values either way."""

    def __init__(self, use_ray: bool, max_tasks: int = 0):
        self.use_ray = use_ray
        if use_ray:
            import ray

            self.ray = ray
            self.tasks = max_tasks or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
            self.node = ray.get_runtime_context().get_node_id()
            self._remote: dict[Callable, Any] = {}  # one RemoteFunction a stage: pickled and exported once
        else:
            self.tasks = max_tasks or 1

    def submit(self, fn: Callable, *args, num_returns: Any = 1, here: bool = False):
        if not self.use_ray:
            out = fn(*args)
            return out if num_returns != "streaming" else iter(out)
        options: dict = {"num_returns": num_returns, "max_retries": 1}
        if here:  # files are written on the driver's node (its local staging folder)
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node, soft=False)
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn].options(**options).remote(*args)

    def put(self, value):
        """A value as `submit` returns results: an object reference with Ray, the value itself without."""
        return self.ray.put(value) if self.use_ray else value

    def get(self, ref):
        if not self.use_ray:
            return ref
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, ValueError):  # a data.* message from a task: one line, not a traceback
                raise ValueError(str(err.cause)) from None
            raise

    def windowed(self, fn: Callable, jobs: Iterable[tuple], **kw) -> Iterator:
        """`fn(*job)` for every job, at most `self.tasks` in flight; results (refs) in job order."""
        window: list = []
        for job in jobs:
            window.append(self.submit(fn, *job, **kw))
            if len(window) >= self.tasks:
                yield window.pop(0)
        yield from window


def bar(desc: str, total: int | None, unit: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"prepare: {desc}", unit=unit, disable=not progress, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


# --- scan ------------------------------------------------------------------------------------------


def content_hashes(src: list[str] | None, tgt: list[str]) -> tuple[bytes, np.ndarray]:
    """Each sample's (sources None for `text`) 16-byte digest of its text, case and whitespace ignored
    (what de-duplication compares), side by side, and the UTF-8 sizes of those normalised texts (what the
    tokenizer sample's budget counts: the same for every copy). `records` gives whitespace-normalised
    texts, so only case is folded here. Tables and samples hold a digest as (hi, lo) = its first 8 bytes,
    then its last 8, each read little-endian, and sort by that."""
    folded = [f"\x00{t}".casefold().encode() for t in tgt] if src is None else \
        [f"{s}\x00{t}".casefold().encode() for s, t in zip(src, tgt)]
    digest = _blake2b
    return (b"".join([digest(x, digest_size=16).digest() for x in folded]),
            np.fromiter(map(len, folded), dtype=np.int64, count=len(folded)))


_blake2b = hashlib.blake2b
FOLD_BYTES = 1 << 20
"""`BottomK` folds its buffer into its sample when the buffer holds this many bytes, or the budget if larger."""


class BottomK:
    """The train texts with the smallest content hashes, at most `budget` bytes: a prefix of the hash
    order, so a global prefix can be merged from per-file ones whatever the number of files or parts.
    A hash's size is its normalised text's (`content_hashes`), the same for each copy, and of a hash's
    copies the smallest texts count: both rules hold however the copies are spread, so merging per-part
    samples gives the sample of the whole file. The first hash that does not fit is kept too (last, over
    the budget): a part whose sample lacked it could not tell a merge that the prefix stops there.

    Items are buffered as raw columns (digests in one buffer, texts in one list) and folded into the
    sample by `merge_samples`, which applies those rules to whole arrays, when the buffer reaches
    max(budget, `FOLD_BYTES`) and at the end: memory stays within about twice that, and no tuple is made
    nor compared an item."""

    def __init__(self, budget: int, fold_bytes: int = FOLD_BYTES):
        self.budget, self.fold_at = budget, max(budget, fold_bytes)
        self.kept = Sample.empty()
        self._clear()

    def _clear(self) -> None:
        self.digests, self.texts, self.ntexts, self.sizes, self.bytes = bytearray(), [], array("q"), array("q"), 0

    def add(self, digests: bytes, texts: list[str], sizes: np.ndarray, per_item: int) -> None:
        """Items: `content_hashes`' digests and sizes, and the items' texts in order, `per_item` each."""
        self.digests += digests
        self.texts += texts
        self.ntexts.extend([per_item] * len(sizes))
        self.sizes.frombytes(sizes.astype(np.int64).tobytes())
        self.bytes += int(sizes.sum())
        if self.bytes > self.fold_at:
            self._fold()

    def _fold(self) -> None:
        hashes = np.zeros(len(self.sizes), HASH2_DTYPE)
        if len(self.sizes):
            halves = np.frombuffer(self.digests, dtype="<u8").reshape(-1, 2)  # (items, [hi, lo])
            hashes["hi"], hashes["lo"] = halves[:, 0], halves[:, 1]
        self.kept = _merged(self.budget, np.concatenate((self.kept.hashes, hashes)),
                            np.concatenate((self.kept.sizes, np.array(self.sizes, dtype=np.int64))),
                            np.concatenate((self.kept.ntexts, np.array(self.ntexts, dtype=np.int64))),
                            self.kept.texts() + self.texts)
        self._clear()

    def sample(self) -> "Sample":
        self._fold()
        return self.kept


TEXT_CHUNK_CHARS = 16 << 20
"""A scan task hands its kept texts to `encode` in chunks of about this many characters (each an
object-store object as soon as it is full), so that its memory does not follow the size of a file."""


@dataclass
class Texts:
    """Consecutive kept samples of a file or part, as `encode` reads them instead of the file: each sample's
    split (index in SPLITS) and document (a number that changes where the document does), and its texts in
    UTF-8 joined by newlines, which no text holds (`records` gives whitespace-normalised texts)."""

    splits: np.ndarray
    docs: np.ndarray
    tgt: np.ndarray
    src: np.ndarray | None = None

    @classmethod
    def of(cls, splits: bytearray, docs: array, tgt: list[str], src: list[str] | None) -> "Texts":
        return cls(np.frombuffer(bytes(splits), dtype=np.uint8), np.frombuffer(docs, dtype=np.int64).copy(),
                   _joined(tgt), None if src is None else _joined(src))

    def __len__(self) -> int:
        return len(self.splits)

    def texts(self) -> tuple[list[str], list[str] | None]:
        """(targets, sources or None), a text a sample."""
        return _split(self.tgt, len(self)), None if self.src is None else _split(self.src, len(self))


def _joined(texts: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(texts).encode("utf-8", "surrogatepass"), dtype=np.uint8)


def _split(data: np.ndarray, count: int) -> list[str]:
    return data.tobytes().decode("utf-8", "surrogatepass").split("\n") if count else []


class _Chunker:
    """Kept samples gathered into `Texts` chunks of about `limit` characters."""

    def __init__(self, limit: int, pairs: bool):
        self.limit, self.pairs, self.doc = limit, pairs, 0
        self._clear()

    def _clear(self) -> None:
        self.splits, self.docs, self.tgt, self.src, self.chars = bytearray(), array("q"), [], [], 0

    def add(self, splits: np.ndarray, new_doc: np.ndarray, tgt: list[str], src: list[str] | None) -> Iterator[Texts]:
        """Samples' splits (uint8), whether each starts a document, and texts; yields the chunks filled."""
        docs = self.doc + np.cumsum(new_doc, dtype=np.int64)
        chars = np.cumsum(np.fromiter(map(len, tgt), np.int64, len(tgt)))
        if self.pairs:
            chars += np.cumsum(np.fromiter(map(len, src), np.int64, len(src)))
        start = done = 0  # samples taken so far, and their characters
        while start < len(tgt):  # up to the sample that fills the chunk (or the last), then the rest
            end = min(int(np.searchsorted(chars, done + self.limit - self.chars)) + 1, len(tgt))
            self.splits += splits[start:end].tobytes()
            self.docs.frombytes(docs[start:end].tobytes())
            self.tgt += tgt[start:end]
            if self.pairs:
                self.src += src[start:end]
            self.chars += int(chars[end - 1]) - done
            if self.chars >= self.limit:
                yield self.flush()
            start, done = end, int(chars[end - 1])
        if len(docs):
            self.doc = int(docs[-1])

    def flush(self) -> Texts | None:
        if not self.splits:
            return None
        out = Texts.of(self.splits, self.docs, self.tgt, self.src if self.pairs else None)
        self._clear()
        return out


def scan_file(src: SourceFile, spec: ReadSpec, max_docs: int, sample_bytes: int,
              chunk_chars: int = TEXT_CHUNK_CHARS) -> Iterator:
    """Stage `scan` (streaming) of a file or part: yields its kept samples as `Texts` chunks while it reads,
    then the (hash, position, split) array sorted by hash, the tokenizer sample and ScanSummary (the last
    three; the summary last, where a failed task's error stands: `scanned`). A record's position is its
    index here. Samples come a batch at a time as columns (`record_batches`); their digests go into one
    buffer (16 bytes each), their splits into another (1 byte); counts come from those at the end."""
    drops: Counter = Counter()
    digests, splits = bytearray(), bytearray()
    docs: list[set[str]] = [set(), set(), set()]
    sample = BottomK(sample_bytes)
    chunks = _Chunker(chunk_chars, pairs=spec.task != "text")
    last = None  # the last sample's document key
    for kept in record_batches(src, spec, drops, max_docs=max_docs):
        split = np.repeat(np.array(kept.splits, dtype=np.uint8), kept.counts)
        new_doc = np.zeros(len(split), dtype=bool)
        first = 0
        for key, s, count in zip(kept.keys, kept.splits, kept.counts):
            if key != last:
                new_doc[first], last = True, key
                docs[s].add(key)
            first += count
        digest, sizes = content_hashes(kept.src, kept.tgt)
        digests += digest
        splits += split.tobytes()
        if sample_bytes:
            _sample_train(sample, digest, split, sizes, kept)
        yield from chunks.add(split, new_doc, kept.tgt, kept.src)
    if (rest := chunks.flush()) is not None:
        yield rest
    split_of = np.frombuffer(splits, dtype=np.uint8)
    table = np.zeros(len(splits), HASH_DTYPE)
    if len(splits):
        halves = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
        table["hi"], table["lo"], table["split"] = halves[:, 0], halves[:, 1], split_of
        table["pos"] = np.arange(len(splits))
    yield table[np.lexsort((table["pos"], table["lo"], table["hi"]))]
    yield sample.sample()
    read = drops.pop("read", 0)
    yield ScanSummary(np.bincount(split_of, minlength=3).tolist(), [len(d) for d in docs],
                      {k: drops[k] for k in FILTERS if drops[k]}, read)  # in FILTERS' order, as the manifest


def _sample_train(sample: BottomK, digests: bytes, split: np.ndarray, sizes: np.ndarray, kept: Kept) -> None:
    """The train samples of a batch into the tokenizer sample (SPLITS[0] is train)."""
    src, tgt = kept.src, kept.tgt
    if not (train := split == 0).all():
        take = np.flatnonzero(train)
        digests, sizes = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16)[take].tobytes(), sizes[take]
        tgt = [tgt[i] for i in take.tolist()]
        src = None if src is None else [src[i] for i in take.tolist()]
    if src is None:
        sample.add(digests, tgt, sizes, 1)
    else:
        sample.add(digests, [t for pair in zip(src, tgt) for t in pair], sizes, 2)


# --- dedup ------------------------------------------------------------------------------------------


def dedup_partition(part: int, parts: int, origins: np.ndarray, *hashes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Stage `dedup`: the (file, position) of every duplicate of hash range `part` of `parts`, sorted, and
    their count per split. The first occurrence (lowest file, then position) of a hash is kept. `hashes[i]`
    is the table of part i (sorted by hash), whose (file, first position) is `origins[i]`."""
    start, end = hash_range(part, parts)
    chunks = []
    for (owner, first), arr in zip(origins.tolist(), hashes):
        keys = arr["hi"]  # a view: bisect reads ~log2(n) entries of it
        sel = arr[bisect.bisect_left(keys, start):len(keys) if end is None else bisect.bisect_left(keys, end)]
        if first:
            sel = sel.copy()
            sel["pos"] += np.uint64(first)
        chunks.append((sel, np.full(len(sel), owner, dtype="<u4")))
    if not chunks or not sum(len(c[0]) for c in chunks):
        return np.zeros(0, DROP_DTYPE), [0, 0, 0]
    entries = np.concatenate([c[0] for c in chunks])
    files = np.concatenate([c[1] for c in chunks])
    order = np.lexsort((entries["pos"], files, entries["lo"], entries["hi"]))
    e, f = entries[order], files[order]
    del entries, files, order
    dup = np.zeros(len(e), dtype=bool)
    dup[1:] = (e["hi"][1:] == e["hi"][:-1]) & (e["lo"][1:] == e["lo"][:-1])
    drops = np.zeros(int(dup.sum()), DROP_DTYPE)
    drops["file"], drops["pos"] = f[dup], e["pos"][dup]
    drops.sort(order=["file", "pos"])
    return drops, np.bincount(e["split"][dup], minlength=3).tolist()


def hash_range(part: int, parts: int) -> tuple[int, int | None]:
    """[start, end) of the first 64 bits of the hashes of range `part` of `parts` (None: to the end)."""
    return (part << 64) // parts, ((part + 1) << 64) // parts if part + 1 < parts else None


def dropped_positions(file_index: int, drop_arrays: tuple[np.ndarray, ...]) -> set[int]:
    out: set[int] = set()
    for arr in drop_arrays:
        lo, hi = np.searchsorted(arr["file"], [file_index, file_index + 1])
        out.update(arr["pos"][lo:hi].tolist())
    return out


# --- tokenizer sample -------------------------------------------------------------------------------


HASH2_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8")])


@dataclass
class Sample:
    """A tokenizer sample in hash order (distinct hashes), as arrays and one string: the form tasks pass
    between them (Ray moves the arrays out of band and the string whole, where a list of (hash, texts, size)
    tuples was serialised an item at a time, and merges read it a tuple at a time)."""

    hashes: np.ndarray
    """HASH2_DTYPE, ascending."""
    sizes: np.ndarray
    """Each item's size (`content_hashes`)."""
    ntexts: np.ndarray
    """Texts of each item (1, or 2 for a pair)."""
    text: str
    """The items' texts in order, joined by newlines, which no text holds (`records` gives
    whitespace-normalised texts)."""

    @classmethod
    def of(cls, items: list[tuple[tuple[int, int], tuple[str, ...], int]]) -> "Sample":
        hashes = np.zeros(len(items), HASH2_DTYPE)
        if not items:
            return cls(hashes, np.zeros(0, np.int64), np.zeros(0, np.int64), "")
        keys, groups, sizes = zip(*items)
        hashes["hi"], hashes["lo"] = zip(*keys)
        return cls(hashes, np.array(sizes, dtype=np.int64), np.fromiter(map(len, groups), np.int64, len(groups)),
                   "\n".join(t for ts in groups for t in ts))

    @classmethod
    def empty(cls) -> "Sample":
        return cls.of([])

    def __len__(self) -> int:
        return len(self.hashes)

    def texts(self) -> list[str]:
        return self.text.split("\n") if len(self) else []

    def items(self) -> list[tuple[tuple[int, int], tuple[str, ...], int]]:
        texts, out, k = self.texts(), [], 0
        for hi, lo, n, size in zip(self.hashes["hi"].tolist(), self.hashes["lo"].tolist(), self.ntexts.tolist(),
                                   self.sizes.tolist()):
            out.append(((hi, lo), tuple(texts[k:k + n]), size))
            k += n
        return out


def merge_samples(budget: int, *samples: Sample) -> Sample:
    """The bottom-k (in hash order, at most `budget` bytes, each hash once, then the first hash over the
    budget) of several bottom-k samples: a hash found in several keeps the smallest of its texts.
    Associative: merging in any grouping gives the global one, so a tree of small merges bounds memory."""
    samples = tuple(s for s in samples if len(s)) or (Sample.empty(),)
    return _merged(budget, *(np.concatenate([getattr(s, k) for s in samples]) for k in ("hashes", "sizes", "ntexts")),
                   [t for s in samples for t in s.texts()])


def _merged(budget: int, hashes: np.ndarray, sizes: np.ndarray, ntexts: np.ndarray, texts: list[str]) -> Sample:
    """`merge_samples` of items given as columns, in any order: each item's `ntexts` texts lie in `texts` side
    by side, in item order. A hash may repeat (across samples, or in a scan's buffer: `BottomK`)."""
    start = np.cumsum(ntexts) - ntexts  # each item's first text

    def item_texts(m: int) -> list[str]:
        return texts[start[m]:start[m] + ntexts[m]]

    order = np.lexsort((np.arange(len(hashes)), hashes["lo"], hashes["hi"]))
    h = hashes[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (h["hi"][1:] == h["hi"][:-1]) & (h["lo"][1:] == h["lo"][:-1])
    for k in np.flatnonzero(same & ~np.roll(same, 1)) - 1:  # the head of each run of equal hashes
        j = k + 1
        while j < len(order) and same[j]:
            j += 1
        order[k] = min(order[k:j].tolist(), key=item_texts)
    chosen = order[~same]
    fit = int(np.searchsorted(np.cumsum(sizes[chosen]), budget, side="right"))
    chosen = chosen[:fit + 1]  # and the first hash that does not fit, if any (see BottomK)
    n = ntexts[chosen]
    picked = np.repeat(start[chosen] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))  # their texts' indices
    return Sample(hashes[chosen], sizes[chosen], n, "\n".join([texts[i] for i in picked.tolist()]))


def merged_sample(budget: int, *samples: Sample) -> list[str]:
    """The texts of the global bottom-k, in hash order (without the hash over the budget)."""
    items = merge_samples(budget, *samples).items()
    if sum(n for _, _, n in items) > budget:
        items = items[:-1]
    return [t for _, texts, _ in items for t in texts]


def reduce_samples(runner: Runner, budget: int, refs: list, fan_in: int = 4) -> list:
    """Per-file samples merged by a tree of `merge_samples` tasks (each holds at most `fan_in` samples)."""
    while len(refs) > 1:
        refs = [runner.submit(merge_samples, budget, *refs[i:i + fan_in]) for i in range(0, len(refs), fan_in)]
    return refs


class SampleTree:
    """Per-file samples merged as the scans return them: a `merge_samples` task for every `fan_in` samples of a
    level, submitted while later files are still being read, so that little merging is left between the last
    scan and training. The result does not depend on the grouping (`merge_samples` is associative); the
    driver holds at most `fan_in` - 1 references a level."""

    def __init__(self, runner: Runner, budget: int, fan_in: int = 4):
        self.runner, self.budget, self.fan_in = runner, budget, fan_in
        self.levels: list[list] = []

    def add(self, ref) -> None:
        level = 0
        while True:
            if level == len(self.levels):
                self.levels.append([])
            self.levels[level].append(ref)
            if len(self.levels[level]) < self.fan_in:
                return
            ref = self.runner.submit(merge_samples, self.budget, *self.levels[level])
            self.levels[level] = []
            level += 1

    def refs(self) -> list:
        """What is not merged yet (fewer than `fan_in` a level), for `reduce_samples`."""
        return [ref for level in self.levels for ref in level]


def train_from_sample(train: Callable[[list[str]], str], budget: int, *samples: Sample) -> str:
    """Stage `train`: tokenizer.json trained on the merged sample (`train` maps texts to its JSON)."""
    return train(merged_sample(budget, *samples))


# --- encode -----------------------------------------------------------------------------------------


@dataclass
class Piece:
    """Consecutive samples of one split of one file, as tar bytes (no end marker). `data` is a numpy byte
    array, which Ray passes out of band: one copy into the object store, none out of it (a `write` task
    reads it in place), where a bytearray was pickled in band and copied again on each side."""

    split: str
    data: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    offsets: list[int] = field(default_factory=lambda: [0])
    tokens: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list, repr=False)
    """Byte runs not yet joined into `data` (`sealed`)."""

    def extend(self, data: np.ndarray, ends: np.ndarray, tokens: list[int]) -> None:
        """Samples whose tar bytes are `data`, the k-th ending at `ends[k]` (an offset into `data`)."""
        self.offsets += (ends + self.offsets[-1]).tolist()
        self.chunks.append(data)
        self.tokens += tokens

    def sealed(self) -> "Piece":
        """The piece with its runs joined into `data`, ready to leave the task."""
        self.data = np.concatenate([self.data, *self.chunks]) if self.chunks else self.data
        self.chunks = []
        return self

    def __len__(self) -> int:
        return len(self.tokens)


class Rows(NamedTuple):
    """Samples to tokenize: positions in the part, split names, texts (sources for pairs)."""

    pos: np.ndarray
    split: list[str]
    tgt: list[str]
    src: list[str] | None


def encode_file(origin: tuple[int, int], chunks: list, enc: EncodeSpec, *drop_arrays: np.ndarray) -> Iterator:
    """Stage `encode` (streaming) of a file or part, `origin` = (file index, position of its first sample),
    from the `Texts` chunks its scan kept (object references, fetched one at a time): for every piece,
    yields `(split, samples)` then the Piece itself. The file is not read again."""
    _one_thread_in_a_task()
    tok = shared_tokenizer(enc.tok_json)
    index, first = origin
    dropped = np.array(sorted(p - first for p in dropped_positions(index, drop_arrays)), dtype=np.int64)
    open_pieces = {s: Piece(s) for s in SPLITS}
    for rows in _rows(chunks, dropped, enc.sample_tokens):
        for b in range(0, len(rows.tgt), ENCODE_BATCH):
            batch = Rows(rows.pos[b:b + ENCODE_BATCH], rows.split[b:b + ENCODE_BATCH], rows.tgt[b:b + ENCODE_BATCH],
                         None if rows.src is None else rows.src[b:b + ENCODE_BATCH])
            yield from _encode_batch(tok, origin, batch, enc, open_pieces)
    for piece in open_pieces.values():
        if len(piece):
            yield piece.split, len(piece)
            yield piece.sealed()


def _fetch(ref):
    """A chunk: its reference's value in a Ray task, the chunk itself in this process."""
    ray = sys.modules.get("ray")
    return ray.get(ref) if ray is not None and isinstance(ref, ray.ObjectRef) else ref


def _rows(chunks: list, dropped: np.ndarray, sample_tokens: int) -> Iterator[Rows]:
    """The chunks' samples without duplicates (`dropped`: positions in the part), a chunk at a time; with
    `sample_tokens`, the consecutive samples of a document joined into its first (across chunks too)."""
    offset, group = 0, None  # group: [position, split, document, texts] of the document being joined
    for ref in chunks:
        texts = _fetch(ref)
        tgt, src = texts.texts()
        pos = np.arange(offset, offset + len(texts), dtype=np.int64)
        offset += len(texts)
        keep = ~np.isin(pos, dropped)
        if not keep.all():
            tgt, src = list(compress(tgt, keep)), None if src is None else list(compress(src, keep))
        splits = [SPLITS[i] for i in texts.splits[keep].tolist()]
        if not sample_tokens:
            yield Rows(pos[keep], splits, tgt, src)
            continue
        joined: list[list] = []
        for p, split, doc, t in zip(pos[keep].tolist(), splits, texts.docs[keep].tolist(), tgt):
            if group is not None and doc != group[2]:
                joined.append(group)
                group = None
            if group is None:
                group = [p, split, doc, [t]]
            else:
                group[3].append(t)
        yield _joined_rows(joined)
    if group is not None:
        yield _joined_rows([group])


def _joined_rows(groups: list[list]) -> Rows:
    return Rows(np.array([g[0] for g in groups], dtype=np.int64), [g[1] for g in groups],
                [" ".join(g[3]) for g in groups], None)


def _one_thread_in_a_task() -> None:
    """A Ray task holds one CPU: without this, `tokenizers` would spread each batch over every core of the node
    (in this process, outside Ray, it may)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_batch(tok, origin: tuple[int, int], batch: Rows, enc: EncodeSpec, pieces: dict[str, Piece]) -> Iterator:
    """The batch's samples, tokenized and as tar bytes, appended to its split's piece; yields full pieces. A
    sample's key is its file index and its position in the file (`origin[1]` + its position in the part)."""
    if not batch.tgt:
        return
    tgt = encode_texts(tok, batch.tgt)
    src = encode_texts(tok, batch.src) if batch.src is not None else None
    keys, fields, splits = _samples_of(origin, batch, src, tgt, enc)
    data, ends = tar_samples(keys, fields, enc.dtype)
    starts = np.concatenate(([0], ends[:-1]))
    tokens = [sum(map(len, f.values())) for f in fields]
    i = 0
    while i < len(keys):  # runs of one split, each up to where its piece is full
        split = splits[i]
        piece = pieces[split]
        j, stop = i + 1, min(len(keys), i + enc.shard_samples - len(piece))
        while j < stop and splits[j] == split:
            j += 1
        piece.extend(data[starts[i]:ends[j - 1]], ends[i:j] - starts[i], tokens[i:j])
        if len(piece) == enc.shard_samples:
            yield split, len(piece)
            yield piece.sealed()
            pieces[split] = Piece(split)
        i = j


def _samples_of(origin: tuple[int, int], batch: Rows, src: list | None, tgt: list,
                enc: EncodeSpec) -> tuple[list[str] | NumberedKeys, list[dict], list[str]]:
    """(keys, fields, splits) of the batch's samples: one a record, key `<file index:06d>-<position:09d>`, or
    with `sample_tokens` one a chunk of the record's tokens (key suffix `-cccc`). Whole lists at a time,
    and the keys as `NumberedKeys` (no string a key) where every position has 9 digits."""
    index, first = origin
    positions = batch.pos + first
    if not enc.sample_tokens:
        fields = [{"tgt": t} for t in tgt] if src is None else [{"src": s, "tgt": t} for s, t in zip(src, tgt)]
        keys = NumberedKeys(f"{index:06d}-", positions, 9) if positions[-1] < 10**9 else \
            [f"{index:06d}-{p:09d}" for p in positions.tolist()]
        return keys, fields, batch.split
    keys = [f"{index:06d}-{p:09d}" for p in positions.tolist()]
    out: tuple[list, list, list] = ([], [], [])
    for key, split, t in zip(keys, batch.split, tgt):
        for c, ids in enumerate(token_chunks(t, enc.sample_tokens, enc.sentence_ends)):
            out[0].append(f"{key}-{c:04d}")
            out[1].append({"tgt": ids})
            out[2].append(split)
    return out


# --- write ------------------------------------------------------------------------------------------


def write_shard(path: str, slices: list[tuple[int, int]], *pieces: Piece) -> tuple[int, int, int, str]:
    """Stage `write`: samples [a, b) of each piece, concatenated and closed into the tar file `path`;
    returns (samples, tokens, bytes, sha256), the hash taken as the bytes are written."""
    samples = tokens = 0
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        chunks = [memoryview(p.data)[p.offsets[a]:p.offsets[b]] for (a, b), p in zip(slices, pieces)]
        for chunk in (*chunks, END_OF_ARCHIVE):
            f.write(chunk)
            digest.update(chunk)
        size = f.tell()
    for (a, b), piece in zip(slices, pieces):
        samples += b - a
        tokens += sum(piece.tokens[a:b])
    return samples, tokens, size, digest.hexdigest()


class ShardCutter:
    """Cuts one split's stream of pieces (in global order) into shards of exactly `size` samples
    (the last one shorter): each full shard becomes a `write` job."""

    def __init__(self, split: str, size: int, out: Path):
        self.split, self.size, self.out = split, size, out
        self.pending: list[tuple[Any, int, int]] = []  # (piece ref, first unused sample, samples)
        self.count = 0
        self.shards = 0

    def add(self, ref, n: int) -> list[tuple]:
        self.pending.append((ref, 0, n))
        self.count += n
        jobs = []
        while self.count >= self.size:
            jobs.append(self._take(self.size))
        return jobs

    def flush(self) -> list[tuple]:
        return [self._take(self.count)] if self.count else []

    def _take(self, want: int) -> tuple:
        slices, refs = [], []
        while want:
            ref, start, n = self.pending[0]
            used = min(want, n - start)
            slices.append((start, start + used))
            refs.append(ref)
            want -= used
            self.count -= used
            if start + used == n:
                self.pending.pop(0)
            else:
                self.pending[0] = (ref, start + used, n)
        path = self.out / f"{self.split}-{self.shards:06d}.tar"
        self.shards += 1
        return (str(path), slices, *refs)


# --- the driver --------------------------------------------------------------------------------------


@dataclass
class CorpusResult:
    written: dict[str, list[WrittenShard]]
    documents: dict[str, int]
    filters: dict
    tok_json: str


def report_filters(read: int, drops: dict[str, int], kept: int) -> dict:
    """The manifest's `filters` entry, with a warning for a filter that dropped over half of the input."""
    for name, n in drops.items():
        if read and n > read / 2:
            label = "data.dedup (exact duplicates)" if name == "dedup" else \
                "empty samples" if name == "empty" else f"data.{name}"
            warnings.warn(f"{label}: dropped {n} of {read} samples ({100 * n / read:.0f}%)", stacklevel=2)
    return {"read": read, "dropped": {k: drops.get(k, 0) for k in FILTERS}, "kept": kept}


def run_corpus(files: list[SourceFile], spec: ReadSpec, *, runner: Runner, out: Path, max_documents: int,
               dedup: bool, shard_samples: int, sample_bytes: int, tokenizer: Callable[[Runner, list], Any],
               encoding: Callable[[str], EncodeSpec], progress: bool, part_bytes: int = 0) -> CorpusResult:
    """Every stage for `files`; `tokenizer(runner, sample_refs)` submits tokenizer.json (trained on the
    sample, or the given one; `runner.get` of what it returns gives the JSON), `encoding(tok_json)` the
    encode settings. Plain line files over `part_bytes`
    are read as several parts (`parts`; not with `max_documents`)."""
    owners, files = split_files(files, spec, part_bytes if not max_documents else 0, runner, progress)
    caps = [-1] * len(files)
    # `rescan` replaces files' samples one by one, so with max_documents they are merged only after it
    tree = SampleTree(runner, sample_bytes) if sample_bytes and not max_documents else None
    summaries, hashes, samples, texts = scan(files, spec, caps, runner, sample_bytes, progress, tree)
    if max_documents:
        caps = document_caps([s.documents for s in summaries], max_documents)
        owners = [o for o, c in zip(owners, caps) if c != 0]
        files, caps, summaries, hashes, samples, texts = rescan(files, spec, caps, summaries, hashes, samples, texts,
                                                                runner, sample_bytes)
    origins = part_origins(owners, summaries)
    read = sum(s.read for s in summaries)
    drops = sum((Counter(s.drops) for s in summaries), Counter())
    kept = [sum(s.samples[i] for s in summaries) for i in range(3)]
    if not sum(kept):
        raise ValueError(f"data.sources: no text left after the filters ({dict(drops) or 'nothing read'})")
    tok_ref = tokenizer(runner, samples)  # submitted first: the tokenizer trains while de-duplication runs
    del samples
    drop_refs, dups = deduplicate(hashes, origins, sum(kept), runner, progress) if dedup else ([], [0, 0, 0])
    del hashes
    drops["dedup"] = sum(dups)
    filters = report_filters(read, dict(drops), sum(kept) - sum(dups))
    tok_json = runner.get(tok_ref)
    enc = encoding(tok_json)
    total = None if enc.sample_tokens else sum(kept) - sum(dups)
    written = encode_and_write(origins, texts, enc, drop_refs, runner, out, total, progress)
    documents = {split: sum(s.documents[i] for s in summaries) for i, split in enumerate(SPLITS)}
    return CorpusResult(written, documents, filters, tok_json)


def split_files(files: list[SourceFile], spec: ReadSpec, part_bytes: int, runner: Runner,
                progress: bool) -> tuple[list[int], list[SourceFile]]:
    """(the file index of each part, the parts): big plain line files cut into parts, a task each."""
    big = [i for i, f in enumerate(files) if splittable(f, part_bytes)]
    cut = dict(zip(big, _cut_refs(files, big, spec, part_bytes, runner, progress)))
    owners, parts = [], []
    for i, f in enumerate(files):
        pieces = cut.get(i, [f])
        owners += [i] * len(pieces)
        parts += pieces
    return owners, parts


def _cut_refs(files, big: list[int], spec: ReadSpec, part_bytes: int, runner: Runner, progress: bool) -> list:
    out = []
    with bar("find parts", len(big), "file", progress and bool(big)) as b:
        for ref in runner.windowed(parts_of, [(files[i], part_bytes, spec.doc_lines) for i in big]):
            out.append(runner.get(ref))
            b.update(1)
    return out


def part_origins(owners: list[int], summaries: list[ScanSummary]) -> np.ndarray:
    """(file index, position of its first sample in the file) of every part: positions run on across parts."""
    origins = np.zeros((len(owners), 2), dtype=np.uint64)
    seen: dict[int, int] = {}
    for j, (owner, s) in enumerate(zip(owners, summaries)):
        origins[j] = owner, seen.get(owner, 0)
        seen[owner] = seen.get(owner, 0) + sum(s.samples)
    return origins


def scan(files, spec, caps, runner: Runner, sample_bytes: int, progress: bool, tree: SampleTree | None = None):
    """Every file's summary (here) and hash table, sample and kept-text chunks (references); with `tree`, the
    samples are merged as they come and what is left of the tree comes back instead."""
    summaries, hashes, samples, texts = [], [], [], []
    with bar("read", len(files), "part", progress) as b:
        for gen in runner.windowed(scan_file, [(f, spec, c, sample_bytes) for f, c in zip(files, caps)],
                                   num_returns="streaming"):
            summary, chunks, table, sample = scanned(runner, gen)
            summaries.append(summary)
            hashes.append(table)
            if tree is None:
                samples.append(sample)
            else:
                tree.add(sample)
            texts.append(chunks)
            b.update(1)
            b.set_postfix(samples=sum(sum(s.samples) for s in summaries), refresh=False)
    return summaries, hashes, samples if tree is None else tree.refs(), texts


def scanned(runner: Runner, gen) -> tuple[ScanSummary, list, Any, Any]:
    """(summary, chunk references, table reference, sample reference) of a `scan_file` task. Its summary is
    fetched first: it comes last, and a task that failed ends its stream with its error instead."""
    refs = list(gen)
    summary = runner.get(refs[-1])
    *chunks, table, sample = refs[:-1]
    return summary, chunks, table, sample


def document_caps(documents: list[list[int]], max_documents: int) -> list[int]:
    """Documents each file may keep so that the first `max_documents` of the corpus are read (-1: all)."""
    caps, used = [], 0
    for docs in documents:
        n = sum(docs)
        caps.append(-1 if used + n <= max_documents else max(0, max_documents - used))
        used += n
    return caps


def rescan(files, spec, caps, summaries, hashes, samples, texts, runner: Runner, sample_bytes: int):
    """Drop files past `data.max_documents`; scan the file it cuts again with its cap."""
    keep = [i for i, c in enumerate(caps) if c != 0]
    files, caps = [files[i] for i in keep], [caps[i] for i in keep]
    summaries, hashes, samples, texts = ([lst[i] for i in keep] for lst in (summaries, hashes, samples, texts))
    for j, cap in enumerate(caps):
        if cap > 0:
            gen = runner.submit(scan_file, files[j], spec, cap, sample_bytes, num_returns="streaming")
            summaries[j], texts[j], hashes[j], samples[j] = scanned(runner, gen)
    return files, caps, summaries, hashes, samples, texts


def deduplicate(hashes: list, origins: np.ndarray, entries: int, runner: Runner,
                progress: bool) -> tuple[list, list[int]]:
    parts = max(runner.tasks, -(-entries // PARTITION_ENTRIES))
    drop_refs, dups = [], [0, 0, 0]
    with bar("de-duplicate", parts, "partition", progress) as b:
        jobs = [(p, parts, origins, *hashes) for p in range(parts)]
        for refs in runner.windowed(dedup_partition, jobs, num_returns=2):
            drop_refs.append(refs[0])
            dups = [a + c for a, c in zip(dups, runner.get(refs[1]))]
            b.update(1)
    return drop_refs, dups


class ShardWrites:
    """Write tasks in submission order; their results are collected (and `bar` advanced) once more than
    `keep` are outstanding, so the driver holds a window of references, not one a shard."""

    def __init__(self, runner: Runner, bar):
        self.runner, self.bar = runner, bar
        self.pending: deque[tuple[str, str, Any]] = deque()  # (split, shard path, result ref)
        self.written: dict[str, list[WrittenShard]] = {s: [] for s in SPLITS}

    def submit(self, split: str, jobs: list[tuple], keep: int) -> None:
        self.pending.extend((split, job[0], self.runner.submit(write_shard, *job, here=True)) for job in jobs)
        self.collect(keep)

    def collect(self, keep: int = 0) -> None:
        while len(self.pending) > keep:  # a split's shards finish in the order they were submitted
            split, path, ref = self.pending.popleft()
            samples, tokens, _, sha = self.runner.get(ref)
            self.written[split].append(WrittenShard(Path(path), samples, tokens, sha))
            self.bar.update(1)


def _taken(items: list, i: int):
    """`items[i]`, which the list no longer holds."""
    item, items[i] = items[i], None
    return item


def encode_and_write(origins: np.ndarray, texts: list[list], enc: EncodeSpec, drop_refs: list, runner: Runner,
                     out: Path, total: int | None, progress: bool) -> dict[str, list[WrittenShard]]:
    """Encode every file or part (in order) from its scan's chunks and cut each split's pieces into shards as
    they arrive. The encode settings (the tokenizer's JSON) go to the object store once, not once a task; a
    part's chunks are passed as a list (so a task fetches them one at a time) and let go of once its task is
    submitted; the written shards are collected while encoding goes on (`ShardWrites`)."""
    cutters = {s: ShardCutter(s, enc.shard_samples, out) for s in SPLITS}
    enc_ref = runner.put(enc)
    jobs = ((tuple(o), _taken(texts, i), enc_ref, *drop_refs) for i, o in enumerate(origins.tolist()))
    window = 2 * runner.tasks
    with bar("tokenize", total, "sample", progress) as tb, bar("write", None, "shard", progress) as wb:
        writes = ShardWrites(runner, wb)
        for gen in runner.windowed(encode_file, jobs, num_returns="streaming"):
            for meta in gen:
                split, n = runner.get(meta)
                writes.submit(split, cutters[split].add(next(gen), n), window)
                tb.update(n)
        for split, cutter in cutters.items():
            writes.submit(split, cutter.flush(), window)
        writes.collect()
    return writes.written
