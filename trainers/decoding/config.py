"""The decoding slice of the job config (see DESIGN.md, `trainers.decoding`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

STRATEGIES = ("greedy", "beam", "sample")


@dataclass
class DecodingConfig:
    strategy: str = "beam"
    """Search strategy: `greedy` (argmax), `beam` (beam search) or `sample` (ancestral sampling)."""
    beam_size: int = 5
    """Hypotheses kept alive per source in beam search."""
    n_best: int = 1
    """Finished hypotheses returned per source by beam search (<= beam_size)."""
    max_len: int = 200
    """Most generated tokens per hypothesis, eos included; an absolute cap even when max_len_a/b are set."""
    max_len_a: Optional[float] = None
    """Per-source length limit int(max_len_a * src_len + max_len_b); with max_len the smaller limit wins."""
    max_len_b: Optional[int] = None
    """Constant of the per-source length limit (0 when only max_len_a is set)."""
    min_len: int = 1
    """Fewest generated tokens per hypothesis, eos included: eos is forbidden before that."""
    length_penalty: float = 0.0
    """Ranking score = score / len(tokens) ** length_penalty (fairseq / HF); 0 ranks by the raw log-probability."""
    early_stopping: bool = False
    """Beam search with a length penalty: stop a source once beam_size hypotheses have finished (fairseq's
    rule, CTranslate2's patience 1, HF's early_stopping=True) instead of searching until no live hypothesis
    can outrank the n_best-th finished one. Faster; it may miss a longer hypothesis that ranks higher.
    Without a length penalty the exact stop is already early, and this changes nothing."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this size twice in one hypothesis (0 = off)."""
    temperature: float = 1.0
    """Sampling: divide the log-probabilities by this before top-k / top-p (does not change the score)."""
    top_k: int = 0
    """Sampling: draw only from the k most probable tokens (0 = off)."""
    top_p: float = 1.0
    """Sampling: draw only from the smallest set of most probable tokens whose probability reaches p (1 = off)."""
    seed: int = 0
    """Sampling: seed of the per-source random generators (the global RNG is never used)."""
    num_samples: int = 1
    """Sampling: independent samples drawn per source."""

    def __post_init__(self) -> None:
        _check(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        for key in ("beam_size", "n_best", "max_len", "num_samples"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.n_best <= self.beam_size, "n_best",
               f"must be <= decoding.beam_size={self.beam_size}, got {self.n_best}")
        _check(0 <= self.min_len <= self.max_len, "min_len",
               f"must be in [0, decoding.max_len={self.max_len}], got {self.min_len}")
        _check(self.max_len_a is None or self.max_len_a >= 0, "max_len_a", f"must be >= 0, got {self.max_len_a}")
        _check(math.isfinite(self.length_penalty), "length_penalty", f"must be finite, got {self.length_penalty}")
        _check(isinstance(self.early_stopping, bool), "early_stopping",
               f"must be true or false, got {self.early_stopping!r}")
        _check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
               f"must be >= 0, got {self.no_repeat_ngram_size}")
        _check(self.temperature > 0 and math.isfinite(self.temperature), "temperature",
               f"must be > 0, got {self.temperature}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")

    def length_limit(self, src_len: int) -> int:
        """Most tokens (eos included) a hypothesis of a source of `src_len` tokens may have.

        `max_len`, lowered to int(max_len_a * src_len + max_len_b) when either
        of those is set (a missing one counts as 0), and never below
        max(min_len, 1), so that a hypothesis that satisfies both bounds exists.
        """
        limit = self.max_len
        if self.max_len_a is not None or self.max_len_b is not None:
            limit = min(limit, int((self.max_len_a or 0.0) * src_len + (self.max_len_b or 0)))
        return max(limit, self.min_len, 1)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"decoding.{key}: {message}")
