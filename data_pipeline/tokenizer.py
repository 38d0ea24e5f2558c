"""Tokenizer training and loading with HF `tokenizers` (byte-level BPE or Unigram).

Ids are fixed for every tokenizer the project trains (DESIGN.md, "Token ids"):
pad 0, bos 1, eos 2, unk 3, then `num_sentinels` T5 sentinels `<extra_id_i>`
(ids 4 … 4+S-1), then the BART `<mask>` token (id 4+S), then the learned
vocabulary. The values match `trainers.models.config` (which this package
must not import).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
FIRST_SENTINEL_ID = 4
NAMED_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
SENTENCE_END_CHARS = ".!?"
TOKENIZER_TYPES = ("bpe", "unigram")


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def special_tokens(num_sentinels: int) -> list[str]:
    """The reserved tokens in id order: pad, bos, eos, unk, sentinels, mask."""
    return [*NAMED_SPECIALS, *(sentinel_token(i) for i in range(num_sentinels)), MASK_TOKEN]


@dataclass(frozen=True)
class Specials:
    """Reserved ids of a prepared dataset's tokenizer (stored in its manifest)."""

    num_sentinels: int
    sentence_end_ids: tuple[int, ...] = field(default=())
    """Tokens that end a sentence (for BART sentence permutation)."""
    pad: int = PAD_ID
    bos: int = BOS_ID
    eos: int = EOS_ID
    unk: int = UNK_ID
    first_sentinel: int = FIRST_SENTINEL_ID

    @property
    def mask(self) -> int:
        return self.first_sentinel + self.num_sentinels

    def sentinel(self, i: int) -> int:
        return self.first_sentinel + i

    def to_json(self) -> dict:
        return {**asdict(self), "sentence_end_ids": list(self.sentence_end_ids), "mask": self.mask}

    @classmethod
    def from_json(cls, d: dict) -> "Specials":
        return cls(num_sentinels=d["num_sentinels"], sentence_end_ids=tuple(d.get("sentence_end_ids", ())))


def train_tokenizer(texts: Iterable[str], *, kind: str, vocab_size: int, num_sentinels: int) -> Tokenizer:
    """Train a byte-level BPE (`bpe`) or Unigram (`unigram`) tokenizer on `texts`.

    Deterministic: the same texts in the same order give the same tokenizer.json.
    """
    specials = special_tokens(num_sentinels)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token="<unk>", show_progress=False)
    else:
        raise ValueError(f"data.tokenizer_type: must be one of {TOKENIZER_TYPES}, got {kind!r}")
    tok.train_from_iterator(texts, trainer)
    if kind == "unigram":
        tok = _canonical_unigram(tok, len(specials))
    check_specials(tok, num_sentinels)
    return tok


def _canonical_unigram(tok: Tokenizer, n_special: int) -> Tokenizer:
    # Two runs of the Unigram trainer differ in three ways that do not matter
    # for tokenization: float noise in the last digits of scores (parallel sums),
    # hash-map order among equal scores, and the hash-map order in which it
    # appends required characters with scores min - 1e-4·k. Rounding, sorting
    # by (-score, piece) and sorting that tail by character make the file reproducible.
    state = json.loads(tok.to_str())
    vocab = [[piece, round(score, 8)] for piece, score in state["model"]["vocab"]]
    learned = vocab[n_special:]
    tail = _required_chars_start(learned)
    head = sorted(learned[:tail], key=lambda ps: (-ps[1], ps[0]))
    chars = sorted(piece for piece, _ in learned[tail:])
    state["model"]["vocab"] = vocab[:n_special] + head + [[c, ps[1]] for c, ps in zip(chars, learned[tail:])]
    return Tokenizer.from_str(json.dumps(state))


def _required_chars_start(pieces: list[list]) -> int:
    """Start of the trailing run of single characters whose scores step down by 1e-4."""
    start = len(pieces)
    while start > 0 and len(pieces[start - 1][0]) == 1 and (
            start == len(pieces) or abs(pieces[start - 1][1] - pieces[start][1] - 1e-4) < 1e-6):
        start -= 1
    return start


def check_specials(tok: Tokenizer, num_sentinels: int) -> None:
    """Raise ValueError unless `tok` maps every reserved token to its fixed id."""
    for want, token in enumerate(special_tokens(num_sentinels)):
        got = tok.token_to_id(token)
        if got != want:
            raise ValueError(f"data.tokenizer: token {token!r} must have id {want}, has {got}")


def sentence_end_ids(tok: Tokenizer, num_sentinels: int) -> tuple[int, ...]:
    """Ids of learned tokens whose text ends a sentence ('.', '!' or '?', then spaces)."""
    first_learned = len(special_tokens(num_sentinels))
    ends = []
    for i in range(first_learned, tok.get_vocab_size()):
        text = tok.decode([i]).rstrip()
        if text and text[-1] in SENTENCE_END_CHARS:
            ends.append(i)
    return tuple(ends)


@functools.lru_cache(maxsize=1)
def shared_tokenizer(tok_json: str) -> Tokenizer:
    """The `Tokenizer` of a tokenizer.json string, one a process (a prepare task's worker runs many tasks with
    the same one). Building one per task is what it saves: with tokenizers 0.23 each built and used tokenizer
    kept ~25 MB after it was dropped, so a Ray worker grew with the corpus."""
    return Tokenizer.from_str(tok_json)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without bos/eos, in one batch call. `encode_batch_fast` gives the ids of
    `encode_batch` without computing character offsets, which prepare never reads: ~1.3x the tokens/s
    on one thread (benchmarks/prepare_scaling.py prints both)."""
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def tokenize(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos (the collator adds them)."""
    return tok.encode(text, add_special_tokens=False).ids


def detokenize(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping pad/bos/eos and the other reserved tokens."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)
