"""WebDataset shards of token ids: writing with `webdataset.ShardWriter`, fast reading.

A sample is stored as tar members `<key>.tgt.<u16|u32>` (and `<key>.src.<…>`
for pairs): raw little-endian token ids, no bos/eos. Tar headers are fixed
(mtime 0 as an int, so no PAX headers; owner `seqfoundry`; mode 0444), so the same samples give the same bytes.

Shards are untrusted input (a bucket others can write, a manifest that agrees
with altered files): a shard is read whole into memory only up to
`MAX_SHARD_BYTES`, member names must be `<key>.<field>.<u16|u32>` with a plain
field name, and anything else makes the shard unreadable (`ShardCorrupt`).
Token ids are range-checked by the reader that knows the vocabulary
(`ShardStream`, which skips and counts a bad sample).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable

import numpy as np

from .storage import as_path, is_remote, sha256_file  # noqa: F401  (sha256_file: re-exported)

SUFFIX_OF_DTYPE = {"uint16": "u16", "uint32": "u32"}
DTYPE_OF_SUFFIX = {v: np.dtype(k).newbyteorder("<") for k, v in SUFFIX_OF_DTYPE.items()}
BLOCK = 512
MAX_SHARD_BYTES = 1 << 30
"""The most bytes of one shard held in memory (1 GiB): `read_shard` refuses a larger file before reading
it, naming it. `prepare` writes shards of tens of MB (`data.shard_samples`); a shard over this is not ours."""


class ShardCorrupt(Exception):
    """A shard that cannot be read back (missing, truncated, altered)."""


def ids_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_sample(key: str, fields: dict[str, np.ndarray], dtype: str) -> dict:
    """A ShardWriter sample: token-id arrays as raw little-endian bytes."""
    suffix = SUFFIX_OF_DTYPE[dtype]
    out: dict = {"__key__": key}
    for name, ids in fields.items():
        out[f"{name}.{suffix}"] = np.asarray(ids, dtype=DTYPE_OF_SUFFIX[suffix]).tobytes()
    return out


END_OF_ARCHIVE = bytes(2 * BLOCK)


def tar_sample(key: str, fields: dict[str, np.ndarray], dtype: str) -> bytes:
    """One sample as plain USTAR tar members (`<key>.<field>.<u16|u32>`, the headers `SplitWriter` writes:
    mtime 0, owner `seqfoundry`, mode 0444), without the end-of-archive marker: samples and pieces of
    samples concatenate into a shard, which `END_OF_ARCHIVE` closes."""
    out = bytearray()
    for name, data in encode_sample(key, fields, dtype).items():
        if name != "__key__":
            out += ustar_header(f"{key}.{name}".encode(), len(data))
            out += data + bytes(-len(data) % BLOCK)
    return bytes(out)


@dataclass(frozen=True)
class NumberedKeys:
    """Keys `prefix + f"{n:0{digits}d}"` for each n of `numbers` (each below 10**digits): what `tar_samples`
    turns into member names with array operations, without a string a key."""

    prefix: str
    numbers: np.ndarray
    digits: int

    def __len__(self) -> int:
        return len(self.numbers)

    def name_rows(self, fields: tuple[str, ...], suffix: str) -> np.ndarray:
        """`<key>.<field>.<suffix>` of every sample's members (sample-major), NUL-padded rows of one width."""
        head = np.frombuffer(self.prefix.encode(), dtype=np.uint8)
        tails = [f".{name}.{suffix}".encode() for name in fields]
        cut = len(head) + self.digits
        rows = np.zeros((len(self.numbers), len(fields), cut + max(map(len, tails))), dtype=np.uint8)
        rows[:, :, :len(head)] = head
        powers = 10 ** np.arange(self.digits - 1, -1, -1, dtype=np.uint64)
        rows[:, :, len(head):cut] = (self.numbers.astype(np.uint64)[:, None] // powers % 10 + ord("0"))[:, None, :]
        for j, tail in enumerate(tails):
            rows[:, j, cut:cut + len(tail)] = np.frombuffer(tail, dtype=np.uint8)
        return rows.reshape(-1, rows.shape[2])


def tar_samples(keys: list[str] | NumberedKeys, fields: list[dict[str, list[int]]],
                dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """`tar_sample` of many samples at once, in one byte array, and the offset where each sample ends. The same
    bytes, built with whole-batch array operations (names, headers, checksums, payload placement) instead of a
    few Python calls per member: the prepare hot path (parity with `tar_sample` in the tests). With
    `NumberedKeys`, every sample has the fields of the first."""
    suffix = SUFFIX_OF_DTYPE[dtype]
    itemsize = DTYPE_OF_SUFFIX[suffix].itemsize
    lists = [ids for f in fields for ids in f.values()]
    if not lists:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64)
    if isinstance(keys, NumberedKeys):
        names = keys.name_rows(tuple(fields[0]), suffix)
    else:
        names = _name_rows([f"{key}.{name}.{suffix}".encode() for key, f in zip(keys, fields) for name in f])
    if names.shape[1] > 100:
        raise ValueError(f"tar member name over 100 bytes: {bytes(names[np.argmax((names > 0).sum(1))])!r}")
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    payload = np.fromiter(chain.from_iterable(lists), dtype=DTYPE_OF_SUFFIX[suffix], count=int(lengths.sum()))
    sizes = lengths * itemsize
    blocks = 1 + -(-sizes // BLOCK)  # the header, then the payload padded to whole blocks
    starts = np.concatenate(([0], np.cumsum(blocks)[:-1])) * BLOCK
    out = np.zeros(int(blocks.sum()) * BLOCK, dtype=np.uint8)
    out.reshape(-1, BLOCK)[starts // BLOCK] = _headers(names, sizes)
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # each member's first token in `payload`
    ids = out.view(payload.dtype)  # a payload starts on a block: placed a token (not a byte) at a time
    ids[np.repeat((starts + BLOCK) // itemsize - first, lengths) + np.arange(len(payload))] = payload
    per_sample = np.add.reduceat(blocks, np.cumsum([0] + [len(f) for f in fields[:-1]]))
    return out, np.cumsum(per_sample) * BLOCK


def _name_rows(names: list[bytes]) -> np.ndarray:
    longest = max(map(len, names))
    return np.frombuffer(b"".join(n.ljust(longest, b"\0") for n in names), dtype=np.uint8).reshape(-1, longest)


def _headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """`ustar_header(name, size)` of every member, as rows of a (members, 512) array; `names`: NUL-padded rows."""
    h = np.tile(np.frombuffer(_HEADER_TEMPLATE, dtype=np.uint8), (len(names), 1))
    h[:, :names.shape[1]] = names
    h[:, 124:135] = size = _octal(sizes, 11)  # then the size field's NUL, as in the template
    h[:, 135] = 0
    # the sum of the header's bytes, as `ustar_header`: the template's (its checksum field counting as 8
    # spaces, its name and size fields zeros) plus the name and size set here, not 512 bytes summed a member
    checksum = _TEMPLATE_SUM + names.sum(axis=1, dtype=np.int64) + size.sum(axis=1, dtype=np.int64)
    h[:, 148:154] = _octal(checksum, 6)
    h[:, 154:156] = (0, ord(" "))
    return h


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """Zero-padded octal digits (ASCII) of each value, a row each."""
    shifts = 3 * np.arange(digits - 1, -1, -1)
    return ((values[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def ustar_header(name: bytes, size: int) -> bytes:
    """The header `tarfile.TarInfo.tobuf(USTAR_FORMAT)` writes for a regular file `name` of `size` bytes with
    our fixed attributes, without its per-member overhead (the prepare hot path; parity in the tests)."""
    if len(name) > 100:
        raise ValueError(f"tar member name over 100 bytes: {name!r}")
    h = bytearray(_HEADER_TEMPLATE)
    h[:len(name)] = name
    h[124:136] = size_field = b"%011o\0" % size
    # the checksum is the sum of the header's bytes: the template's (its name and size fields are zeros)
    # plus the two fields set here, without summing 512 bytes a member
    h[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(size_field))
    return bytes(h)


def _header_template() -> bytes:
    h = bytearray(BLOCK)
    h[100:124] = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid
    h[136:148] = b"00000000000\0"  # mtime 0
    h[148:156] = b" " * 8  # the checksum field counts as spaces
    h[156:157] = b"0"  # a regular file
    h[257:265] = b"ustar\x0000"
    h[265:275] = h[297:307] = b"seqfoundry"  # uname, gname
    return bytes(h)


_HEADER_TEMPLATE = _header_template()
_TEMPLATE_SUM = sum(_HEADER_TEMPLATE)


@dataclass
class WrittenShard:
    path: Path
    samples: int
    tokens: int
    sha256: str = ""
    """Computed as the shard was written, where the writer did (the manifest hashes the others)."""


class SplitWriter:
    """Writes one split's samples, in order, into `<folder>/<split>-%06d.tar` shards."""

    def __init__(self, folder: Path, split: str, shard_samples: int):
        import webdataset as wds  # here, not at the top: webdataset imports torch, which prepare tasks need not

        pattern = str(folder / f"{split}-%06d.tar").replace("%", "%%").replace("%%06d", "%06d")
        self.split = split
        self.shards: list[WrittenShard] = []
        self._tokens = 0
        self._writer = wds.ShardWriter(pattern, maxcount=shard_samples, maxsize=float("inf"), verbose=0,
                                       post=self._closed, encoder=False, mtime=0, user="seqfoundry",
                                       group="seqfoundry", mode=0o444)

    def write(self, sample: dict, tokens: int) -> None:
        self._writer.write(sample)  # may first close the previous shard (→ _closed)
        self._tokens += tokens

    def _closed(self, fname: str) -> None:
        self.shards.append(WrittenShard(Path(fname), self._writer.count, self._tokens))
        self._tokens = 0

    def close(self) -> list[WrittenShard]:
        self._writer.close()
        return self.shards


# --- reading ------------------------------------------------------------------------


def read_shard(path: str | Path, *, expect_samples: int, check_headers: bool = True,
               sha256: str | None = None, max_bytes: int = MAX_SHARD_BYTES) -> list[dict]:
    """All samples of a shard, in file order: `{"__key__", "tgt"[, "src"]}` with numpy id arrays.

    `path` may be a local path or an object-storage URL (read in one request).
    The arrays are views of the shard's bytes (no copy). Raises ShardCorrupt when
    the file cannot be read, is larger than `max_bytes`, is malformed, differs
    from `sha256` (when given), or holds a different number of samples.
    """
    try:
        buf = _read_all(as_path(path), max_bytes)
    except OSError as err:
        raise ShardCorrupt(f"{path}: {err.strerror or err}") from None
    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise ShardCorrupt(f"{path}: sha256 differs from the manifest (altered)")
    try:
        members = _index_tar(buf, check_headers) if _plain_ustar(buf) else _index_with_tarfile(buf)
        samples = _group(buf, members)
    except (ValueError, KeyError, tarfile.TarError, struct.error) as err:
        raise ShardCorrupt(f"{path}: not a readable shard ({err})") from None
    if len(samples) != expect_samples:
        raise ShardCorrupt(f"{path}: holds {len(samples)} samples, the manifest says {expect_samples}")
    return samples


def over_cap(path: str | Path, size: int, max_bytes: int) -> str:
    return (f"{path}: {size} bytes, over the {max_bytes}-byte cap on one shard in memory "
            "(data_pipeline.shards.MAX_SHARD_BYTES; prepare smaller shards with data.shard_samples)")


def _read_all(path: Path, max_bytes: int) -> bytearray:
    # A bytearray, so that the numpy views are writable (torch warns about read-only ones).
    with path.open("rb") as f:
        if is_remote(path):
            size = getattr(f, "size", None)
            if size is not None and size > max_bytes:
                raise ShardCorrupt(over_cap(path, size, max_bytes))
            buf = bytearray(f.read(max_bytes + 1))  # a lying size: never more than the cap (+1 to tell)
            if len(buf) > max_bytes:
                raise ShardCorrupt(over_cap(path, len(buf), max_bytes))
            return buf
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ShardCorrupt(over_cap(path, size, max_bytes))
        buf = bytearray(size)
        n = f.readinto(buf)
    return buf if n == len(buf) else buf[:n]


def _plain_ustar(buf: bytes) -> bool:
    return len(buf) >= BLOCK and buf[257:262] == b"ustar"


def _index_tar(buf: bytes, check_headers: bool) -> list[tuple[str, int, int]]:
    # Why not `tarfile`: its per-member cost (TarInfo parsing, extractfile) is
    # most of the time spent reading small samples; ShardWriter writes plain
    # USTAR headers, whose name/size fields we read directly (see
    # benchmarks/stream_vs_raw_tar.py). Anything unusual falls back to tarfile.
    members, off, end = [], 0, len(buf)
    while off + BLOCK <= end:
        header = buf[off:off + BLOCK]
        if header.count(0) == BLOCK:
            return members  # end-of-archive marker
        if check_headers:
            _check_sum(header)
        kind = header[156:157]
        if kind not in (b"0", b"\0") or header[124] & 0x80:
            return _index_with_tarfile(buf)  # pax/GNU extensions or base-256 sizes
        size = int(header[124:136].rstrip(b" \0") or b"0", 8)
        name = header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0")
        if prefix:
            name = prefix.decode() + "/" + name
        data = off + BLOCK
        if data + size > end:
            raise ValueError(f"member {name!r} runs past the end of the file (truncated)")
        members.append((name, data, size))
        off = data + -(-size // BLOCK) * BLOCK
    raise ValueError("no end-of-archive marker (truncated)")


def _check_sum(header: bytes) -> None:
    stored = int(header[148:156].rstrip(b" \0") or b"0", 8)
    if stored != sum(struct.unpack_from("148B8x356B", header)) + 256:
        raise ValueError("bad tar header checksum")


def _index_with_tarfile(buf: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]


def _group(buf: bytearray, members: Iterable[tuple[str, int, int]]) -> list[dict]:
    """Consecutive members `<key>.<field>.<suffix>` → one dict per key."""
    samples: list[dict] = []
    current: dict = {"__key__": None}
    keys: set[str] = set()
    for name, offset, size in members:
        key, field_name, suffix = name.rsplit("/", 1)[-1].split(".")
        if not field_name.isidentifier() or field_name.startswith("_"):
            raise ValueError(f"member {name!r}: {field_name!r} is not a field name")
        dtype = DTYPE_OF_SUFFIX[suffix]
        if current["__key__"] != key:
            if key in keys:
                raise ValueError(f"key {key!r} appears twice")
            keys.add(key)
            current = {"__key__": key}
            samples.append(current)
        current[field_name] = np.frombuffer(buf, dtype=dtype, count=size // dtype.itemsize, offset=offset)
    return samples
