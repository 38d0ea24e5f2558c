"""Training objectives: a stream sample → an `Example` (source ids, target ids).

- `BartInfilling` (Lewis et al., 2019): spans with Poisson(λ) lengths cover
  `mask_ratio` of the tokens; each span, including 0-length ones (an
  insertion), becomes one `<mask>` in the source; optionally the sentences
  are permuted first; a `clean_ratio` share of samples is left unnoised.
  Target: the clean text. Token-level spans (fairseq
  masks whole words; with byte-level BPE the difference is small).
- `T5SpanCorruption` (Raffel et al., 2019, `random_spans_noise_mask`):
  `noise_density` of the tokens in spans of mean length `mean_span_length`;
  source: the text with span i replaced by sentinel i; target: sentinel i
  followed by span i, for every span.
- `PairPassThrough`: `src`/`tgt` as stored (fine-tuning).

Noise is a pure function of (seed, sample key, epoch): a resumed run, a
different rank or a different DataLoader worker draws exactly the same noise
for the same sample, and each epoch draws fresh noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import ObjectiveConfig
from .tokenizer import Specials


@dataclass(frozen=True)
class Example:
    key: str
    index: int
    """The stream's `__index__` of the sample (-1 if it came from elsewhere)."""
    src: np.ndarray
    """(S,) source ids, no eos (the collator adds it)."""
    tgt: np.ndarray
    """(T,) target ids, no bos/eos (the collator adds them)."""


class Objective(Protocol):
    def __call__(self, sample: dict, *, epoch: int = 0) -> Example: ...


def noise_rng(seed: int, key: str, epoch: int = 0) -> np.random.Generator:
    """The random generator of one sample's noise: a pure function of (seed, key, epoch)."""
    key_hash = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key_hash])


@dataclass(frozen=True)
class PairPassThrough:
    def __call__(self, sample: dict, *, epoch: int = 0) -> Example:
        return Example(sample["__key__"], sample.get("__index__", -1), sample["src"], sample["tgt"])


@dataclass(frozen=True)
class BartInfilling:
    mask_id: int
    seed: int
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.5
    permute_sentences: bool = False
    sentence_end_ids: tuple[int, ...] = ()
    clean_ratio: float = 0.0

    def __call__(self, sample: dict, *, epoch: int = 0) -> Example:
        tgt = sample["tgt"]
        rng = noise_rng(self.seed, sample["__key__"], epoch)
        if self.clean_ratio and rng.random() < self.clean_ratio:  # no draw at 0: the noise stays as it was
            return Example(sample["__key__"], sample.get("__index__", -1), tgt, tgt)
        src = permute_sentences(tgt, self.sentence_end_ids, rng) if self.permute_sentences else tgt
        src = text_infilling(src, rng, mask_ratio=self.mask_ratio, poisson_lambda=self.poisson_lambda,
                             mask_id=self.mask_id)
        return Example(sample["__key__"], sample.get("__index__", -1), src, tgt)


@dataclass(frozen=True)
class T5SpanCorruption:
    first_sentinel: int
    num_sentinels: int
    seed: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __call__(self, sample: dict, *, epoch: int = 0) -> Example:
        rng = noise_rng(self.seed, sample["__key__"], epoch)
        src, tgt = span_corruption(sample["tgt"], rng, noise_density=self.noise_density,
                                   mean_span_length=self.mean_span_length, first_sentinel=self.first_sentinel,
                                   num_sentinels=self.num_sentinels)
        return Example(sample["__key__"], sample.get("__index__", -1), src, tgt)


def build_objective(cfg: ObjectiveConfig, specials: Specials, *, seed: int,
                    fields: tuple[str, ...] = ("tgt",)) -> Objective:
    """The objective `cfg.name` for a dataset with these specials and sample fields."""
    if cfg.name == "pairs":
        if "src" not in fields:
            raise ValueError("objective.name: 'pairs' needs a dataset with sources (data.task=restore or pairs)")
        return PairPassThrough()
    if cfg.name == "bart":
        return BartInfilling(specials.mask, seed, cfg.mask_ratio, cfg.poisson_lambda, cfg.permute_sentences,
                             specials.sentence_end_ids, cfg.clean_ratio)
    if specials.num_sentinels < 1:
        raise ValueError("objective.name: 't5' needs sentinel tokens (data.num_sentinels > 0)")
    return T5SpanCorruption(specials.first_sentinel, specials.num_sentinels, seed, cfg.noise_density,
                            cfg.mean_span_length)


# --- the noise functions ---------------------------------------------------------------


def text_infilling(ids: np.ndarray, rng: np.random.Generator, *, mask_ratio: float, poisson_lambda: float,
                   mask_id: int) -> np.ndarray:
    """(n,) → (n - masked + spans,): Poisson-length spans replaced by one mask each."""
    n = len(ids)
    num_masked = int(round(n * mask_ratio))
    if num_masked == 0:
        return ids.copy()
    lengths = _poisson_lengths(num_masked, poisson_lambda, rng)
    # Spans sit in gaps between the kept tokens: stars and bars, gaps drawn with replacement.
    gaps = np.sort(rng.integers(0, n - num_masked + 1, size=len(lengths)))  # kept tokens before each span
    masked = np.zeros(n, dtype=bool)
    masked[np.repeat(gaps, lengths) + np.arange(num_masked)] = True  # span j starts at gaps[j] + earlier spans
    return np.insert(ids[~masked], gaps, mask_id)  # one mask where each span was


def _poisson_lengths(total: int, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(lam) lengths until they cover `total`; the last one is clipped to fit exactly."""
    draws = rng.poisson(lam, size=int(total / lam) + 8)
    while draws.sum() < total:
        draws = np.concatenate([draws, rng.poisson(lam, size=len(draws))])
    k = int(np.searchsorted(np.cumsum(draws), total)) + 1
    lengths = draws[:k].copy()
    lengths[-1] -= lengths.sum() - total
    return lengths


def permute_sentences(ids: np.ndarray, end_ids: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Shuffle the sentences of `ids` (each ends after a token of `end_ids`, or at the end)."""
    ends = np.flatnonzero(np.isin(ids, end_ids)) + 1
    sentences = [s for s in np.split(ids, ends) if len(s)]
    if len(sentences) < 2:
        return ids
    return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])


def span_corruption(ids: np.ndarray, rng: np.random.Generator, *, noise_density: float, mean_span_length: float,
                    first_sentinel: int, num_sentinels: int) -> tuple[np.ndarray, np.ndarray]:
    """(n,) → source (kept tokens, sentinel i per span i), target (sentinel i, span i, …)."""
    n = len(ids)
    if n < 2:
        return ids.copy(), ids.copy()
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_spans = min(max(int(round(num_noise / mean_span_length)), 1), num_sentinels, n - num_noise)
    noise = _random_segmentation(num_noise, num_spans, rng)
    keep = _random_segmentation(n - num_noise, num_spans, rng)
    src, tgt, at = [], [], 0
    for i, (k, m) in enumerate(zip(keep.tolist(), noise.tolist())):  # kept run, then noise span, as T5
        sentinel = np.array([first_sentinel + i], dtype=ids.dtype)
        src += [ids[at:at + k], sentinel]
        tgt += [sentinel, ids[at + k:at + k + m]]
        at += k + m
    return np.concatenate(src), np.concatenate(tgt)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split `num_items` into `num_segments` random parts, each >= 1."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))
