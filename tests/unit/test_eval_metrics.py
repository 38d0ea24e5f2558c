"""Evaluation metrics and strategy presets: sacreBLEU parity, search errors, speed, config errors."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from orchestrator.config import ConfigError, compose_config, to_typed
from orchestrator.evaluation.metrics import (corpus_bleu, corpus_chrf, exact_match, percentile, perplexity,
                                       search_error_rate, speed, strategy_metrics)
from orchestrator.evaluation.presets import parse_entry, strategy_config, strategy_configs
from trainers.decoding import DecodingConfig
from trainers.decoding.hypothesis import make_hypothesis

REFS = ["the cat sat on the mat today", "a dog barked at the red car", "one two three four five"]
HYPS = ["the cat sat on a mat today", "a dog barked at the red car", "one two three four"]


def hyp(tokens: list[int], logps: list[float], lp: float = 0.0):
    return make_hypothesis(tokens, logps, lp)


def test_bleu_and_chrf_match_sacrebleu_and_carry_signatures():
    bleu, sig = corpus_bleu(HYPS, REFS)
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert "tok:13a" in sig and "nrefs:1" in sig and f"version:{sacrebleu.__version__}" in sig
    chrf, chrf_sig = corpus_chrf(HYPS, REFS)
    assert chrf == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert "nc:6" in chrf_sig
    assert corpus_bleu(REFS, REFS)[0] == pytest.approx(100.0)
    assert corpus_chrf(REFS, REFS)[0] == pytest.approx(100.0)


def test_exact_match_ignores_outer_whitespace_only():
    assert exact_match(HYPS, REFS) == pytest.approx(1 / 3)
    assert exact_match([" a b "], ["a b"]) == 1.0 and exact_match(["a  b"], ["a b"]) == 0.0


def test_search_error_rate_compares_under_the_beam_objective():
    greedy = [hyp([5, 2], [-0.5, -0.5]), hyp([5, 6, 2], [-0.2, -0.2, -0.2]), hyp([7, 2], [-1.0, -1.0])]
    beam = [hyp([6, 2], [-0.1, -0.1]),  # better than greedy: no error
            hyp([6, 2], [-0.4, -0.4]),  # raw -0.8 < greedy's -0.6: an error
            hyp([7, 2], [-1.0, -1.0])]  # the same output: no error
    assert search_error_rate(beam, greedy, 0.0) == pytest.approx(1 / 3)
    # With a length penalty, beam ranks by score / len ** lp: -0.8/2 = -0.4 > greedy's -0.6/3 ... still worse
    beam_lp = [hyp(h.tokens, h.positional_scores, 1.0) for h in beam]
    assert search_error_rate(beam_lp, greedy, 1.0) == pytest.approx(1 / 3)
    # A longer greedy output can lose to a shorter beam under lp = 1 while winning on the raw score
    g = [hyp([5, 5, 5, 2], [-0.3, -0.3, -0.3, -0.3])]  # raw -1.2, normalized -0.3
    b = [hyp([6, 2], [-0.55, -0.55], 1.0)]             # raw -1.1, normalized -0.55
    assert search_error_rate(b, g, 0.0) == 0.0 and search_error_rate(b, g, 1.0) == 1.0
    with pytest.raises(ValueError):
        search_error_rate(beam, greedy[:2], 0.0)


def test_perplexity_is_exp_of_mean_token_nll():
    out = perplexity(-20.0, 10)
    assert out["loss"] == pytest.approx(2.0) and out["ppl"] == pytest.approx(math.exp(2.0))
    assert out["tokens"] == 10


def test_speed_and_latency_percentiles():
    s = speed([0.1, 0.3, 0.2, 0.4], generated_tokens=100, sentences=8)
    assert s["tokens_per_s"] == pytest.approx(100.0) and s["sentences_per_s"] == pytest.approx(8.0)
    assert s["latency_ms"] == pytest.approx(250.0)
    assert s["latency_ms_p50"] == pytest.approx(200.0) and s["latency_ms_p95"] == pytest.approx(400.0)
    assert percentile([], 0.5) == 0.0


def test_strategy_metrics_bundle():
    best = [hyp([5, 6, 2], [-0.1, -0.1, -0.1]), hyp([5, 2], [-0.2, -0.2]), hyp([2], [-0.3])]
    metrics, sigs = strategy_metrics(HYPS, REFS, best, [0.5, 0.5])
    assert metrics["avg_len"] == pytest.approx(2.0) and metrics["tokens_per_s"] == pytest.approx(6.0)
    assert metrics["search_error_rate"] is None and set(sigs) == {"bleu", "chrf"}
    metrics, _ = strategy_metrics(HYPS, REFS, best, [1.0], greedy=best, length_penalty=0.0)
    assert metrics["search_error_rate"] == 0.0


# --- strategy presets ----------------------------------------------------------------------

def test_presets_come_from_conf_decoding_with_inline_overrides():
    assert parse_entry("beam:beam_size=4, length_penalty=0.6") == ("beam", {"beam_size": 4, "length_penalty": 0.6})
    base = DecodingConfig(max_len=17, min_len=2, beam_size=2)
    cfgs = strategy_configs(["greedy", "beam", "sample", "beam:beam_size=10,no_repeat_ngram_size=2,max_len=9"], base)
    assert cfgs["greedy"].strategy == "greedy" and cfgs["greedy"].max_len == 17 and cfgs["greedy"].min_len == 2
    assert cfgs["beam"].beam_size == 5 and cfgs["beam"].length_penalty == 1.0  # conf/decoding/beam.yaml
    assert cfgs["sample"].top_p == 0.9 and cfgs["sample"].strategy == "sample"
    tuned = cfgs["beam:beam_size=10,no_repeat_ngram_size=2,max_len=9"]
    assert (tuned.beam_size, tuned.no_repeat_ngram_size, tuned.max_len) == (10, 2, 9)


@pytest.mark.parametrize("entry, words", [
    ("nucleus", "no decoding preset 'nucleus'"),
    ("beam:beem=3", "no decoding key 'beem'"),
    ("beam:beam_size=0", "decoding.beam_size"),
    ("sample:top_p=1.5", "decoding.top_p"),
    ("beam:4", "expected key=value"),
])
def test_bad_strategy_entries_name_eval_strategies(entry, words):
    with pytest.raises(ValueError) as err:
        strategy_config(entry)
    assert str(err.value).startswith("eval.strategies:") and words in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("eval.strategies=[greedy,nucleus]", "eval.strategies"),
    ("eval.strategies=[greedy,greedy]", "eval.strategies"),
    ("eval.split=dev", "eval.split"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("generate.format=csv", "generate.format"),
    ("generate.device=tpu", "generate.device"),
])
def test_bad_eval_and_generate_config_is_a_config_error(override, key):
    with pytest.raises(ConfigError) as err:
        to_typed(compose_config([override]))
    assert key in str(err.value) and "\n" not in str(err.value)
