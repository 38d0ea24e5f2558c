"""A finished hypothesis, as `decode` returns it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Hypothesis:
    tokens: list[int]
    """Generated token ids, without bos, ending with eos."""
    score: float
    """Sum of the model's log-probabilities of `tokens` (eos included): equals `model.score`."""
    normalized_score: float
    """Ranking score: score / len(tokens) ** length_penalty (the raw score when length_penalty = 0)."""
    positional_scores: list[float] = field(default_factory=list)
    """The model's log-probability of each token; they sum to `score`."""


def make_hypothesis(tokens: list[int], positional_scores: list[float], length_penalty: float) -> Hypothesis:
    """Build a Hypothesis, computing score and normalized score from the per-token log-probs."""
    score = float(sum(positional_scores))
    return Hypothesis(tokens=tokens, score=score,
                      normalized_score=normalize(score, len(tokens), length_penalty),
                      positional_scores=positional_scores)


def normalize(score: float, length: int, length_penalty: float) -> float:
    """score / length ** length_penalty (fairseq / HF); the raw score when length_penalty = 0."""
    return score / length ** length_penalty if length_penalty else score


def best_first(hyps: list[Hypothesis]) -> list[Hypothesis]:
    """Sort by normalized score, highest first; ties keep their order."""
    return sorted(hyps, key=lambda h: -h.normalized_score)
