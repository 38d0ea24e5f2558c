"""Decoding (greedy, beam, sampling) on tiny untrained models of every family:
parity with exhaustive search and with `model.score`, batch invariance, the
length / token constraints, seeding and config validation."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from trainers.decoding import DecodingConfig, Hypothesis, decode, top_k_filter, top_p_filter
from trainers.decoding.sampling import sample_tokens
from trainers.models import BOS_ID, EOS_ID, PAD_ID, ModelConfig, Seq2SeqModel, build_model

ARCHS = ["transformer", "lstm", "gru"]
VOCAB = 8  # pad, bos, eos, unk + 4 ordinary tokens: 6 tokens can be generated
GENERATED = [EOS_ID] + list(range(3, VOCAB))


def tiny_model(arch: str, *, seed: int = 0, vocab_size: int = VOCAB, dropout: float = 0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=vocab_size, d_model=16, num_encoder_layers=2, num_decoder_layers=2,
                      dropout=dropout, num_heads=2, ffn_dim=32, max_positions=64)
    model = build_model(cfg).eval()
    with torch.no_grad():  # peakier distributions: near-ties between hypotheses become unlikely
        for p in model.parameters():
            p.mul_(2.0)
    return model


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def batch(rows: list[list[int]], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) sources and their lengths."""
    width = max(pad_to or 0, max(len(r) for r in rows))
    src = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    return src, torch.tensor([len(r) for r in rows])


SOURCES = [[4, 5, 6, 7, 3, 4], [5], [7, 6, 4], [3, 3, 5, 6, 7], [6, 4], [4, 7, 7, 5]]


def model_scores(model, src_row: list[int], seqs: list[list[int]]) -> torch.Tensor:
    """model.score of each target sequence given one source."""
    src, src_lengths = batch([src_row] * len(seqs))
    tgt, tgt_lengths = batch(seqs)
    return model.score(src, src_lengths, tgt, tgt_lengths)


def assert_valid(hyps: list[Hypothesis], *, min_len: int, max_len: int) -> None:
    for h in hyps:
        assert min_len <= len(h.tokens) <= max_len, (h.tokens, min_len, max_len)
        assert h.tokens[-1] == EOS_ID and EOS_ID not in h.tokens[:-1], h.tokens
        assert PAD_ID not in h.tokens and BOS_ID not in h.tokens, h.tokens
        assert len(h.positional_scores) == len(h.tokens)
        assert h.score == pytest.approx(sum(h.positional_scores), abs=1e-5)


STRATEGY_CFGS = {
    "greedy": DecodingConfig(strategy="greedy", max_len=7),
    "beam": DecodingConfig(strategy="beam", beam_size=4, n_best=3, max_len=7, length_penalty=1.0),
    "sample": DecodingConfig(strategy="sample", num_samples=3, max_len=7, temperature=1.3, top_k=5, top_p=0.95),
}


# --- exhaustive search -------------------------------------------------------

def all_sequences(min_len: int, max_len: int) -> list[list[int]]:
    """Every valid hypothesis: ordinary tokens then eos, min_len <= length <= max_len."""
    ordinary = GENERATED[1:]
    return [list(body) + [EOS_ID] for n in range(max(min_len, 1) - 1, max_len)
            for body in itertools.product(ordinary, repeat=n)]


@pytest.mark.parametrize("min_len", [1, 3])
@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0, -0.5])
def test_wide_beam_equals_exhaustive_search(model, length_penalty, min_len):
    max_len, n_best = 4, 3
    seqs = all_sequences(min_len, max_len)
    cfg = DecodingConfig(strategy="beam", beam_size=len(GENERATED) ** 3, n_best=n_best, max_len=max_len,
                         min_len=min_len, length_penalty=length_penalty)
    sources = SOURCES[:3]
    results = decode(model, *batch(sources), cfg)
    for src_row, hyps in zip(sources, results):
        scores = model_scores(model, src_row, seqs).tolist()
        norm = [s / len(q) ** length_penalty for s, q in zip(scores, seqs)]
        ranked = sorted(range(len(seqs)), key=lambda i: -norm[i])
        gaps = [norm[a] - norm[b] for a, b in zip(ranked, ranked[1:n_best + 1])]
        assert min(gaps) > 1e-4, "near-tie: the comparison would be ill-posed; pick another seed"
        assert [h.tokens for h in hyps] == [seqs[i] for i in ranked[:n_best]]
        for h, i in zip(hyps, ranked):
            assert h.score == pytest.approx(scores[i], abs=1e-4)
            assert h.normalized_score == pytest.approx(norm[i], abs=1e-4)


class ScriptedModel(Seq2SeqModel):
    """A 'model' whose next-token distribution is looked up from the prefix (source ignored):
    `table[prefix]` gives some token probabilities, the rest of the mass is spread evenly."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab_size: int = 6,
                 default: dict[int, float] | None = None):
        super().__init__()
        self.table, self.vocab_size, self.default, self.steps = table, vocab_size, default or {}, 0

    def logp(self, prefix: tuple[int, ...]) -> torch.Tensor:
        given = self.table.get(prefix, self.default)
        rest = (1.0 - sum(given.values())) / (self.vocab_size - len(given))
        return torch.tensor([given.get(t, rest) for t in range(self.vocab_size)]).log()

    def forward(self, src, src_lengths, tgt_in, labels=None):
        return torch.stack([torch.stack([self.logp(tuple(row[1:i + 1])) for i in range(len(row))])
                            for row in tgt_in.tolist()])

    def encode(self, src, src_lengths):
        return src.size(0)

    def init_state(self, n):
        return [()] * n, 1

    def step(self, tokens, state):
        self.steps += 1
        prefixes = [p + (t,) if t != BOS_ID else p for p, t in zip(state[0], tokens.tolist())]
        return torch.stack([self.logp(p) for p in prefixes]), (prefixes, state[1])

    def reorder_state(self, state, beam_indices):
        return [state[0][i] for i in beam_indices.flatten().tolist()], beam_indices.size(1)

    def flops(self, src_len, tgt_len):
        raise NotImplementedError

    def hidden_states(self, src, src_lengths, tgt_in):
        raise NotImplementedError  # forward is overridden: log-probs come from the script

    output_weight = None


# eos is likeliest first (p .5) but 4 (p .45) is then followed by eos with p .99
SCRIPT = {(): {EOS_ID: 0.5, 4: 0.45, 3: 0.03}, (4,): {EOS_ID: 0.99}}


@pytest.mark.parametrize("length_penalty, steps, best", [
    (0.0, 1, [EOS_ID]),  # the live 4 (-0.80) cannot beat eos (-0.69): stop at once
    (1.0, 2, [4, EOS_ID]),  # 4 might still reach -0.80 / 10 > -0.69: go on; [4, eos] = -0.81 / 2 wins
    (-1.0, 1, [EOS_ID]),  # bound at the shortest length: -0.80 * 2 < -0.69
])
def test_beam_stops_exactly_when_no_live_hypothesis_can_outrank(length_penalty, steps, best):
    model = ScriptedModel(SCRIPT)
    cfg = DecodingConfig(strategy="beam", beam_size=2, max_len=10, length_penalty=length_penalty)
    hyps = decode(model, *batch([[4]]), cfg)[0]
    assert model.steps == steps
    assert hyps[0].tokens == best
    assert hyps[0].score == pytest.approx(float(model_scores(model, [4], [best])[0]), abs=1e-6)


# eos first (-0.69); 4 (-1.20) then leads to 5 5 5 eos with p ~1, a long hypothesis that length_penalty 1 ranks
# higher (-2.28 / 5 = -0.46); at step 2, [4, eos] (-1.71) is the second hypothesis to finish
LONG = {(): {EOS_ID: 0.5, 4: 0.3, 3: 0.15}, (4,): {EOS_ID: 0.6, 5: 0.35}, (4, 5): {5: 0.99}, (4, 5, 5): {5: 0.99},
        (4, 5, 5, 5): {EOS_ID: 0.99}}


@pytest.mark.parametrize("length_penalty, early_stopping, steps, best", [
    (1.0, False, 5, [4, 5, 5, 5, EOS_ID]),  # exact: [4, 5] may still reach -2.25 / 10: search on, find the long one
    (1.0, True, 2, [EOS_ID]),  # beam_size = 2 hypotheses have finished at step 2: stop (fairseq, CTranslate2)
    (0.0, True, 1, [EOS_ID]),  # no length penalty: the exact stop already comes first, the flag changes nothing
    (0.0, False, 1, [EOS_ID]),
])
def test_early_stopping_stops_when_beam_size_hypotheses_have_finished(length_penalty, early_stopping, steps, best):
    model = ScriptedModel(LONG)
    cfg = DecodingConfig(strategy="beam", beam_size=2, max_len=10, length_penalty=length_penalty,
                         early_stopping=early_stopping)
    hyps = decode(model, *batch([[4]]), cfg)[0]
    assert model.steps == steps
    assert hyps[0].tokens == best
    assert hyps[0].score == pytest.approx(float(model_scores(model, [4], [best])[0]), abs=1e-6)


# --- scores, ordering, constraints -------------------------------------------------

@pytest.mark.parametrize("strategy", list(STRATEGY_CFGS))
def test_hypothesis_score_equals_model_score(model, strategy):
    cfg = STRATEGY_CFGS[strategy]
    results = decode(model, *batch(SOURCES), cfg)
    assert len(results) == len(SOURCES)
    for src_row, hyps in zip(SOURCES, results):
        assert len(hyps) == {"greedy": 1, "beam": cfg.n_best, "sample": cfg.num_samples}[strategy]
        assert_valid(hyps, min_len=cfg.min_len, max_len=cfg.max_len)
        expected = model_scores(model, src_row, [h.tokens for h in hyps])
        assert torch.allclose(torch.tensor([h.score for h in hyps]), expected, atol=1e-4)
        for h in hyps:
            assert h.normalized_score == pytest.approx(h.score / len(h.tokens) ** cfg.length_penalty, rel=1e-6)
        norms = [h.normalized_score for h in hyps]
        assert norms == sorted(norms, reverse=True)


@pytest.mark.parametrize("strategy", list(STRATEGY_CFGS))
def test_results_do_not_depend_on_batching_or_padding(model, strategy):
    cfg = dataclasses.replace(STRATEGY_CFGS[strategy], max_len_a=1.0, max_len_b=2, no_repeat_ngram_size=2)
    together = decode(model, *batch(SOURCES, pad_to=9), cfg)
    reordered = decode(model, *batch(SOURCES[::-1]), cfg)[::-1]
    for i, src_row in enumerate(SOURCES):
        alone = decode(model, *batch([src_row]), cfg)[0]
        for other in (together[i], reordered[i]):
            assert [h.tokens for h in other] == [h.tokens for h in alone]
            assert [h.score for h in other] == pytest.approx([h.score for h in alone], abs=1e-4)
        assert_valid(alone, min_len=1, max_len=len(src_row) + 2)


@pytest.mark.parametrize("extra", [{}, {"min_len": 4, "no_repeat_ngram_size": 2}], ids=["plain", "constrained"])
def test_greedy_equals_beam_one_equals_sampling_top_k_one(model, extra):
    base = DecodingConfig(max_len=9, **extra)
    greedy = decode(model, *batch(SOURCES), dataclasses.replace(base, strategy="greedy"))
    beam = decode(model, *batch(SOURCES), dataclasses.replace(base, strategy="beam", beam_size=1))
    sample = decode(model, *batch(SOURCES), dataclasses.replace(base, strategy="sample", top_k=1, temperature=2.0))
    for g, b, s in zip(greedy, beam, sample):
        assert len(g) == len(b) == len(s) == 1
        assert g[0].tokens == b[0].tokens == s[0].tokens
        assert g[0].score == pytest.approx(b[0].score, abs=1e-6) and g[0].score == pytest.approx(s[0].score, abs=1e-6)


@pytest.mark.parametrize("strategy", list(STRATEGY_CFGS))
def test_min_and_max_len(model, strategy):
    for min_len, max_len in [(1, 1), (3, 3), (2, 5), (5, 9)]:
        cfg = dataclasses.replace(STRATEGY_CFGS[strategy], min_len=min_len, max_len=max_len)
        for hyps in decode(model, *batch(SOURCES), cfg):
            assert_valid(hyps, min_len=min_len, max_len=max_len)
    fixed = dataclasses.replace(STRATEGY_CFGS[strategy], min_len=4, max_len=4)
    assert all(len(h.tokens) == 4 for hyps in decode(model, *batch(SOURCES), fixed) for h in hyps)


@pytest.mark.parametrize("strategy", list(STRATEGY_CFGS))
def test_max_len_a_b_limit_per_source(model, strategy):
    cfg = dataclasses.replace(STRATEGY_CFGS[strategy], max_len=5, max_len_a=2.0, max_len_b=-3, min_len=2,
                              length_penalty=2.0)  # lp 2 favours long beams: the limit is reached
    lengths = []
    for src_row, hyps in zip(SOURCES, decode(model, *batch(SOURCES), cfg)):
        limit = max(min(5, 2 * len(src_row) - 3), 2)
        assert limit == cfg.length_limit(len(src_row))
        assert_valid(hyps, min_len=2, max_len=limit)
        lengths.append(max(len(h.tokens) for h in hyps))
    if strategy == "beam":
        assert lengths == [cfg.length_limit(len(s)) for s in SOURCES]


def test_length_limit_combines_max_len_and_a_b():
    assert DecodingConfig(max_len=50).length_limit(10) == 50
    assert DecodingConfig(max_len=50, max_len_a=1.5, max_len_b=2).length_limit(10) == 17
    assert DecodingConfig(max_len=12, max_len_a=1.5, max_len_b=2).length_limit(10) == 12  # the smaller wins
    assert DecodingConfig(max_len=50, max_len_b=7).length_limit(10) == 7
    assert DecodingConfig(max_len=50, max_len_a=0.5).length_limit(3) == 1
    assert DecodingConfig(max_len=50, max_len_a=0.0, max_len_b=0, min_len=3).length_limit(3) == 3


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("strategy", list(STRATEGY_CFGS))
def test_no_repeat_ngram(model, strategy, n):
    # min_len forces long hypotheses over only 5 non-eos tokens: repeats would be frequent
    max_len = {1: 5, 2: 8, 3: 10}[n]
    cfg = dataclasses.replace(STRATEGY_CFGS[strategy], no_repeat_ngram_size=n, min_len=max_len, max_len=max_len)
    for hyps in decode(model, *batch(SOURCES), cfg):
        assert_valid(hyps, min_len=max_len, max_len=max_len)
        for h in hyps:
            grams = [tuple(h.tokens[i:i + n]) for i in range(len(h.tokens) - n + 1)]
            assert len(grams) == len(set(grams)), (n, h.tokens)


@pytest.mark.parametrize("strategy", list(STRATEGY_CFGS))
def test_pad_and_bos_are_never_generated_even_when_likeliest(strategy):
    model = ScriptedModel({}, vocab_size=8, default={PAD_ID: 0.5, BOS_ID: 0.45, EOS_ID: 0.001})
    cfg = dataclasses.replace(STRATEGY_CFGS[strategy], min_len=2)
    for hyps in decode(model, *batch(SOURCES[:2]), cfg):
        assert_valid(hyps, min_len=2, max_len=cfg.max_len)
        assert [h.score for h in hyps] == pytest.approx(model_scores(model, [4], [h.tokens for h in hyps]).tolist())


def test_transformer_length_is_capped_by_its_position_table():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", vocab_size=VOCAB, d_model=16, num_encoder_layers=1,
                                    num_decoder_layers=1, num_heads=2, ffn_dim=32, max_positions=7))
    for hyps in decode(model, *batch(SOURCES), DecodingConfig(strategy="beam", max_len=50, length_penalty=3.0)):
        assert_valid(hyps, min_len=1, max_len=7)


def test_beam_n_best_are_distinct_and_best_first(model):
    cfg = DecodingConfig(strategy="beam", beam_size=6, n_best=6, max_len=6, length_penalty=0.6)
    for hyps in decode(model, *batch(SOURCES), cfg):
        assert len(hyps) == 6 and len({tuple(h.tokens) for h in hyps}) == 6
        norms = [h.normalized_score for h in hyps]
        assert norms == sorted(norms, reverse=True)


def test_finished_sources_leave_the_computation(model):
    rows = []
    step = model.step
    model.step = lambda tokens, state: (rows.append(tokens.numel()), step(tokens, state))[1]
    try:  # the limit is the source length: 1 token for the first source, 6 for the second
        cfg = DecodingConfig(strategy="beam", beam_size=3, max_len_a=1.0, min_len=0, length_penalty=5.0)
        hyps = decode(model, *batch([[5], SOURCES[0]]), cfg)
    finally:
        del model.step
    assert rows[0] == 2 and all(r <= 3 for r in rows[1:]), rows  # after step 1 only source 2's beam runs
    assert hyps[0][0].tokens == [EOS_ID]


def test_decode_restores_training_mode_and_ignores_dropout():
    model = tiny_model("lstm", dropout=0.5)
    cfg = STRATEGY_CFGS["beam"]
    expected = decode(model, *batch(SOURCES), cfg)
    model.train()
    got = decode(model, *batch(SOURCES), cfg)
    assert model.training
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in expected]
    assert decode(model, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), cfg) == []


# --- sampling ----------------------------------------------------------------------------

def test_sampling_is_seeded_and_ignores_the_global_rng(model):
    cfg = DecodingConfig(strategy="sample", num_samples=4, max_len=8, seed=7)
    torch.manual_seed(1)
    first = decode(model, *batch(SOURCES), cfg)
    torch.manual_seed(2)
    again = decode(model, *batch(SOURCES), cfg)
    other = decode(model, *batch(SOURCES), dataclasses.replace(cfg, seed=8))
    tokens = lambda results: [[h.tokens for h in hs] for hs in results]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    assert len({tuple(h.tokens) for hs in first for h in hs}) > len(SOURCES)  # samples do differ


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 3, 1.0), (1.0, 0, 0.8), (1.5, 4, 0.7)])
def test_sampling_follows_the_filtered_distribution(temperature, top_k, top_p):
    model = tiny_model("gru", seed=3)
    src, src_lengths = batch([SOURCES[2]])
    with torch.no_grad():  # log p(first token = t), t = 3..7
        logp = model.score(src.expand(5, -1), src_lengths.expand(5), torch.tensor([[t, EOS_ID] for t in range(3, 8)]),
                           torch.tensor([1] * 5))
    cfg = DecodingConfig(strategy="sample", num_samples=4000, min_len=2, max_len=2, seed=1,
                         temperature=temperature, top_k=top_k, top_p=top_p)
    hyps = decode(model, src, src_lengths, cfg)[0]
    counts = torch.bincount(torch.tensor([h.tokens[0] for h in hyps]), minlength=VOCAB)[3:].double()
    # eos is forbidden by min_len, pad/bos always: the distribution is over tokens 3..7
    expected = top_p_filter(top_k_filter((logp / temperature)[None], top_k), top_p).softmax(-1)[0].double()
    assert (counts[expected == 0] == 0).all()
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03), (counts / counts.sum(), expected)
    for h in hyps[:20]:  # the score is the model's log-prob, not the tempered one
        assert h.positional_scores[0] == pytest.approx(float(logp[h.tokens[0] - 3]), abs=1e-5)


@pytest.mark.parametrize("scale", [0.3, 5.0])  # near-uniform (a full sort), peaky (the top 64 suffice)
@pytest.mark.parametrize("top_k", [0, 300])
def test_sample_tokens_on_a_large_vocabulary(scale, top_k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2000, generator=gen) * scale
    cfg = DecodingConfig(strategy="sample", top_k=top_k, top_p=0.9, temperature=1.2)
    n = 50000
    tokens = sample_tokens(logits.expand(n, -1), torch.rand(n, generator=gen, dtype=torch.float64), cfg)
    freq = torch.bincount(tokens, minlength=2000).double() / n
    expected = top_p_filter(top_k_filter(logits / 1.2, top_k), 0.9).softmax(-1)[0].double()
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.01


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {3}
    assert kept(0.4) == {3}  # 0.4 alone reaches 0.4
    assert kept(0.5) == {3, 2}
    assert kept(0.7) == {3, 2}  # 0.4 + 0.3 reaches 0.7
    assert kept(0.71) == {3, 2, 1}
    assert kept(0.95) == {3, 2, 1, 0}
    assert kept(1.0) == {3, 2, 1, 0}
    assert kept(1e-9) == {3}
    # kept logits are unchanged; the order of the vocabulary does not matter
    shuffled = torch.tensor([[0.3, 0.1, 0.4, 0.2]]).log()
    out = top_p_filter(shuffled, 0.6)
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, False, True, False]]))
    assert torch.equal(out[torch.isfinite(out)], shuffled[torch.isfinite(out)])


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.5, 3.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, False, True, False, True]]
    assert torch.isfinite(top_k_filter(logits, 3)).sum() == 3  # a tie at the threshold keeps one
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 9), logits)


# --- config ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, key", [
    ({"strategy": "nucleus"}, "decoding.strategy"),
    ({"beam_size": 0}, "decoding.beam_size"),
    ({"beam_size": 2, "n_best": 3}, "decoding.n_best"),
    ({"n_best": 0}, "decoding.n_best"),
    ({"max_len": 0}, "decoding.max_len"),
    ({"min_len": 5, "max_len": 4}, "decoding.min_len"),
    ({"min_len": -1}, "decoding.min_len"),
    ({"max_len_a": -0.5}, "decoding.max_len_a"),
    ({"length_penalty": math.inf}, "decoding.length_penalty"),
    ({"no_repeat_ngram_size": -1}, "decoding.no_repeat_ngram_size"),
    ({"temperature": 0.0}, "decoding.temperature"),
    ({"top_k": -1}, "decoding.top_k"),
    ({"top_p": 0.0}, "decoding.top_p"),
    ({"top_p": 1.5}, "decoding.top_p"),
    ({"num_samples": 0}, "decoding.num_samples"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^{key}: "):
        DecodingConfig(**kwargs)
