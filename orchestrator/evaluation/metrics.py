"""Evaluation metrics of one decoding strategy over a paired dataset.

Pure functions over decoded texts, `Hypothesis` objects and timings; BLEU
and chrF come from sacreBLEU (with their signatures), never from a
hand-written look-alike.  Definitions: docs/evaluation.md.
"""

from __future__ import annotations

import math
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF

from trainers.decoding import Hypothesis
from trainers.decoding.hypothesis import normalize

SEARCH_ERROR_TOLERANCE = 1e-4
"""Score differences below this are float noise, not search errors."""


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (13a tokenization, exp smoothing) and its signature."""
    bleu = BLEU()
    return bleu.corpus_score(list(hypotheses), [list(references)]).score, str(bleu.get_signature())


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacreBLEU corpus chrF (character 6-grams, beta 2) and its signature."""
    chrf = CHRF()
    return chrf.corpus_score(list(hypotheses), [list(references)]).score, str(chrf.get_signature())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of outputs equal to their reference (leading/trailing whitespace ignored)."""
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / max(len(references), 1)


def baseline_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU, chrF and exact match of outputs that need no model (e.g. the sources copied unchanged)."""
    return {"bleu": corpus_bleu(hypotheses, references)[0], "chrf": corpus_chrf(hypotheses, references)[0],
            "exact_match": exact_match(hypotheses, references)}


def search_error_rate(beam: Sequence[Hypothesis], greedy: Sequence[Hypothesis], length_penalty: float) -> float:
    """Share of sources where beam search's best hypothesis ranks below greedy search's output.

    Both are compared under beam search's own objective, score / len ** length_penalty
    (the raw `model.score` when length_penalty = 0), with the scores the decoders
    already computed (`Hypothesis.score` equals `model.score`).  Greedy must run
    under the same length limits and n-gram blocking, so its output is a
    hypothesis beam search could have returned.
    """
    if len(beam) != len(greedy):
        raise ValueError(f"search_error_rate: {len(beam)} beam outputs but {len(greedy)} greedy outputs")
    errors = sum(
        b.normalized_score < normalize(g.score, len(g.tokens), length_penalty) - SEARCH_ERROR_TOLERANCE
        for b, g in zip(beam, greedy))
    return errors / max(len(beam), 1)


def perplexity(sum_logprob: float, num_tokens: int) -> dict[str, float]:
    """Teacher-forced token loss (mean negative log-likelihood, nats) and perplexity exp(loss)."""
    loss = -sum_logprob / max(num_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": num_tokens}


def speed(batch_seconds: Sequence[float], *, generated_tokens: int, sentences: int) -> dict[str, float]:
    """Throughput over the whole set and latency per decode call (one batch of sources)."""
    total = sum(batch_seconds)
    ordered = sorted(batch_seconds)
    return {
        "tokens_per_s": generated_tokens / total if total > 0 else 0.0,
        "sentences_per_s": sentences / total if total > 0 else 0.0,
        "latency_ms": 1000.0 * total / max(len(ordered), 1),
        "latency_ms_p50": 1000.0 * percentile(ordered, 0.50),
        "latency_ms_p95": 1000.0 * percentile(ordered, 0.95),
        "decode_s": total,
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 for an empty one)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def strategy_metrics(texts: Sequence[str], references: Sequence[str], best: Sequence[Hypothesis],
                     batch_seconds: Sequence[float], *, greedy: Sequence[Hypothesis] | None = None,
                     length_penalty: float = 0.0) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every metric of one strategy, and the sacreBLEU signatures.

    texts/best: the decoded text and best hypothesis of each source;
    `greedy` (beam search only): greedy's outputs under the same limits, for
    the search-error rate (None elsewhere: the metric is null).
    """
    bleu, bleu_sig = corpus_bleu(texts, references)
    chrf, chrf_sig = corpus_chrf(texts, references)
    generated = sum(len(h.tokens) for h in best)
    metrics: dict[str, float | None] = {
        "bleu": bleu,
        "chrf": chrf,
        "exact_match": exact_match(texts, references),
        "avg_len": generated / max(len(best), 1),
        "avg_logprob": sum(h.score for h in best) / max(len(best), 1),
        **speed(batch_seconds, generated_tokens=generated, sentences=len(best)),
        "search_error_rate": None if greedy is None else search_error_rate(best, greedy, length_penalty),
    }
    return metrics, {"bleu": bleu_sig, "chrf": chrf_sig}
