"""One big line-oriented file read as several parts, so that a single huge `corpus.txt` is many tasks' work.

A part is a byte range of a file that starts right after a line end, at a line number that is a multiple of
`data.doc_lines`. So every document (a group of `doc_lines` lines) lies in one part, and reading the parts in
order gives exactly the items of reading the file whole: the same line numbers, groups, document keys and
splits. Lines are counted as Python's text mode counts them (universal newlines: `\\n`, `\\r\\n`, a lone `\\r`).

Only plain (uncompressed) `lines` and `tsv` files are split, and not with `data.max_documents` (its caps are
per file): a compressed stream cannot be entered in the middle, and JSONL rows may name their document
(`data.fields.doc`) anywhere in the file. Where the parts start depends only on the file and on
`data.part_bytes`, and the output does not depend on them at all (`scale` offsets each part's positions).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import IO

from .formats import COMPRESSIONS, SourceFile
from .storage import as_path

SPLITTABLE = ("lines", "tsv")
BLOCK = 1 << 24
_EOL = re.compile(rb"\r\n|\r|\n")


def splittable(src: SourceFile, part_bytes: int) -> bool:
    return (part_bytes > 0 and src.format in SPLITTABLE and src.target is None
            and not src.path.lower().endswith(COMPRESSIONS) and as_path(src.path).stat().st_size > part_bytes)


def parts_of(src: SourceFile, part_bytes: int, doc_lines: int) -> list[SourceFile]:
    """`src` as consecutive parts of about `part_bytes` bytes or more (one part if it has no cut)."""
    cuts = cut_points(src.path, part_bytes, doc_lines)
    bounds = [(0, 0), *cuts]
    return [replace(src, start=start, end=(cuts[i][0] if i < len(cuts) else -1), first_line=line)
            for i, (start, line) in enumerate(bounds)]


def cut_points(path: str, part_bytes: int, doc_lines: int) -> list[tuple[int, int]]:
    """(byte offset, line number) of where each part after the first starts: after a line end, at a line
    number that is a multiple of `doc_lines`, at least `part_bytes` after the previous start."""
    cuts: list[tuple[int, int]] = []
    offset = line = last = 0  # the block's offset, lines ended before it, the current part's start
    with as_path(path).open("rb") as f:
        while block := _block(f):
            if offset + len(block) - last < part_bytes:  # no cut due in this block: count only
                line += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
            else:
                for m in _EOL.finditer(block):
                    line += 1
                    end = offset + m.end()
                    if end - last >= part_bytes and line % doc_lines == 0:
                        cuts.append((end, line))
                        last = end
            offset += len(block)
    return [c for c in cuts if c[0] < offset]  # a cut at the very end would make an empty part


def _block(f: IO[bytes]) -> bytes:
    """The next block, extended so that it never ends between the `\\r` and `\\n` of one line end."""
    block = f.read(BLOCK)
    while block.endswith(b"\r"):
        more = f.read(1)
        if not more:
            break
        block += more
    return block
