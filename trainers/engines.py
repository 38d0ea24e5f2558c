"""Decoding engines: one call, `engine.decode(sources, cfg)`, served by our
PyTorch decoder or by CTranslate2 (`generate.engine`, `eval.engine`, `serve.engine`).

    engine = load_engine("runs/p1/model", engine="ctranslate2", compute_type="int8")
    hyps = engine.decode([[57, 912, 2], [33, 2]], DecodingConfig(strategy="beam", beam_size=5))

Sources are token-id lists as `seqfoundry generate` builds them (ending with
eos, no bos, no padding).  Both engines return, per source, `Hypothesis`
objects best first: tokens without bos, ending with eos; `score` = the sum of
the model's log-probabilities of the tokens under the full softmax (eos
included), `normalized_score` = score / len ** length_penalty.

How `DecodingConfig` maps onto `ctranslate2.Translator.translate_batch`
(what cannot be honoured is refused in one line, never silently changed):

    strategy greedy      beam_size=1, sampling_topk=1
    strategy beam        beam_size, length_penalty, num_hypotheses=beam_size (re-ranked, cut to n_best),
                         patience 1 with early_stopping (see Beam stopping)
    strategy sample      refused: CTranslate2 seeds its sampler once per worker thread, so
                         `seed` could not make draws reproducible per source and independent of
                         batching (DESIGN.md); sample with the torch engine
    max_len, max_len_a/b each source's limit L = cfg.length_limit(src_len), capped at
                         model.max_positions; greedy: one call at the largest L, each draft
                         cut at its own L (a greedy draft does not depend on the limit before
                         it); beam: one call at the largest L, then one call per L for the
                         sources whose search came within a token of their L
    min_len              min_decoding_length = min_len - 1 (greedy); beam with min_len > 1 is
                         refused (eos is masked before CTranslate2's softmax: other rankings)
    no_repeat_ngram_size no_repeat_ngram_size

Length limit.  Ours allows only eos at the L-th token; CTranslate2 instead
stops with whatever token the L-th is.  So CTranslate2 decodes at most L - 1
tokens (`max_decoding_length = L - 1`, and eos may come from token min_len on:
CTranslate2 forbids eos while step < min_decoding_length); a hypothesis that
reaches L - 1 tokens without eos gets eos appended -- exactly our forced eos.

Scores.  CTranslate2 masks forbidden tokens (pad, bos via
`suppress_sequences`; eos before min_len) *before* its log-softmax, so its
returned scores are renormalised over the allowed tokens, and they are divided
by len ** length_penalty in beam search.  We therefore rescore every
hypothesis with `Translator.score_batch` (teacher forcing, eos appended by
CTranslate2, all tokens counted) and rank by our normalized score: `score`
means the same for both engines (equal to `model.score` within float error,
or the int8 model's own log-probs under int8).

One pass for greedy.  Where nothing would be masked but pad and bos (greedy,
min_len <= 1, no n-gram ban: `one_pass`), the search runs unmasked and its
per-token log-probs (CTranslate2's step callback) are the full softmax's, so
a draft that ends with eos needs no rescoring: the usual case of a trained
model, one decoder pass instead of two.  Only drafts cut at the limit are
rescored (their eos term is unknown), and a source whose draft holds pad or
bos is decoded again with them masked (before it, the unmasked argmax was
ours; a pad/bos argmax is where they part).

Beam stopping.  With length_penalty 0, CTranslate2 stops a source when its
top beam has finished and beam_size hypotheses are collected: exact for the
best hypothesis, as ours.  With a length penalty its own rule (stop after
beam_size * patience finished hypotheses, as fairseq) is not exact, so the
engine sets patience = max_len: the search then only ends at the length limit
(slower than ours, which stops as soon as no live beam can win).  With
`early_stopping` both engines use that rule (patience 1 here, the same count
in ours), so they stop at the same step, and fast.

What can still differ from the torch engine (documented, not hidden):
* At step L - 1, CTranslate2 finishes its k best candidates, while ours
  continues the k best non-eos ones to a forced eos: when an eos candidate is
  among the k best at that step, ours holds forced hypotheses CTranslate2 has
  not, so n-best lists that reach the limit may differ (best hypotheses agree
  in our tests except where the limit cuts hypotheses short).
* CTranslate2 ranks candidates step by step with the renormalised
  log-probs above; this matters only where pad/bos carry visible probability.
* `no_repeat_ngram_size`: ours lifts the ban on a row that would otherwise
  have no allowed token; CTranslate2 does not (practically never reached).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import torch

from .decoding import DecodingConfig, Hypothesis, decode
from .decoding.hypothesis import best_first, make_hypothesis
from .export_ct2 import COMPUTE_TYPES, MARKER, check_compute_type, ct2_model_for, vocabulary
from .models import BOS_ID, EOS_ID, PAD_ID, Seq2SeqModel
from .package import TOKENIZER, load_package

ENGINES = ("torch", "ctranslate2")
SCORE_BATCH_TOKENS = 4096
"""Rescoring (`score_batch`) runs in chunks of about this many tokens, sorted by length: in one batch it
holds every position's logits at once (2180 beam hypotheses of the demo: ~5 GB at vocab 8000, 3.7 s
against 0.9 s in chunks)."""


class Engine(Protocol):
    """Decodes token-id sources with one model (see the module docstring)."""

    max_positions: int | None
    """Longest source (and hypothesis) the model accepts; None = no limit."""

    def decode(self, sources: Sequence[Sequence[int]], cfg: DecodingConfig) -> list[list[Hypothesis]]:
        """For each source (ids ending with eos), its hypotheses best first."""
        ...

    def check(self, cfg: DecodingConfig) -> None:
        """Refuse (one-line ValueError naming the `decoding.` key) a config this engine cannot express."""
        ...


def check_engine_keys(engine: str, compute_type: str, *, key: str) -> None:
    """The checks a config slice can make alone (no device, no library): one-line ValueError naming the key."""
    if engine not in ENGINES:
        raise ValueError(f"{key}.engine: must be one of {ENGINES}, got {engine!r}")
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"{key}.compute_type: must be one of {COMPUTE_TYPES}, got {compute_type!r}")
    if engine == "torch" and compute_type != "float32":
        raise ValueError(f"{key}.compute_type: the torch engine decodes in float32 only, got {compute_type!r} "
                         f"(use {key}.engine=ctranslate2)")


def check_engine(engine: str, compute_type: str, *, key: str = "generate", device: str = "cpu") -> None:
    """Refuse (one-line ValueError naming `<key>.engine` / `<key>.compute_type`) an engine setting,
    including a compute type the device lacks."""
    check_engine_keys(engine, compute_type, key=key)
    if engine == "ctranslate2":
        check_compute_type(compute_type, device, key=f"{key}.compute_type")


def load_engine(package: str | Path, *, engine: str = "torch", compute_type: str = "float32",
                device: str = "cpu", threads: int = 0, key: str = "generate") -> Engine:
    """The engine for a model package: the packaged model in PyTorch, or its CTranslate2
    conversion for `compute_type` (converted once and cached, see `ct2_model_for`).

    threads: CPU threads of one decode call; 0 = as many as torch uses in this process
    (`torch.get_num_threads()`, which follows OMP_NUM_THREADS and Ray's CPU allotment), so that
    both engines get the same budget (CTranslate2's own default is 4, more than a 2-core machine has).
    Raises ValueError naming `<key>.engine` / `<key>.compute_type` for a bad setting,
    and `model.arch` for an LSTM/GRU package with engine=ctranslate2.
    """
    check_engine(engine, compute_type, key=key, device=device)
    if engine == "torch":
        if threads:
            torch.set_num_threads(threads)
        return TorchEngine(load_package(package).to(device), device=device)
    return CTranslate2Engine(ct2_model_for(package, compute_type), compute_type=compute_type,
                             device=device, threads=threads)


def decode_with_engine(package: str | Path, sources: Sequence[Sequence[int]], cfg: DecodingConfig, *,
                       engine: str = "torch", compute_type: str = "float32") -> list[list[Hypothesis]]:
    """One-shot `load_engine(package, ...).decode(sources, cfg)` (loads the model on every call)."""
    return load_engine(package, engine=engine, compute_type=compute_type).decode(sources, cfg)


# ----------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------

class TorchEngine:
    """Our decoder (`trainers.decoding.decode`) over right-padded batches."""

    def __init__(self, model: Seq2SeqModel, *, device: str = "cpu"):
        self.model, self.device = model.eval(), torch.device(device)
        self.max_positions = model.max_positions

    def check(self, cfg: DecodingConfig) -> None:
        """Our decoder expresses every DecodingConfig."""

    def decode(self, sources: Sequence[Sequence[int]], cfg: DecodingConfig) -> list[list[Hypothesis]]:
        if not sources:
            return []
        src, lengths = pad_sources(sources)
        return decode(self.model, src.to(self.device), lengths.to(self.device), cfg)


def pad_sources(sources: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> right-padded (B, S) long tensor (pad 0) and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sources])
    src = torch.full((len(sources), int(lengths.max())), PAD_ID, dtype=torch.long)
    for row, ids in zip(src, sources):
        row[: len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return src, lengths


# ----------------------------------------------------------------------------
# CTranslate2
# ----------------------------------------------------------------------------

class CTranslate2Engine:
    """A `ctranslate2.Translator` over a converted model folder (see `trainers.export_ct2`)."""

    def __init__(self, model_dir: str | Path, *, compute_type: str = "float32", device: str = "cpu",
                 threads: int = 0):
        import ctranslate2

        config = _converted_model_config(model_dir)
        self.vocab = vocabulary(Path(model_dir) / TOKENIZER, config["vocab_size"])
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.max_positions = config["max_positions"]
        self.translator = ctranslate2.Translator(str(model_dir), device=device, compute_type=compute_type,
                                                 intra_threads=threads or torch.get_num_threads())

    def check(self, cfg: DecodingConfig) -> None:
        translate_options(cfg, self.vocab)

    def decode(self, sources: Sequence[Sequence[int]], cfg: DecodingConfig) -> list[list[Hypothesis]]:
        options = translate_options(cfg, self.vocab)
        for s in sources:
            if len(s) > self.max_positions:
                raise ValueError(f"position {len(s) - 1} exceeds model.max_positions={self.max_positions}")
        if cfg.min_len > self.max_positions:
            raise ValueError(f"decoding.min_len: {cfg.min_len} exceeds the model's max_positions={self.max_positions}")
        batch = [[self.vocab[i] for i in s] for s in sources]
        limits = self.limits(sources, cfg)
        if not sources:
            return []
        if cfg.strategy == "greedy":
            return self._greedy(batch, limits, cfg, options)
        return self._beam(batch, limits, cfg, options)

    def limits(self, sources: Sequence[Sequence[int]], cfg: DecodingConfig) -> list[int]:
        """Each source's length limit (`cfg.length_limit`), capped at the model's max_positions."""
        return [min(cfg.length_limit(len(s)), self.max_positions) for s in sources]

    # --- greedy: one call for every limit ------------------------------------------------------------------

    def _greedy(self, batch: list[list[str]], limits: list[int], cfg: DecodingConfig,
                options: dict) -> list[list[Hypothesis]]:
        """Greedy search of every source in one call at the largest limit: a greedy draft does not depend on
        the limit before it, so each source's hypothesis is its draft if that ends with eos within its own
        limit, else the draft cut there with eos appended. Where CTranslate2's log-probs are ours (`one_pass`)
        the search runs unmasked and a draft that ends by itself keeps them; cut drafts are rescored, and a
        source whose used draft holds pad or bos (ours never picks them) is decoded again masked."""
        exact = one_pass(cfg)
        drafts, steps = self._greedy_drafts(batch, limits, cfg, options, masked=not exact)
        banned = {self.vocab[PAD_ID], self.vocab[BOS_ID]}
        out: list[list[Hypothesis]] = [[] for _ in batch]
        bodies: dict[int, list[str]] = {}  # source -> draft to rescore
        again = []
        for i, (draft, limit) in enumerate(zip(drafts, limits)):
            used, ended = self._within(draft, limit)
            if exact and banned & set(used):
                again.append(i)
            elif exact and ended:
                out[i] = [make_hypothesis([self.ids[t] for t in used], steps[i][:len(used)], cfg.length_penalty)]
            else:
                bodies[i] = used
        if again:
            redo, _ = self._greedy_drafts([batch[i] for i in again], [limits[i] for i in again], cfg, options,
                                          masked=True)
            bodies |= {i: self._within(draft, limits[i])[0] for i, draft in zip(again, redo)}
        index = sorted(bodies)
        for i, hyps in zip(index, self._rescored([batch[i] for i in index], [[bodies[i]] for i in index], cfg)):
            out[i] = hyps
        return out

    def _within(self, draft: list[str], limit: int) -> tuple[list[str], bool]:
        """(the part of a draft that a search with this limit makes, whether it ends with eos by itself)."""
        if draft and draft[-1] == self.vocab[EOS_ID] and len(draft) <= limit:
            return draft, True
        return draft[:limit - 1], False

    def _greedy_drafts(self, batch: list[list[str]], limits: list[int], cfg: DecodingConfig, options: dict, *,
                       masked: bool) -> tuple[list[list[str]], list[list[float]]]:
        """Greedy drafts of `batch` in one call at the largest limit (at most limit - 1 tokens) and, unmasked
        (`masked=False`: pad and bos allowed), each drafted token's log-prob from the step callback."""
        top = max(limits)
        steps: list[list[float]] = [[] for _ in batch]
        if top <= 1:  # only eos is possible
            return [[] for _ in batch], steps

        def collect(step) -> bool:
            steps[step.batch_id].append(step.log_prob)
            return False

        options = dict(options, max_decoding_length=top - 1, min_decoding_length=min(max(cfg.min_len - 1, 0), top - 1))
        if not masked:
            options |= dict(suppress_sequences=None, return_scores=True, callback=collect)
        return [r.hypotheses[0] for r in self.translator.translate_batch(batch, **options)], steps

    # --- beam: one call, then by limit where it reached one --------------------------------------------------

    def _beam(self, batch: list[list[str]], limits: list[int], cfg: DecodingConfig,
              options: dict) -> list[list[Hypothesis]]:
        """Beam search of every source in one call at the largest limit, then one call a limit for the sources
        whose hypotheses came within one token of their own limit. A source whose hypotheses all end with eos
        at least two tokens before its limit keeps them: up to there the search is the one a call at its
        limit makes. That call could still differ in the lower n-best ranks, where its last step turns live
        beams into cut hypotheses, which is where CTranslate2 departs from our decoder anyway (see "What can
        still differ"): on 2592 sources of random tiny models, n-best lists differed from ours for 572
        sources merged against 592 by limit, best hypotheses for 80 either way. With a patience above 1 the
        search runs to the limit: every limit is its own call."""
        drafts: list[list[list[str]]] = [[] for _ in batch]
        pending = list(range(len(batch)))
        if options["patience"] == 1.0 and len(set(limits)) > 1:
            merged = self._beam_drafts(batch, max(limits), cfg, options)
            pending = []
            for i, hyps in enumerate(merged):
                if all(h and h[-1] == self.vocab[EOS_ID] and len(h) <= limits[i] - 2 for h in hyps):
                    drafts[i] = hyps
                else:
                    pending.append(i)
        by_limit: dict[int, list[int]] = {}
        for i in pending:
            by_limit.setdefault(limits[i], []).append(i)
        for limit, indices in sorted(by_limit.items()):
            for i, hyps in zip(indices, self._beam_drafts([batch[i] for i in indices], limit, cfg, options)):
                drafts[i] = hyps
        return self._rescored(batch, drafts, cfg)

    def _beam_drafts(self, batch: list[list[str]], limit: int, cfg: DecodingConfig,
                     options: dict) -> list[list[list[str]]]:
        """Beam hypotheses (token strings, at most limit - 1 tokens) of sources sharing `limit`."""
        if limit == 1:  # only eos is possible
            return [[[]] for _ in batch]
        options = dict(options, max_decoding_length=limit - 1,
                       min_decoding_length=min(max(cfg.min_len - 1, 0), limit - 1))
        return [r.hypotheses for r in self.translator.translate_batch(batch, **options)]

    def _rescored(self, batch: list[list[str]], drafts: list[list[list[str]]],
                  cfg: DecodingConfig) -> list[list[Hypothesis]]:
        """Append eos where the limit stopped a draft, score every draft by teacher forcing, rank, cut."""
        eos = self.vocab[EOS_ID]
        bodies = [[d[:-1] if d and d[-1] == eos else d for d in hyps] for hyps in drafts]  # without eos
        flat_src = [src for src, hyps in zip(batch, bodies) for _ in hyps]
        flat_tgt = [body for hyps in bodies for body in hyps]
        scored = iter(self.translator.score_batch(flat_src, flat_tgt, max_input_length=0, batch_type="tokens",
                                                  max_batch_size=SCORE_BATCH_TOKENS) if flat_tgt else [])
        keep = cfg.n_best if cfg.strategy == "beam" else (cfg.num_samples if cfg.strategy == "sample" else 1)
        out = []
        for hyps in bodies:
            ranked = []
            for body in hyps:
                result = next(scored)
                tokens = [self.ids[t] for t in body] + [EOS_ID]
                ranked.append(make_hypothesis(tokens, list(result.log_probs), cfg.length_penalty))
            out.append(best_first(ranked)[:keep])
        return out


def one_pass(cfg: DecodingConfig) -> bool:
    """Whether CTranslate2's own per-token log-probs are ours (no renormalisation): greedy search with no
    eos masked by min_len and no n-gram ban; pad and bos are then left unmasked and checked after."""
    return cfg.strategy == "greedy" and cfg.min_len <= 1 and not cfg.no_repeat_ngram_size


def translate_options(cfg: DecodingConfig, vocab: list[str]) -> dict:
    """`translate_batch` keyword arguments for `cfg` (the length limits are set per group).

    Raises ValueError naming the `decoding.` key that CTranslate2 cannot express.
    """
    options = dict(return_scores=False, return_end_token=True, max_input_length=0, length_penalty=0.0,
                   suppress_sequences=[[vocab[PAD_ID]], [vocab[BOS_ID]]],  # never generated, as ours
                   no_repeat_ngram_size=cfg.no_repeat_ngram_size, patience=1.0)
    if cfg.strategy == "greedy":
        return dict(options, beam_size=1, sampling_topk=1)
    if cfg.strategy == "beam":
        if cfg.min_len > 1:
            raise ValueError(f"decoding.min_len: {cfg.min_len} with beam search on CTranslate2 ranks hypotheses by "
                             "log-probs renormalised without eos (not ours); use min_len<=1 or engine=torch")
        return dict(options, beam_size=cfg.beam_size, num_hypotheses=cfg.beam_size,
                    length_penalty=cfg.length_penalty,
                    patience=float(cfg.max_len) if cfg.length_penalty and not cfg.early_stopping else 1.0)
    raise ValueError("decoding.strategy: sample cannot keep its promise on CTranslate2 (its sampler is seeded once per "
                     "thread, so decoding.seed would not make draws reproducible per source or independent of "
                     "batching); sample with engine=torch")


def _converted_model_config(model_dir: str | Path) -> dict:
    """vocab_size and max_positions of a converted model (its vocabulary and seqfoundry marker)."""
    folder = Path(model_dir)
    vocab = json.loads((folder / "shared_vocabulary.json").read_text())
    return {"vocab_size": len(vocab), "max_positions": json.loads((folder / MARKER).read_text())["max_positions"]}


__all__ = ["Engine", "TorchEngine", "CTranslate2Engine", "load_engine", "decode_with_engine", "check_engine",
           "translate_options", "one_pass", "pad_sources", "ENGINES"]
