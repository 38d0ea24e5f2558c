"""The interface every Seq2Seq model implements: training forward, scoring and
incremental decoding.

Incremental decoding (one loop serves every family, as in OpenNMT-py):

    enc = model.encode(src, src_lengths)          # once per batch of sources
    state = model.init_state(enc)                 # one hypothesis per source
    state = model.reorder_state(state, idx)       # expand / reorder / drop
    logits, state = model.step(tokens, state)     # (N,) -> (N, V)

Hypotheses are laid out in **source groups**: rows `[g*k, (g+1)*k)` of the
state all belong to source group `g`, with `k` hypotheses per source (k=1
after `init_state`).  `reorder_state(state, beam_indices)` takes a LongTensor
`beam_indices` of shape `(n_src', k')` holding flat row indices into the old
state; every row of `beam_indices` must pick rows of a single old source group.
That one hook expands a state to a beam (`arange(n)[:, None].expand(n, k)`),
reorders it by the beams' back-pointers, and drops finished sources (omit
their group).  Because the grouping is explicit, per-source tensors (encoder
memory, the Transformer's cross-attention keys/values) are kept once per
source and selected by `beam_indices[:, 0] // k`, never copied per beam.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import PAD_ID, ModelConfig
from .losses import linear_cross_entropy


@dataclass(frozen=True)
class FlopCount:
    """Analytic forward FLOPs (multiply-add = 2 FLOPs) per token.

    `per_source_token` is the encoder's cost per source token and
    `per_target_token` the decoder's (including the output projection and the
    cross-attention over the source) per target token; training costs ~3x.
    """

    per_source_token: float
    per_target_token: float

    def forward(self, src_tokens: int, tgt_tokens: int) -> float:
        return self.per_source_token * src_tokens + self.per_target_token * tgt_tokens

    def training(self, src_tokens: int, tgt_tokens: int) -> float:
        """Forward plus backward (2x forward) FLOPs."""
        return 3.0 * self.forward(src_tokens, tgt_tokens)


class Seq2SeqModel(nn.Module, ABC):
    """An encoder-decoder over one shared vocabulary (pad=0, bos=1, eos=2)."""

    config: ModelConfig

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor,
                labels: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """Teacher-forced logits, or the training loss when `labels` are given.

        src (B, S) long, right-padded with 0; src_lengths (B,) long;
        tgt_in (B, T) long, starting with bos, right-padded with 0.
        Returns logits (B, T, V); with labels (B, T) (target + eos, pad 0) the
        mean token cross-entropy instead, fused with the tied output
        projection so that the (B, T, V) logits are never materialised, smoothed
        by `label_smoothing` as `F.cross_entropy(label_smoothing=)`.
        """
        hidden = self.hidden_states(src, src_lengths, tgt_in)  # (B, T, D)
        if labels is None:
            return F.linear(hidden, self.output_weight)  # (B, T, V)
        return linear_cross_entropy(hidden.flatten(0, 1), self.output_weight, labels.flatten(),
                                    label_smoothing=label_smoothing)

    @abstractmethod
    def hidden_states(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced final decoder states (B, T, D), before the tied output projection."""

    @property
    @abstractmethod
    def output_weight(self) -> torch.Tensor:
        """(V, D) weight of the output projection (the shared embedding)."""

    @abstractmethod
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Any:
        """Run the encoder once for a batch of sources (B, S)."""

    @abstractmethod
    def init_state(self, encoded: Any) -> Any:
        """Decoder state with one hypothesis per source, before any token."""

    @abstractmethod
    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Advance every hypothesis by one token.

        tokens (N,) long: the last token of each hypothesis (bos first).
        Returns logits (N, V) for the next token and the advanced state.
        """

    @abstractmethod
    def reorder_state(self, state: Any, beam_indices: torch.Tensor) -> Any:
        """Select hypotheses: beam_indices (n_src', k') flat rows of the old state,
        each row of it within one old source group (see the module docstring)."""

    @abstractmethod
    def flops(self, src_len: int, tgt_len: int) -> FlopCount:
        """Analytic forward FLOPs per token for sequences of these lengths."""

    @classmethod
    def position_limit(cls, cfg: ModelConfig) -> int | None:
        """Longest source or target sequence a model of this family and config accepts; None = no limit."""
        return None

    @property
    def max_positions(self) -> int | None:
        """Longest source or target sequence this model accepts (a Transformer's position table); None = any."""
        return type(self).position_limit(self.config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (unique) parameters; a shared embedding counts once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def score(self, src: torch.Tensor, src_lengths: torch.Tensor,
              tgt: torch.Tensor, tgt_lengths: torch.Tensor) -> torch.Tensor:
        """Sum of log-probabilities of each target given its source, float32 (B,).

        tgt (B, T) long is the target without bos and with eos, right-padded;
        tgt_lengths (B,) counts its tokens, eos included.  Runs in eval mode.
        """
        bos = torch.ones_like(tgt[:, :1])
        tgt_in = torch.cat([bos, tgt[:, :-1]], dim=1)  # (B, T)
        with eval_mode(self):
            logits = self(src, src_lengths, tgt_in).float()  # (B, T, V)
        logp = F.log_softmax(logits, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T)
        positions = torch.arange(tgt.size(1), device=tgt.device)
        mask = positions[None, :] < tgt_lengths[:, None]  # (B, T)
        return logp.masked_fill(~mask, 0.0).sum(dim=1)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily switch a module to eval mode, restoring its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padded positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def group_rows(beam_indices: torch.Tensor, old_group_size: int) -> torch.Tensor:
    """(n_src', k') flat row indices -> (n_src',) indices of the old source groups."""
    return beam_indices[:, 0] // old_group_size


__all__ = ["FlopCount", "Seq2SeqModel", "eval_mode", "padding_mask", "group_rows", "PAD_ID"]
