"""User corpora: which files `data.sources` names, how each is read, and which split a sample falls in.

Entries of `data.sources` are files, globs (`**` recursive), folders (every non-hidden file under them,
or one HF `datasets` folder) or `s3://`/`gs://` URLs of any of those (read through `storage.as_path`).
A file's *name* is its path relative to its entry's base (the folder of a file, the folder itself, a glob's
part before its first wildcard), so it does not depend on where the corpus lies nor on other entries:
adding files never renames, hence never re-splits, existing ones.

Every reader yields `Item(group, src, text)` rows (`read_columns` gives them in batches, as columns; for
`lines` without an Item a line); `records` (and `record_batches`, its columns) turns them into samples:
filtered (`filters`), keyed by document and assigned to a split by `split_of(document key)`, a pure function.
A document is a whole file (`text`), the rows sharing a `fields.doc` value, or else a group of
`doc_lines` consecutive lines (rows) of one file.

`.gz`, `.bz2`, `.xz` and `.zst` files are decompressed as they are read (`.zst` needs `zstandard`).
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import PurePosixPath
from typing import IO, Iterator, NamedTuple

import numpy as np

from .filters import REASONS, TextFilter, cut, judge_arrays
from .sources import SPLITS, restore_source
from .storage import as_path, is_remote

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
FORMAT_OF_SUFFIX = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
                    ".ndjson": "jsonl", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_WILDCARDS = "*?["


class Item(NamedTuple):
    group: str
    """The document within the file ('' for a whole-file document)."""
    src: str | None
    text: str


class Record(NamedTuple):
    pos: int
    """Index of the sample in its file (after the filters): with the file's index, its identity."""
    doc: str
    split: str
    src: str | None
    tgt: str


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Local path or URL."""
    name: str
    """Path relative to its `data.sources` entry's base (document keys use it)."""
    format: str
    target: str | None = None
    """`parallel`: the line-aligned target file."""
    start: int = 0
    """A part of a big file (`parts`): its first byte, ..."""
    end: int = -1
    """... the byte after its last (-1: the file's end) ..."""
    first_line: int = 0
    """... and the file's line number at `start`."""


@dataclass(frozen=True)
class ReadSpec:
    """What a reading task needs to know (picklable, no DictConfig)."""

    task: str
    fields: tuple[str, str, str, str] = ("src", "tgt", "text", "doc")
    doc_lines: int = 50
    text_filter: TextFilter = field(default_factory=TextFilter)
    valid_fraction: float = 0.05
    test_fraction: float = 0.05


# --- listing ---------------------------------------------------------------------------


def list_sources(sources: list[str], fmt: str, targets: list[str] = ()) -> list[SourceFile]:
    """The files `sources` names, entry by entry, each entry's files sorted; ValueError naming the entry."""
    out: list[SourceFile] = []
    for i, entry in enumerate(sources):
        found = _expand(entry)
        if fmt == "parallel" or (fmt == "auto" and targets):
            tgt = _expand(targets[i])
            if len(tgt) != len(found):
                raise ValueError(f"data.target_sources: {targets[i]!r} names {len(tgt)} files, "
                                 f"data.sources {entry!r} names {len(found)}")
            out += [SourceFile(p, n, "parallel", t) for (p, n), (t, _) in zip(found, tgt)]
        else:
            out += [SourceFile(p, n, resolve_format(p, fmt)) for p, n in found]
    return out


def _expand(entry: str) -> list[tuple[str, str]]:
    """(path, name) of every file of one entry."""
    found = _expand_remote(entry) if is_remote(entry) else _expand_local(os.path.expanduser(entry))
    if not found:
        raise ValueError(f"data.sources: no file matches {entry!r}")
    return found


def _expand_local(entry: str) -> list[tuple[str, str]]:
    if any(c in entry for c in _WILDCARDS):
        files = [m for m in sorted(glob.glob(entry, recursive=True)) if os.path.isfile(m) or is_hf_folder(m)]
        return [(m, os.path.relpath(m, _glob_base(entry)).replace(os.sep, "/")) for m in files]
    if os.path.isdir(entry) and not is_hf_folder(entry):
        files = sorted(os.path.join(d, f) for d, dirs, names in os.walk(entry)
                       for f in names if not f.startswith(".") and not _hidden_dir(os.path.relpath(d, entry)))
        return [(f, os.path.relpath(f, entry).replace(os.sep, "/")) for f in files]
    if os.path.exists(entry):
        return [(entry, os.path.basename(os.path.normpath(entry)))]
    return []


def _hidden_dir(rel: str) -> bool:
    return any(part.startswith(".") and part != "." for part in rel.split(os.sep))


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in _WILDCARDS))
    return "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else ".")


def _expand_remote(entry: str) -> list[tuple[str, str]]:
    root = as_path(entry)
    fs, scheme = root.fs, entry.split("://", 1)[0]
    if any(c in entry for c in _WILDCARDS):
        base = _glob_base(root.path)
        paths = [p for p in sorted(fs.glob(root.path)) if fs.isfile(p)]
    elif fs.isdir(root.path) and not is_hf_folder(entry):
        base = root.path.rstrip("/")
        paths = [p for p in sorted(fs.find(root.path)) if not PurePosixPath(p).name.startswith(".")]
    elif fs.exists(root.path):
        base, paths = str(PurePosixPath(root.path).parent), [root.path]
    else:
        return []
    return [(f"{scheme}://{p}", str(PurePosixPath(p).relative_to(base))) for p in paths]


def is_hf_folder(path: str) -> bool:
    p = as_path(path)
    return p.is_dir() and any((p / m).is_file() for m in HF_MARKERS)


def resolve_format(path: str, fmt: str) -> str:
    """`fmt`, or for `auto` the format of the path's extension (compression suffix ignored; else `text`)."""
    if fmt != "auto":
        return fmt
    if is_hf_folder(path):
        return "hf"
    suffix = PurePosixPath(_strip_compression(path)).suffix.lower()
    return FORMAT_OF_SUFFIX.get(suffix, "text")


def _strip_compression(path: str) -> str:
    return next((path[:-len(s)] for s in COMPRESSIONS if path.lower().endswith(s)), path)


# --- opening -------------------------------------------------------------------------------


def open_binary(path: str) -> IO[bytes]:
    """`path` (local or URL) opened for reading, decompressed by its suffix."""
    raw = as_path(path).open("rb")
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if lower.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if lower.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise ValueError(f"data.sources: {path}: reading .zst needs zstandard "
                             "(pip install 'seqfoundry[zstd]')") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def open_text(path: str, start: int = 0, end: int = -1) -> IO[str]:
    """`path` as text; bytes [start, end) of it (a part, `parts`: an uncompressed file starting at a line)."""
    raw = open_binary(path)
    if start or end >= 0:
        raw.seek(start)
        raw = io.BufferedReader(_Window(raw, end - start), buffer_size=1 << 20) if end >= 0 else raw
    return io.TextIOWrapper(raw, encoding="utf-8" if start else "utf-8-sig", errors="replace")


class _Window(io.RawIOBase):
    """At most `size` bytes of `raw` from its current position."""

    def __init__(self, raw: IO[bytes], size: int):
        self.raw, self.left = raw, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.left <= 0:
            return 0
        n = self.raw.readinto(memoryview(b)[:min(len(b), self.left)]) or 0
        self.left -= n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


# --- readers: file → Items -------------------------------------------------------------------


def read_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    readers = {"text": _text_items, "lines": _line_items, "jsonl": _jsonl_items, "tsv": _tsv_items,
               "parquet": _parquet_items, "parallel": _parallel_items, "hf": _hf_items}
    if src.format not in readers:
        raise ValueError(f"data.format: cannot read {src.path} as {src.format!r}")
    return readers[src.format](src, spec)


class Columns(NamedTuple):
    """A batch of a file's items as columns (`read_columns`)."""

    runs: list[tuple[int, int, str]]
    """(start, end, group) of each run of consecutive items of one group, in order, covering the batch."""
    src: list[str] | None
    text: list[str]


JUDGE_BATCH = 4096
"""Items a batch (`read_columns`), or for `lines` about LINE_BATCH_CHARS characters of lines."""
LINE_BATCH_CHARS = 1 << 19


def read_columns(src: SourceFile, spec: ReadSpec) -> Iterator[Columns]:
    """`read_items` in batches, as columns: `lines` are read a block of characters at a time and split (no
    Item a line), other formats are `read_items` gathered."""
    if src.format == "lines":
        yield from _line_columns(src, spec)
        return
    items, pairs = read_items(src, spec), spec.task == "pairs"
    while batch := list(islice(items, JUDGE_BATCH)):
        runs, start = [], 0
        for k in range(1, len(batch) + 1):
            if k == len(batch) or batch[k].group != batch[start].group:
                runs.append((start, k, batch[start].group))
                start = k
        yield Columns(runs, [item.src for item in batch] if pairs else None, [item.text for item in batch])


def _line_columns(src: SourceFile, spec: ReadSpec) -> Iterator[Columns]:
    """A `lines` file in batches: lines split at \\n after universal-newline decoding, as iterating the text
    file does, a last line without its \\n included; a line's group is its line number // `doc_lines`."""
    first, tail = src.first_line, ""
    with open_text(src.path, src.start, src.end) as f:
        while block := f.read(LINE_BATCH_CHARS):
            lines = (tail + block).split("\n")
            tail = lines.pop()
            if lines:
                yield Columns(_line_runs(first, len(lines), spec.doc_lines), None, lines)
                first += len(lines)
    if tail:
        yield Columns(_line_runs(first, 1, spec.doc_lines), None, [tail])


def _line_runs(first: int, count: int, doc_lines: int) -> list[tuple[int, int, str]]:
    """The groups (`doc_lines` lines each, by line number in the file) of lines first..first+count."""
    runs, start = [], 0
    while start < count:
        group = (first + start) // doc_lines
        end = min(count, (group + 1) * doc_lines - first)
        runs.append((start, end, str(group)))
        start = end
    return runs


def _text_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    """Blank-line separated paragraphs, streamed; the file is one document."""
    block: list[str] = []
    with open_text(src.path) as f:
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield Item("", None, "".join(block))
                block = []
    if block:
        yield Item("", None, "".join(block))


def _line_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    for cols in _line_columns(src, spec):
        for start, end, group in cols.runs:
            yield from (Item(group, None, line) for line in cols.text[start:end])


def _jsonl_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    with open_text(src.path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"data.sources: {src.path}:{i + 1} is not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"data.sources: {src.path}:{i + 1} is not a JSON object")
            yield _row_item(row, i, spec, f"{src.path}:{i + 1}")


def _row_item(row: dict, index: int, spec: ReadSpec, where: str) -> Item:
    """An Item from a JSONL/parquet/HF row, through the `data.fields` mapping."""
    f_src, f_tgt, f_text, f_doc = spec.fields
    group = f"{f_doc}={row[f_doc]}" if row.get(f_doc) is not None else str(index // spec.doc_lines)
    if spec.task == "pairs":
        if f_src not in row or f_tgt not in row:
            raise ValueError(f"data.fields: {where} needs {f_src!r} and {f_tgt!r} fields "
                             "(data.fields.src, data.fields.tgt)")
        return Item(group, _str(row[f_src]), _str(row[f_tgt]))
    key = f_text if f_text in row else f_tgt
    if key not in row:
        raise ValueError(f"data.fields: {where} has no {f_text!r} field (data.fields.text)")
    return Item(group, None, _str(row[key]))


def _str(value) -> str:
    return "" if value is None else str(value)


def _tsv_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    """Tab-separated source and target columns (no quoting); monolingual tasks read the target column."""
    with open_text(src.path, src.start, src.end) as f:
        for i, cols in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=src.first_line):
            if not any(c.strip() for c in cols):
                continue
            if spec.task == "pairs" and len(cols) < 2:
                raise ValueError(f"data.sources: {src.path}:{i + 1} needs a source and a target column")
            yield Item(str(i // spec.doc_lines), cols[0] if spec.task == "pairs" else None, cols[min(1, len(cols) - 1)])


def _parallel_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    with open_text(src.path) as fs, open_text(src.target) as ft:
        for i, (s, t) in enumerate(_aligned(fs, ft, src)):
            yield Item(str(i // spec.doc_lines), s.rstrip("\n") if spec.task == "pairs" else None, t.rstrip("\n"))


def _aligned(fs: IO[str], ft: IO[str], src: SourceFile) -> Iterator[tuple[str, str]]:
    end = object()
    for n, (s, t) in enumerate(zip(_with_end(fs, end), _with_end(ft, end))):
        if s is end or t is end:
            if s is not t:
                raise ValueError(f"data.target_sources: {src.target} and {src.path} are not line-aligned "
                                 f"(one ends at line {n})")
            return
        yield s, t


def _with_end(f: IO[str], end: object) -> Iterator:
    yield from f
    yield end


def _parquet_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    import pyarrow.parquet as pq

    with as_path(src.path).open("rb") as raw:
        table = pq.ParquetFile(raw)
        wanted = [c for c in spec.fields if c in table.schema_arrow.names]
        index = 0
        for batch in table.iter_batches(batch_size=4096, columns=wanted):
            for row in batch.to_pylist():
                yield _row_item(row, index, spec, f"{src.path} row {index}")
                index += 1


def _hf_items(src: SourceFile, spec: ReadSpec) -> Iterator[Item]:
    """A folder saved by HF `datasets` (`save_to_disk`); a DatasetDict's splits in name order."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ValueError(f"data.sources: {src.path} is an HF datasets folder: reading it needs datasets "
                         "(pip install 'seqfoundry[datasets]')") from None
    loaded = load_from_disk(str(src.path))
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, DatasetDict) else [loaded]
    index = 0
    for part in parts:
        for batch in part.iter(batch_size=1024):
            for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                yield _row_item(row, index, spec, f"{src.path} row {index}")
                index += 1


# --- Items → filtered records with document keys and splits ------------------------------------


def split_of(doc: str, valid_fraction: float, test_fraction: float) -> str:
    """The split of document `doc`: a pure function of its key, so adding documents moves none."""
    u = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") / 2**64
    return "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"


class Kept(NamedTuple):
    """A batch of `records`, as columns: runs of consecutive samples of one document (each run at least
    one sample; two runs in a row may share a key, and a key may come back later), then the texts."""

    keys: list[str]
    """Each run's document key, ..."""
    splits: list[int]
    """... its split (index in SPLITS) ..."""
    counts: list[int]
    """... and its number of samples."""
    src: list[str] | None
    """The samples' sources (None for `text`) and ..."""
    tgt: list[str]
    """... targets, whitespace-normalised (`" ".join(t.split())`)."""


def records(src: SourceFile, spec: ReadSpec, drops: Counter, *, max_docs: int = -1) -> Iterator[Record]:
    """The samples of one file after the filters (drops counted by filter, items read as "read"); at most
    `max_docs` documents (in order of first appearance) when >= 0. Every text comes whitespace-normalised
    (`" ".join(t.split())`). A sample at a time: `record_batches` gives the same as columns."""
    pos = 0
    for kept in record_batches(src, spec, drops, max_docs=max_docs):
        sources, first = kept.src or [None] * len(kept.tgt), 0
        for key, split, count in zip(kept.keys, kept.splits, kept.counts):
            for s, t in zip(sources[first:first + count], kept.tgt[first:first + count]):
                yield Record(pos, key, SPLITS[split], s, t)
                pos += 1
            first += count


def record_batches(src: SourceFile, spec: ReadSpec, drops: Counter, *, max_docs: int = -1) -> Iterator[Kept]:
    """`records` as columns, a batch of items at a time (`read_columns`): the prepare hot path, where
    every item of the corpus passes. Monolingual items are judged a batch at a time (`filters.judge_arrays`);
    the document key and split are looked up once a run of items of one group; an item that passes whole
    (the most common) is taken as it is, or normalised when it is not already; only items that are cut
    or restored take the one-item path."""
    docs: dict[str, int] = {}  # document key → split index
    for cols in read_columns(src, spec):
        runs = []  # (start, end, key, split) of the runs of items within max_docs
        for start, end, group in cols.runs:
            key = f"{src.name}:{group}" if group else src.name
            split = docs.get(key)
            if split is None and len(docs) != max_docs:
                split = docs[key] = SPLITS.index(split_of(key, spec.valid_fraction, spec.test_fraction))
            if split is not None:
                runs.append((start, end, key, split))
        if runs:
            drops["read"] += sum(e - s for s, e, _, _ in runs)
            kept = _kept(cols, runs, spec, drops)
            if kept.tgt:
                yield kept


def _kept(cols: Columns, runs: list[tuple[int, int, str, int]], spec: ReadSpec, drops: Counter) -> Kept:
    """The samples of a batch's `runs` (start, end, key, split): those within max_docs."""
    if spec.task == "pairs":  # pairs are only checked for emptiness
        return _one_at_a_time(cols, runs, spec, drops, None)
    f = spec.text_filter
    j = judge_arrays(cols.text, f)
    valid = np.zeros(len(cols.text), dtype=bool)
    for start, end, _, _ in runs:
        valid[start:end] = True
    for code, count in enumerate(np.bincount(j.reason[valid], minlength=len(REASONS)).tolist()):
        if code and count:
            drops[REASONS[code]] += count
    keep = valid & (j.reason == 0)
    if spec.task != "text" or np.any(keep & (j.units > f.max_words)):
        return _one_at_a_time(cols, runs, spec, drops, np.where(keep, j.units, -2))
    texts, kept, normal, out = cols.text, keep.tolist(), j.normal.tolist(), Kept([], [], [], None, [])
    for start, end, key, split in runs:  # each kept item gives itself, normalised if it is not already
        if all(kept[start:end]) and all(normal[start:end]):
            _add_run(out, key, split, texts[start:end])
        else:
            _add_run(out, key, split, [t if normal[k] else " ".join(t.split())
                                       for k, t in enumerate(texts[start:end], start) if kept[k]])
    return out


def _one_at_a_time(cols: Columns, runs: list[tuple[int, int, str, int]], spec: ReadSpec, drops: Counter,
                   units: np.ndarray | None) -> Kept:
    """`_kept` an item at a time; `units`: each monolingual item's units if it passes the filters, else -2."""
    out = Kept([], [], [], [] if spec.task != "text" else None, [])
    sources = cols.src or [None] * len(cols.text)
    for start, end, key, split in runs:
        pairs = [pair for k in range(start, end) if units is None or units[k] >= -1
                 for pair in _samples(sources[k], cols.text[k], spec, drops, -1 if units is None else int(units[k]))]
        if out.src is not None:
            out.src.extend(s for s, _ in pairs)
        _add_run(out, key, split, [t for _, t in pairs])
    return out


def _add_run(kept: Kept, key: str, split: int, tgt: list[str]) -> None:
    """A run's targets (its sources, if any, already added), unless it has none."""
    if tgt:
        kept.keys.append(key)
        kept.splits.append(split)
        kept.counts.append(len(tgt))
        kept.tgt.extend(tgt)


def _samples(src: str | None, text: str, spec: ReadSpec, drops: Counter, units: int) -> list[tuple[str | None, str]]:
    """An item's samples; for text tasks an item that passed the filters, with its units (`judge_arrays`)."""
    if spec.task == "pairs":
        s, t = " ".join(src.split()), " ".join(text.split())
        if not (s and t):
            drops["empty"] += 1
            return []
        return [(s, t)]
    pieces = cut(" ".join(text.split()), spec.text_filter.max_words, units)
    if spec.task != "restore":
        return [(None, p) for p in pieces]
    pairs = [(restore_source(p), p) for p in pieces]
    if not all(s for s, _ in pairs):
        drops["empty"] += sum(not s for s, _ in pairs)
    return [(s, p) for s, p in pairs if s]
