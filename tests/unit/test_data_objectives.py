"""Noising objectives: statistics within tolerance of the configuration, purity, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import (BartInfilling, ObjectiveConfig, PairPassThrough, Specials, T5SpanCorruption,
                           build_objective)
from data_pipeline.objectives import permute_sentences, span_corruption, text_infilling

SPECIALS = Specials(num_sentinels=100, sentence_end_ids=(500,))
TEXT = np.arange(1000, 1256, dtype=np.uint16)  # 256 tokens, none of them reserved


def samples(n):
    return [{"__key__": f"doc-{i}", "__index__": i, "tgt": TEXT} for i in range(n)]


def test_bart_masks_the_configured_ratio_in_poisson_spans():
    bart = build_objective(ObjectiveConfig(name="bart", clean_ratio=0.0), SPECIALS, seed=0)
    masked, spans = [], []
    for sample in samples(400):
        ex = bart(sample)
        n_masks = int((ex.src == SPECIALS.mask).sum())
        kept = ex.src[ex.src != SPECIALS.mask]
        assert np.all(np.diff(kept.astype(int)) > 0) and set(kept) <= set(TEXT)  # kept tokens, in order
        assert np.array_equal(ex.tgt, TEXT)
        masked.append(len(TEXT) - len(kept))
        spans.append(n_masks)
    assert np.mean(masked) / len(TEXT) == pytest.approx(0.3, abs=0.01)
    # mean tokens per <mask> ≈ λ (0-length spans included; the last span of each sample is clipped)
    assert sum(masked) / sum(spans) == pytest.approx(3.5, abs=0.25)


def test_bart_leaves_the_clean_ratio_of_samples_unnoised():
    clean = build_objective(ObjectiveConfig(name="bart", clean_ratio=0.2), SPECIALS, seed=0)
    never = build_objective(ObjectiveConfig(name="bart", clean_ratio=0.0), SPECIALS, seed=0)
    examples = [clean(sample) for sample in samples(2000)]
    unnoised = [ex for ex in examples if np.array_equal(ex.src, ex.tgt)]
    assert len(unnoised) / len(examples) == pytest.approx(0.2, abs=0.03)
    assert all(SPECIALS.mask not in ex.src for ex in unnoised)
    assert all(np.array_equal(ex.tgt, TEXT) for ex in examples)
    assert not any(np.array_equal(ex.src, ex.tgt) for ex in map(never, samples(2000)))
    assert ObjectiveConfig().clean_ratio == 0.1  # the default recipe teaches copying clean text


def test_bart_span_lengths_follow_poisson():
    rng = np.random.default_rng(0)
    ids = np.arange(1000, 11000, dtype=np.int64)
    src = text_infilling(ids, rng, mask_ratio=0.3, poisson_lambda=3.5, mask_id=7)
    assert (src == 7).sum() == pytest.approx(3000 / 3.5, rel=0.08)


def test_t5_corrupts_the_configured_density_in_spans_and_reconstructs():
    t5 = build_objective(ObjectiveConfig(name="t5"), SPECIALS, seed=0)
    noise, spans = [], []
    for sample in samples(400):
        ex = t5(sample)
        is_sentinel = lambda ids: (ids >= SPECIALS.first_sentinel) & (ids < SPECIALS.mask)  # noqa: E731
        n_spans = int(is_sentinel(ex.src).sum())
        assert n_spans == int(is_sentinel(ex.tgt).sum())
        assert ex.tgt[0] == SPECIALS.sentinel(0)
        assert reconstruct(ex.src, ex.tgt) == TEXT.tolist()
        noise.append(len(ex.tgt) - n_spans)
        spans.append(n_spans)
    assert np.mean(noise) / len(TEXT) == pytest.approx(0.15, abs=0.01)
    assert sum(noise) / sum(spans) == pytest.approx(3.0, abs=0.2)


def reconstruct(src, tgt, sentinels=range(SPECIALS.first_sentinel, SPECIALS.mask)):
    """The original text from a T5 source and target (sentinel i in the source ← span i of the target)."""
    spans, current = {}, None
    for t in tgt.tolist():
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [x for t in src.tolist() for x in (spans[t] if t in sentinels else [t])]


def test_t5_never_uses_more_spans_than_sentinels():
    src, tgt = span_corruption(TEXT, np.random.default_rng(0), noise_density=0.5, mean_span_length=1.0,
                               first_sentinel=4, num_sentinels=3)
    assert ((src >= 4) & (src < 7)).sum() == 3 and reconstruct(src, tgt, range(4, 7)) == TEXT.tolist()


@pytest.mark.parametrize("objective", [
    BartInfilling(mask_id=SPECIALS.mask, seed=3, permute_sentences=True, sentence_end_ids=(1100, 1200)),
    T5SpanCorruption(first_sentinel=4, num_sentinels=100, seed=3),
])
def test_noise_is_a_pure_function_of_seed_and_key(objective):
    a, b = {"__key__": "a", "tgt": TEXT}, {"__key__": "b", "tgt": TEXT}
    assert np.array_equal(objective(a).src, objective(dict(a)).src)  # same key, same noise
    assert not np.array_equal(objective(a).src, objective(b).src)
    assert not np.array_equal(objective(a, epoch=1).src, objective(a).src)  # fresh noise each epoch
    reseeded = type(objective)(**{**objective.__dict__, "seed": 4})
    assert not np.array_equal(reseeded(a).src, objective(a).src)


def test_sentence_permutation_keeps_the_sentences():
    ids = np.array([10, 11, 500, 20, 21, 22, 500, 30, 500, 40], dtype=np.int64)
    out = permute_sentences(ids, (500,), np.random.default_rng(1))
    sentences = lambda x: sorted(tuple(s) for s in np.split(x, np.flatnonzero(x == 500) + 1) if len(s))  # noqa: E731
    assert sentences(out) == sentences(ids) and len(out) == len(ids)


def test_pairs_pass_through_and_need_sources():
    sample = {"__key__": "k", "__index__": 4, "src": TEXT[:5], "tgt": TEXT[5:9]}
    ex = build_objective(ObjectiveConfig(name="pairs"), SPECIALS, seed=0, fields=("src", "tgt"))(sample)
    assert isinstance(build_objective(ObjectiveConfig(name="pairs"), SPECIALS, seed=0, fields=("src", "tgt")),
                      PairPassThrough)
    assert (ex.key, ex.index) == ("k", 4) and np.array_equal(ex.src, TEXT[:5]) and np.array_equal(ex.tgt, TEXT[5:9])
    with pytest.raises(ValueError, match="objective.name"):
        build_objective(ObjectiveConfig(name="pairs"), SPECIALS, seed=0, fields=("tgt",))


@pytest.mark.parametrize("field, value", [("name", "gpt"), ("mask_ratio", 1.0), ("noise_density", 0.0),
                                          ("mean_span_length", 0.5), ("poisson_lambda", 0.0),
                                          ("clean_ratio", 1.0), ("clean_ratio", -0.1)])
def test_bad_objective_config_names_the_key(field, value):
    with pytest.raises(ValueError, match=f"objective.{field}"):
        ObjectiveConfig(**{field: value})
