"""Contiguous chunks of a document's token stream (`data.sample_tokens`).

For text pretraining, samples made of single paragraphs are short and
uneven, so token-budget batches carry much padding.  With
`data.sample_tokens=N` a document's paragraphs are joined into one text,
tokenized once, and its token stream is cut into consecutive chunks of
about N tokens (as fairseq's `TokenBlockDataset`, `break_mode=complete_doc`,
and Megatron's document packing do, but never across documents):

    start = 0
    while the rest (n - start) is longer than N:
        end = the last sentence end in (start + N/2, start + N], if any,
              else start + N (a hard cut inside a sentence)
        chunk ids[start:end]; start = end
    the rest is the last chunk

A sentence end is the position after a token whose text ends with '.', '!'
or '?' (`Specials.sentence_end_ids`).  So every chunk holds at most N tokens,
every chunk but a document's last holds more than N/2, chunks end at
sentence ends whenever one falls in that window, and the chunks of a
document, concatenated, are its token stream.  A pure function of
(ids, N, end ids): prepare writes the same shards every time, and the
stream and its resumable cursor see ordinary samples.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def chunk_bounds(ids: Sequence[int] | np.ndarray, target: int, end_ids: Iterable[int]) -> list[tuple[int, int]]:
    """(start, end) of each chunk of `ids` (see the module docstring); [] for an empty stream."""
    if target < 1:
        raise ValueError(f"data.sample_tokens: must be >= 1, got {target}")
    ids = np.asarray(ids)
    n = len(ids)
    ends = np.flatnonzero(np.isin(ids, np.fromiter(end_ids, dtype=np.int64))) + 1  # sorted sentence ends
    bounds, start = [], 0
    while n - start > target:
        lo, hi = start + target // 2, start + target
        i = int(np.searchsorted(ends, hi, side="right")) - 1  # last sentence end <= hi
        end = int(ends[i]) if i >= 0 and ends[i] > lo else hi
        bounds.append((start, end))
        start = end
    if start < n:
        bounds.append((start, n))
    return bounds


def token_chunks(ids: Sequence[int] | np.ndarray, target: int, end_ids: Iterable[int]) -> list[np.ndarray]:
    """The chunks themselves: (length,) slices of `ids`, in order."""
    ids = np.asarray(ids)
    return [ids[start:end] for start, end in chunk_bounds(ids, target, end_ids)]
