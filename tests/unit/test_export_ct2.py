"""`export.format=ctranslate2` and the decoding engines: the CTranslate2 model
decodes exactly as ours in float32; converted models are cached per compute type."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.helpers.tiny_package import sources, tiny_model, tiny_package, trained_tiny_model
from trainers.decoding import DecodingConfig
from trainers.engines import check_engine, load_engine, pad_sources, translate_options
from trainers.export_ct2 import MARKER, ct2_model_for, export_ctranslate2
from trainers.models import ModelConfig, build_model
from trainers.package import Lineage, write_package

ctranslate2 = pytest.importorskip("ctranslate2")

VARIANTS = [dict(norm_first=True, positions="sinusoidal"),  # the first three: the same tiny models as test_export_hf
            dict(norm_first=True, positions="learned", activation="relu"),
            dict(norm_first=False, positions="sinusoidal"), dict(norm_first=False, positions="learned")]
IDS = ["pre-sinusoidal", "pre-learned-relu", "post-sinusoidal", "post-learned"]
MAX_LEN = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one torch thread (the engines here run one CTranslate2 thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=range(len(VARIANTS)), ids=IDS)
def engines(request, tmp_path_factory):
    """(torch engine, CTranslate2 float32 engine, package) for one Transformer variant."""
    torch.set_num_threads(1)
    package = tiny_package(tmp_path_factory.mktemp(IDS[request.param]),
                           trained_tiny_model(seed=request.param, **VARIANTS[request.param]))
    return load_engine(package), load_engine(package, engine="ctranslate2", threads=1), package


def _tokens(hyps):
    return [[h.tokens for h in hs] for hs in hyps]


@pytest.mark.parametrize("cfg", [
    DecodingConfig(strategy="greedy", max_len=MAX_LEN),
    DecodingConfig(strategy="greedy", min_len=4, max_len_a=1.0, max_len_b=2),
    DecodingConfig(strategy="beam", beam_size=5, max_len=MAX_LEN),
    DecodingConfig(strategy="beam", beam_size=5, max_len_a=0.5, max_len_b=3),
], ids=["greedy", "greedy-minlen-maxlen_ab", "beam5", "beam5-maxlen_ab"])
def test_float32_tokens_equal_ours(engines, cfg):
    """Greedy and beam 5 (length_penalty 0; a fixed limit or per-source limits
    from max_len_a/b; min_len for greedy): the same tokens, and scores equal to
    our sum of log-probs, in float32 -- for sources that stop early and for
    sources cut at the limit (our forced eos = the engine's appended eos).

    Not compared: beam search with min_len > 1 or n-best lists beyond the best:
    CTranslate2 masks forbidden tokens (pad, bos, eos before min_len) before its
    log-softmax, so it ranks beams by renormalised log-probs (see
    trainers/engines.py); the best hypotheses agree here, deeper n-best ranks can differ."""
    ours, ct2, _ = engines
    rows = sources(16, seed=3)
    expected, got = ours.decode(rows, cfg), ct2.decode(rows, cfg)
    assert _tokens(got) == _tokens(expected)
    for hs_got, hs_exp in zip(got, expected):
        for g, e in zip(hs_got, hs_exp):
            assert g.score == pytest.approx(e.score, abs=1e-4)
            assert g.normalized_score == pytest.approx(e.normalized_score, abs=1e-4)
            assert sum(g.positional_scores) == pytest.approx(g.score, abs=1e-5)


class _CountingTranslator:
    """The engine's `ctranslate2.Translator`, counting the rows it rescores (score_batch)."""

    def __init__(self, translator):
        self.translator, self.rescored, self.calls = translator, 0, []

    def translate_batch(self, source, **kwargs):
        self.calls.append(len(source))
        return self.translator.translate_batch(source, **kwargs)

    def score_batch(self, source, target, **kwargs):
        self.rescored += len(target)
        return self.translator.score_batch(source, target, **kwargs)


@pytest.mark.parametrize("pad_bos_scale", [1.0, 3.5], ids=["trained", "pad-bos-favoured"])
def test_greedy_rescores_only_cut_drafts_and_redoes_pad_bos_ones(tmp_path, pad_bos_scale):
    """Greedy with min_len <= 1 runs one unmasked CTranslate2 pass; drafts that end with eos keep its
    log-probs, drafts cut at the limit are rescored, and sources whose unmasked draft holds pad or bos
    are decoded again masked. Reference: our decoder's tokens and scores. With pad/bos embeddings scaled
    up (tied: their logits grow), the unmasked argmax picks them for some sources; each kind is checked present."""
    model = copy.deepcopy(trained_tiny_model(seed=0))
    with torch.no_grad():
        model.embed.weight[:2] *= pad_bos_scale
    package = tiny_package(tmp_path, model)
    ours, ct2 = load_engine(package), load_engine(package, engine="ctranslate2", threads=1)
    rows, cfg = sources(24, seed=3), DecodingConfig(strategy="greedy", max_len=MAX_LEN)
    unmasked = ct2.translator.translate_batch([[ct2.vocab[i] for i in r] for r in rows], beam_size=1,
                                              max_decoding_length=MAX_LEN - 1, min_decoding_length=0,
                                              return_end_token=True, max_input_length=0)
    drafts = [r.hypotheses[0] for r in unmasked]
    pad_bos = sum(bool({"<pad>", "<s>"} & set(d)) for d in drafts)
    cut = sum(d[-1] != "</s>" and not {"<pad>", "<s>"} & set(d) for d in drafts)
    assert len(rows) - cut - pad_bos > 0 and (pad_bos > 0 if pad_bos_scale > 1 else pad_bos == 0 and cut > 0)
    ct2.translator = _CountingTranslator(ct2.translator)
    expected, got = ours.decode(rows, cfg), ct2.decode(rows, cfg)
    assert _tokens(got) == _tokens(expected)
    for g, e in zip(got, expected):
        assert g[0].score == pytest.approx(e[0].score, abs=1e-4)
        assert g[0].positional_scores == pytest.approx(e[0].positional_scores, abs=1e-5)
    assert ct2.translator.rescored == cut + pad_bos


@pytest.mark.parametrize("max_len_a, max_len_b, merged", [(1.5, 6, [24]), (0.5, 3, None)],
                         ids=["limits-far", "limits-tight"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_per_source_limits_decode_in_one_call_where_the_limit_is_not_reached(engines, strategy, max_len_a,
                                                                             max_len_b, merged):
    """Per-source limits (max_len_a/b): greedy decodes every source in one call at the largest limit and
    cuts each draft at its own; beam does the same and decodes again, one call a limit, only the sources whose
    search came within a token of their limit. Reference: our decoder's n-best lists (the best ones where
    limits cut searches) and scores; far limits need one call, tight ones (most sources cut) more for beam."""
    ours, ct2, _ = engines
    rows = sources(24, seed=5, max_len=12)
    cfg = DecodingConfig(strategy=strategy, beam_size=5, n_best=5, max_len_a=max_len_a, max_len_b=max_len_b)
    assert len({cfg.length_limit(len(r)) for r in rows}) > 3
    counting = ct2.translator = _CountingTranslator(ct2.translator)
    try:
        expected, got = ours.decode(rows, cfg), ct2.decode(rows, cfg)
    finally:
        ct2.translator = counting.translator
    if merged:  # no search reaches its limit: whole n-best lists agree
        assert _tokens(got) == _tokens(expected)
    else:  # lower n-best ranks of searches cut at the limit may differ (module docstring), as without merging
        got, expected = [hs[:1] for hs in got], [hs[:1] for hs in expected]
        assert _tokens(got) == _tokens(expected)
    for hs_got, hs_exp in zip(got, expected):
        assert [g.score for g in hs_got] == pytest.approx([e.score for e in hs_exp], abs=1e-4)
    if merged or strategy == "greedy":
        assert counting.calls == [24]
    else:
        assert counting.calls[0] == 24 and 1 < len(counting.calls)


def test_beam_with_length_penalty_best_equal(engines):
    """length_penalty 1: the engine searches to the limit (patience = max_len), so
    the best hypothesis equals ours wherever hypotheses end before the limit."""
    ours, ct2, _ = engines
    rows = sources(16, seed=3)
    cfg = DecodingConfig(strategy="beam", beam_size=5, max_len=30, length_penalty=1.0)
    expected, got = ours.decode(rows, cfg), ct2.decode(rows, cfg)
    early = [i for i, hs in enumerate(expected) if len(hs[0].tokens) < cfg.max_len]
    assert len(early) >= 8
    assert [got[i][0].tokens for i in early] == [expected[i][0].tokens for i in early]


def test_beam_with_length_penalty_and_early_stopping_equals_ours(engines):
    """length_penalty 1 with decoding.early_stopping: both engines stop a source once beam_size hypotheses
    have finished (CTranslate2 with patience 1), at the same step, so the best hypotheses are the same --
    wherever they end before the limit (see trainers/engines.py for the last step)."""
    ours, ct2, _ = engines
    rows = sources(16, seed=3)
    cfg = DecodingConfig(strategy="beam", beam_size=5, max_len=30, length_penalty=1.0, early_stopping=True)
    assert translate_options(cfg, ct2.vocab)["patience"] == 1.0
    expected, got = ours.decode(rows, cfg), ct2.decode(rows, cfg)
    early = [i for i, hs in enumerate(expected) if len(hs[0].tokens) < cfg.max_len]
    assert len(early) >= 8
    assert [got[i][0].tokens for i in early] == [expected[i][0].tokens for i in early]
    for i in early:
        assert got[i][0].score == pytest.approx(expected[i][0].score, abs=1e-4)


def test_what_ctranslate2_cannot_promise_is_refused_in_one_line(engines):
    """Seeded, batch-independent sampling and beam search with min_len > 1 (eos masked before
    CTranslate2's softmax) cannot match ours: refused, never silently changed."""
    _, ct2, _ = engines
    rows = sources(2, seed=4)
    with pytest.raises(ValueError, match=r"^decoding\.strategy: sample cannot keep its promise on CTranslate2"):
        ct2.decode(rows, DecodingConfig(strategy="sample", top_k=10, seed=5, max_len=MAX_LEN))
    with pytest.raises(ValueError, match=r"^decoding\.min_len: 2 with beam search on CTranslate2"):
        ct2.check(DecodingConfig(strategy="beam", beam_size=3, min_len=2, max_len=MAX_LEN))
    ct2.check(DecodingConfig(strategy="greedy", min_len=2, max_len=MAX_LEN))  # greedy's argmax is unaffected


def test_int8_decodes(engines):
    ours, _, package = engines
    int8 = load_engine(package, engine="ctranslate2", compute_type="int8", threads=1)
    rows = sources(8, seed=3)
    cfg = DecodingConfig(strategy="beam", beam_size=5, max_len=MAX_LEN)
    got = int8.decode(rows, cfg)
    assert all(h.tokens[-1] == 2 and len(h.tokens) <= MAX_LEN for hs in got for h in hs)
    same = sum(g[0].tokens == e[0].tokens for g, e in zip(got, ours.decode(rows, cfg)))
    assert same >= len(rows) // 2  # int8 is close, not equal


def test_converted_models_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFOUNDRY_CACHE", str(tmp_path / "cache"))
    package = tiny_package(tmp_path / "p", seed=1)
    first = ct2_model_for(package, "float32")
    assert first == package / "ctranslate2-float32" and (first / "tokenizer.json").is_file()
    stamp = (first / "model.bin").stat().st_mtime_ns
    assert ct2_model_for(package, "float32") == first and (first / "model.bin").stat().st_mtime_ns == stamp
    assert ct2_model_for(package, "int8") == package / "ctranslate2-int8"
    # New weights in the package: converted again.
    write_package(package, tiny_model(seed=9), tokenizer=package.parent / "tokenizer.json", lineage=Lineage())
    assert ct2_model_for(package, "float32") == first and (first / "model.bin").stat().st_mtime_ns != stamp


def test_read_only_package_converts_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFOUNDRY_CACHE", str(tmp_path / "cache"))
    package = tiny_package(tmp_path / "p", seed=1)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == package else real_access(path, mode))
    folder = ct2_model_for(package, "float32")
    assert folder.parent == tmp_path / "cache" / "ctranslate2" and (folder / MARKER).is_file()
    assert not (package / "ctranslate2-float32").exists()
    assert ct2_model_for(package, "float32") == folder  # reused


def test_refusals_are_one_line(tmp_path):
    rnn = build_model(ModelConfig(arch="lstm", vocab_size=20, d_model=8, num_encoder_layers=1, num_decoder_layers=1))
    from tests.helpers.tiny_package import word_tokenizer

    package = write_package(tmp_path / "lstm", rnn, tokenizer=word_tokenizer(tmp_path / "tok.json", 20),
                            lineage=Lineage())
    for call in (lambda: export_ctranslate2(package, tmp_path / "out"),
                 lambda: load_engine(package, engine="ctranslate2")):
        with pytest.raises(ValueError, match=r"^model\.arch: 'lstm' cannot be exported to CTranslate2") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^eval\.engine: must be one of"):
        check_engine("onnx", "float32", key="eval")
    with pytest.raises(ValueError, match=r"^generate\.compute_type: the torch engine decodes in float32 only"):
        check_engine("torch", "int8")
    if "bfloat16" not in ctranslate2.get_supported_compute_types("cpu"):
        with pytest.raises(ValueError, match=r"^serve\.compute_type: 'bfloat16' is not supported"):
            check_engine("ctranslate2", "bfloat16", key="serve")


def test_translate_options_mapping():
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 48)]
    beam = translate_options(DecodingConfig(strategy="beam", beam_size=4, n_best=2, length_penalty=0.6,
                                            no_repeat_ngram_size=3, max_len=50), vocab)
    assert beam["beam_size"] == 4 and beam["num_hypotheses"] == 4 and beam["length_penalty"] == 0.6
    assert beam["patience"] == 50.0 and beam["no_repeat_ngram_size"] == 3
    assert beam["suppress_sequences"] == [["<pad>"], ["<s>"]] and beam["return_end_token"] is True
    with pytest.raises(ValueError, match=r"^decoding\.strategy: sample"):
        translate_options(DecodingConfig(strategy="sample", top_k=0, top_p=0.8, temperature=0.7), vocab)
