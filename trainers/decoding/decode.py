"""The one decode loop: it serves every model family (through the incremental
interface of `trainers/models/base.py`) and every strategy (through the narrow
interface of `strategy.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.models import Seq2SeqModel
from trainers.models.base import eval_mode

from .beam import BeamSearch
from .config import DecodingConfig
from .greedy import GreedySearch
from .hypothesis import Hypothesis
from .sampling import Sampling
from .strategy import DecodeStrategy


def decode(model: Seq2SeqModel, src: torch.Tensor, src_lengths: torch.Tensor,
           cfg: DecodingConfig) -> list[list[Hypothesis]]:
    """Decode a batch of sources; for each source its hypotheses, best first.

    src (B, S) long, right-padded with 0; src_lengths (B,).  Greedy returns one
    hypothesis per source, beam search up to `n_best` (fewer only when fewer
    sequences are possible), sampling `num_samples`; all are sorted by
    normalized score.  Each source's length limit is `cfg.length_limit(src_len)`,
    lowered for a Transformer to its `max_positions`.  Runs under no_grad and in
    eval mode (the model's previous mode is restored).  Log-probs are a float32
    log_softmax over the full vocabulary.
    """
    lengths = src_lengths.tolist()
    if not lengths:
        return []
    cap = _position_cap(model)
    if cap < cfg.min_len:
        raise ValueError(f"decoding.min_len: {cfg.min_len} exceeds the model's max_positions={cap}")
    max_lens = [min(cfg.length_limit(n), cap) for n in lengths]
    strategy = make_strategy(cfg, max_lens, src, lengths)
    with torch.no_grad(), eval_mode(model):
        state = model.init_state(model.encode(src, src_lengths))
        if strategy.select_indices is not None:  # several rows per source from the start
            state = model.reorder_state(state, strategy.select_indices)
        while not strategy.done:
            logits, state = model.step(strategy.next_tokens, state)  # (N, V)
            strategy.advance(F.log_softmax(logits.float(), dim=-1))
            if not strategy.done and strategy.select_indices is not None:
                state = model.reorder_state(state, strategy.select_indices)
    return strategy.hypotheses


def make_strategy(cfg: DecodingConfig, max_lens: list[int], src: torch.Tensor,
                  src_lengths: list[int]) -> DecodeStrategy:
    """The strategy named by `cfg.strategy` for these sources (B, S) and their length limits (B,)."""
    if cfg.strategy == "greedy":
        return GreedySearch(cfg, max_lens, src.device)
    if cfg.strategy == "beam":
        return BeamSearch(cfg, max_lens, src.device)
    sources = [row[:n] for row, n in zip(src.tolist(), src_lengths)]  # sampling seeds hash the tokens
    return Sampling(cfg, max_lens, src.device, sources=sources)


def _position_cap(model: Seq2SeqModel) -> int:
    """Most decoder steps the model can take: a Transformer's position table ends at `max_positions`."""
    limit = getattr(model, "max_positions", None)
    return 2**31 if limit is None else int(limit)
