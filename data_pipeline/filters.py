"""Filters for monolingual text in any script, each a `data.*` key, each counted.

A sample of monolingual text (`data.task=text` or `restore`) passes, in order:

    drop_code   not an indented block, no line starting with `>>>`, `...`, `$ `, `def `, `class `
    min_alpha   letters (Unicode categories L and M, any script) >= min_alpha of its non-space characters
    min_words   length >= min_words, in *units*: whitespace words, plus one unit per character of a
                script written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar,
                Tibetan), so that a Chinese line is measured in characters and an English one in words

Longer texts are cut at sentence ends (`.!?` followed by a space; `。！？` anywhere) into pieces of at most
`max_words` units. Nothing looks at letter case, so lower-cased text, digit-initial lines, Arabic and
Chinese pass alike. Pairs (`data.task=pairs`) are only checked for emptiness. `dedup` (exact duplicates
across the corpus) is counted by the prepare stage that sees the whole corpus.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

FILTERS = ("empty", "drop_code", "min_alpha", "min_words", "dedup")
"""Every counted reason a sample is dropped, each named after its `data.*` key (`empty`: no text at all)."""
_NO_SPACE_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FFFF),  # CJK extensions B-F
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")
_CODE_STARTS = (">>>", "...", "$ ", "def ", "class ")
_ASCII_NOT_LETTERS = bytes(c for c in range(128) if not chr(c).isalpha())


@dataclass(frozen=True)
class TextFilter:
    """The `data.*` filter settings for monolingual text."""

    min_words: int = 6
    max_words: int = 120
    min_alpha: float = 0.75
    drop_code: bool = True


_NO_SPACE = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _NO_SPACE_SCRIPTS)
_NO_SPACE_RE = re.compile(f"[{_NO_SPACE}]")
_NOT_LETTER = re.compile(r"[\W\d_]")
_UNIT = re.compile(f"[{_NO_SPACE}]|[^\\s{_NO_SPACE}]+")  # one character of those scripts, or a word


def no_space_char(c: str) -> bool:
    code = ord(c)
    return any(lo <= code <= hi for lo, hi in _NO_SPACE_SCRIPTS)


def text_units(text: str, words: int = -1) -> int:
    """Length in words, each character of a script written without spaces counting as one word. `words`:
    len(text.split()), where the caller knows it."""
    if text.isascii():  # isascii is O(1): CPython records it
        return words if words >= 0 else len(text.split())
    # each such character one unit, then the words left between them: `_UNIT`'s matches, counted without
    # making a string of each character
    spaced, chars = _NO_SPACE_RE.subn(" ", text)
    return chars + (words if not chars and words >= 0 else len(spaced.split()))


def alpha_share(text: str, enough: float = 1.0, visible: int = -1) -> float:
    """Share of letters and combining marks among the non-space characters; stops early (returning a value
    >= `enough`) when the letters alone reach `enough`, which needs no per-character lookup. `visible`:
    the non-space characters, where the caller knows them."""
    if visible < 0:
        visible = len(text) - sum(map(text.count, " \t\n\r\f\v"))
    if not visible:
        return 0.0
    if text.isascii():  # letters are A-Z, a-z: count them in C
        return len(text.encode("ascii").translate(None, _ASCII_NOT_LETTERS)) / visible
    letters = len(_NOT_LETTER.sub("", text))  # str.isalpha's letters, fast
    if letters >= enough * visible:
        return letters / visible
    return sum(unicodedata.category(c)[0] in "LM" for c in text if not c.isspace()) / visible


def looks_like_code(block: str) -> bool:
    if block.strip() and block.lstrip("\n")[0].isspace():
        return True  # an indented block: a code sample, grammar rule or listing
    return any(line.lstrip().startswith(_CODE_STARTS) for line in block.splitlines())


def _judged(block: str, f: TextFilter) -> tuple[str | None, str, int]:
    """(the first filter that drops `block` or None, its normalized text, its units: -1 if not counted)."""
    words = block.split()
    text = " ".join(words)
    if not text:
        return "empty", text, -1
    if f.drop_code and looks_like_code(block):
        return "drop_code", text, -1
    # `text` is words joined by single spaces: its non-space characters are all but len(words) - 1
    if f.min_alpha and alpha_share(text, f.min_alpha, len(text) - len(words) + 1) < f.min_alpha:
        return "min_alpha", text, -1
    units = text_units(text, len(words))
    return ("min_words" if units < f.min_words else None), text, units


class Judgments(NamedTuple):
    """`judge_arrays`' answers, one entry a block."""

    reason: np.ndarray
    """0: kept, else 1 + the index in FILTERS of the first filter that drops the block (uint8)."""
    units: np.ndarray
    """Its length in units, -1 where not counted (as `_judged`)."""
    normal: np.ndarray
    """Whether it is whitespace-normalised already (it equals `" ".join(block.split())`)."""


REASONS = (None, *FILTERS)
"""`Judgments.reason`'s codes, by name."""


def judge_arrays(blocks: list[str], f: TextFilter) -> Judgments:
    """`_judged` of many blocks at once, from whole-array operations on the blocks' code points (flags per
    code point from `_CharFlags`, sums per block by `np.add.reduceat`) instead of a few Python calls a
    block: the prepare hot path (parity with `_judged` in the tests). A block with a line break inside
    goes through `_judged`. Also says which blocks need no whitespace normalisation."""
    n = len(blocks)
    if not any(blocks):
        return Judgments(np.full(n, 1 + FILTERS.index("empty"), np.uint8), np.full(n, -1, np.int64),
                         np.array([not b for b in blocks], dtype=bool))
    cps = np.frombuffer("".join(blocks).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    flags = _CHAR_FLAGS.of(cps)
    lengths = np.fromiter(map(len, blocks), dtype=np.int64, count=n)
    ends = np.cumsum(lengths)
    starts = ends - lengths

    nonempty = lengths > 0

    def per_block(mask: np.ndarray) -> np.ndarray:
        out = np.zeros(n, dtype=np.int64)
        out[nonempty] = np.add.reduceat(mask, starts[nonempty], dtype=np.int64)  # the starts increase strictly
        return out

    space, nospace = (flags & _SPACE) > 0, (flags & _NOSPACE) > 0
    visible = per_block(~space)
    word = ~space & ~nospace  # a unit is a run of these, or one character of a script without spaces
    after = np.zeros(len(cps), dtype=bool)
    after[1:] = word[:-1]
    after[starts[nonempty]] = False  # a block's first character starts a run
    units = per_block(nospace) + per_block(word & ~after)
    reason = np.zeros(n, dtype=np.uint8)
    if f.min_words:
        reason[units < f.min_words] = 1 + FILTERS.index("min_words")
    if f.min_alpha:
        fast, letters = per_block((flags & _FAST_LETTER) > 0), per_block((flags & _LETTER) > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(fast >= f.min_alpha * visible, fast, letters) / visible
        reason[share < f.min_alpha] = 1 + FILTERS.index("min_alpha")
    if f.drop_code:
        reason[_code(cps, space, starts, ends)] = 1 + FILTERS.index("drop_code")
    reason[visible == 0] = 1 + FILTERS.index("empty")
    units[(reason > 0) & (reason != 1 + FILTERS.index("min_words"))] = -1  # as `_judged`: counted only if reached
    for k in np.flatnonzero(per_block((flags & _LINE_BREAK) > 0)).tolist():  # rare: `looks_like_code` per line
        r, _, units[k] = _judged(blocks[k], f)
        reason[k] = REASONS.index(r)
    return Judgments(reason, units, _normal(cps, space, starts, ends, per_block))


def _normal(cps: np.ndarray, space: np.ndarray, starts: np.ndarray, ends: np.ndarray, per_block) -> np.ndarray:
    """Which blocks equal `" ".join(block.split())`: every space is U+0020, none follows another, none
    starts or ends the block (`str.split` splits at `str.isspace`, the space flag)."""
    bad = space & (cps != 32)
    bad[1:] |= space[1:] & space[:-1]  # a pair across two blocks: one of them starts or ends with a space
    out = per_block(bad) == 0
    full = ends > starts
    out[full] &= ~space[starts[full]] & ~space[ends[full] - 1]
    return out


def _code(cps: np.ndarray, space: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """`looks_like_code` of one-line blocks: the first character is a space, or the first after the leading
    spaces starts one of `_CODE_STARTS`."""
    seen = np.flatnonzero(~space)
    k = np.minimum(np.searchsorted(seen, starts), max(len(seen) - 1, 0))
    first = seen[k] if len(seen) else starts  # each block's first non-space character, if `inside` it
    inside = (first >= starts) & (first < ends)
    code = inside & (first > starts)
    width = max(map(len, _CODE_STARTS))
    at = first[:, None] + np.arange(width)  # (blocks, width)
    chars = np.where(at < ends[:, None], cps[np.minimum(at, len(cps) - 1)], 0)
    for start in _CODE_STARTS:
        code |= inside & np.all(chars[:, :len(start)] == np.array([ord(c) for c in start]), axis=1)
    return code


_SPACE, _FAST_LETTER, _LETTER, _NOSPACE, _LINE_BREAK = 1, 2, 4, 8, 16


class _CharFlags:
    """Per code point: a space (`str.isspace`), a letter as `alpha_share` counts first (`_NOT_LETTER` does not
    match it), a letter or mark (categories L, M), a character of a script without spaces, a line break
    (`str.splitlines`). Each flag is what the per-block code computes, asked of the character itself; a
    table of every code point (1.1 MB), filled for the code points met so far."""

    def __init__(self):
        self.flags = np.zeros(0x110000, dtype=np.uint8)
        self.known = np.zeros(0x110000, dtype=bool)

    def of(self, cps: np.ndarray) -> np.ndarray:
        new = cps[~self.known[cps]]
        if len(new):
            for cp in np.unique(new).tolist():
                self.flags[cp] = _flags(chr(cp))
            self.known[new] = True
        return self.flags[cps]


def _flags(c: str) -> int:
    return ((_SPACE if c.isspace() else 0) | (0 if _NOT_LETTER.match(c) else _FAST_LETTER)
            | (_LETTER if unicodedata.category(c)[0] in "LM" else 0) | (_NOSPACE if _NO_SPACE_RE.match(c) else 0)
            | (_LINE_BREAK if len(f"a{c}a".splitlines()) > 1 else 0))


_CHAR_FLAGS = _CharFlags()


def cut(text: str, max_units: int, units: int = -1) -> list[str]:
    """`text` cut at sentence ends into pieces of at most `max_units` units (a long sentence truncated);
    sentences joined into one piece keep the spacing they had. `units`: text_units(text), if known."""
    if (units if units >= 0 else text_units(text)) <= max_units:
        return [text]
    bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.end() < len(text)), len(text)]
    pieces: list[tuple[int, int]] = []  # (start, end) in `text`
    units = 0
    for start, end in zip(bounds, bounds[1:]):
        n = text_units(text[start:end])
        if pieces and units + n <= max_units:
            pieces[-1] = (pieces[-1][0], end)
            units += n
        else:
            pieces.append((start, end))
            units = n
    return [_truncate(text[a:b].strip(), max_units) for a, b in pieces]


def _truncate(text: str, max_units: int) -> str:
    ends = [m.end() for m in _UNIT.finditer(text)]
    return text if len(ends) <= max_units else text[:ends[max_units - 1]]


def filter_text(block: str, f: TextFilter, drops: Counter) -> list[str]:
    """The pieces of `block` that pass `f`; the reason of a drop is counted in `drops`."""
    reason, text, units = _judged(block, f)
    if reason:
        drops[reason] += 1
        return []
    return cut(text, f.max_words, units)
