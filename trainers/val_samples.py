"""Validation samples: a fixed handful of validation sources, decoded greedily at each validation.

    samples = ValidationSamples.load(job.data, job.objective, count=8, seed=0)   # the same on every rank
    rows = samples.decode(model, zero_stage=1, model_cfg=cfg)                    # every rank, same sources
    table = [(row.source, row.reference, row.output) for row in rows]
    scores(rows)  # -> {"val_bleu": ..., "val_chrf": ...}  (sacreBLEU)

Why every rank decodes: under ZeRO-3 the parameters are partitioned and every
forward is a collective, so a decode on rank 0 alone would hang. Here every
rank takes part: under ZeRO-3 all ranks gather the full weights once (one
collective, `GatheredParameters`) into a plain copy of the model, then decode
locally; under ZeRO-0/1/2 each rank already holds every weight. The sources
are read with rank 0 / world size 1 on every rank, so all ranks decode the
same sentences and make the same decisions; only rank 0's sink logs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from data_pipeline import DataConfig, Manifest, ObjectiveConfig, build_batcher, detokenize, load_tokenizer

from .decoding import DecodingConfig, decode
from .models import ModelConfig, Seq2SeqModel, build_model

EXTRA_TOKENS = 8
"""Greedy outputs may run this many tokens past the longest reference of the samples."""


@dataclass
class SampleRow:
    source: str
    reference: str
    output: str


@dataclass
class ValidationSamples:
    """The first `count` validation samples (source ids, lengths, reference texts), in a fixed order."""

    src: torch.Tensor
    """(N, S) int64 source ids, pad 0."""
    src_lengths: torch.Tensor
    """(N,) int64."""
    sources: list[str]
    references: list[str]
    max_len: int
    tokenizer: object

    @classmethod
    def load(cls, data: DataConfig, objective: ObjectiveConfig, *, count: int, seed: int) -> "ValidationSamples | None":
        """The samples, or None when the data has no validation split (or count is 0)."""
        if not count:
            return None
        try:  # rank 0 of 1 on every rank: the same sources everywhere
            batcher = build_batcher(data, objective, rank=0, world_size=1, seed=seed, split="valid")
        except (ValueError, FileNotFoundError):
            return None
        src, tgt = [], []
        for batch in batcher:
            for i in range(len(batch)):
                src.append(batch.src[i, : int(batch.src_lengths[i])])
                tgt.append(batch.tgt_out[i, : int(batch.tgt_lengths[i])])
            if len(src) >= count:
                break
        if not src:
            return None
        src, tgt = src[:count], tgt[:count]
        tokenizer = load_tokenizer(Manifest.load(data.dir).local_tokenizer_path())
        padded = torch.nn.utils.rnn.pad_sequence(src, batch_first=True, padding_value=0)  # (N, S)
        return cls(src=padded, src_lengths=torch.tensor([len(s) for s in src]),
                   sources=[detokenize(tokenizer, s.tolist()) for s in src],
                   references=[detokenize(tokenizer, t.tolist()) for t in tgt],
                   max_len=max(len(t) for t in tgt) + EXTRA_TOKENS, tokenizer=tokenizer)

    def decode(self, model: Seq2SeqModel, *, zero_stage: int, model_cfg: ModelConfig,
               count: int | None = None) -> list[SampleRow]:
        """Greedy outputs of the first `count` samples (default all). Every rank must call it (ZeRO-3)."""
        n = len(self.sources) if count is None else min(count, len(self.sources))
        with decodable(model, zero_stage=zero_stage, model_cfg=model_cfg) as plain:
            device = next(plain.parameters()).device
            cfg = DecodingConfig(strategy="greedy", beam_size=1, n_best=1, max_len=self.max_len)
            hyps = decode(plain, self.src[:n].to(device), self.src_lengths[:n].to(device), cfg)
        return [SampleRow(self.sources[i], self.references[i], detokenize(self.tokenizer, h[0].tokens))
                for i, h in enumerate(hyps)]


@contextlib.contextmanager
def decodable(model: Seq2SeqModel, *, zero_stage: int, model_cfg: ModelConfig):
    """The model with every weight present: itself (ZeRO <= 2), or a plain copy gathered from the
    ZeRO-3 partitions (a collective: every rank enters). Restores train mode afterwards."""
    if zero_stage < 3:
        was_training = model.training
        try:
            yield model.eval()
        finally:
            model.train(was_training)
        return
    import deepspeed

    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        plain = build_model(model_cfg)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        plain.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    device = next(model.parameters()).device
    yield plain.to(device).eval()


def scores(rows: list[SampleRow]) -> dict[str, float]:
    """sacreBLEU corpus BLEU and chrF of the outputs against the references."""
    from sacrebleu.metrics import BLEU, CHRF

    outputs, refs = [r.output for r in rows], [[r.reference for r in rows]]
    return {"val_bleu": BLEU().corpus_score(outputs, refs).score, "val_chrf": CHRF().corpus_score(outputs, refs).score}
