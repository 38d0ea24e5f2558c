"""Encoder-decoder attention for the RNN models: Luong `dot` / `general` and
Bahdanau `additive` scores, with the key side precomputed once per source.

Scores (q: decoder query, m: one encoder memory position, all d_model wide):

    dot       q . m
    general   q . (W_a m)                    (Luong's q^T W_a m)
    additive  v^T tanh(W_q q + W_k m + b)    (Bahdanau)

`keys(memory)` returns the part that depends on the source only (m, W_a m or
W_k m + b); the decoder computes it once per source in `init_state` and every
beam of that source reuses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RNN_ATTENTIONS


class Attention(nn.Module):
    """Masked attention of (n_src, m, d) queries over (n_src, S, d) memory."""

    def __init__(self, kind: str, d_model: int) -> None:
        super().__init__()
        if kind not in RNN_ATTENTIONS:
            raise ValueError(f"model.attention: must be one of {RNN_ATTENTIONS}, got {kind!r}")
        self.kind = kind
        if kind == "general":
            self.w_k = nn.Linear(d_model, d_model, bias=False)  # W_a
        elif kind == "additive":
            self.w_k = nn.Linear(d_model, d_model, bias=True)
            self.w_q = nn.Linear(d_model, d_model, bias=False)
            self.v = nn.Linear(d_model, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """(n_src, S, d) memory -> (n_src, S, d) keys; `dot` returns memory itself."""
        return memory if self.kind == "dot" else self.w_k(memory)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(n_src, m, d) queries, (n_src, S, d) keys -> (n_src, m, S) scores."""
        if self.kind != "additive":
            return torch.bmm(query, keys.transpose(1, 2))  # (n_src, m, S)
        q = self.w_q(query)  # (n_src, m, d)
        hidden = torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))  # (n_src, m, S, d)
        return self.v(hidden).squeeze(-1)  # (n_src, m, S)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor,
                src_mask: torch.Tensor) -> torch.Tensor:
        """Context vectors (n_src, m, d).

        query (n_src, m, d): the m = k*T queries of each source's hypotheses;
        memory, keys (n_src, S, d); src_mask (n_src, S) bool, True at padding.
        """
        scores = self.scores(query, keys)  # (n_src, m, S)
        scores = scores.masked_fill(src_mask.unsqueeze(1), float("-inf"))
        weights = F.softmax(scores, dim=-1)  # (n_src, m, S)
        return torch.bmm(weights, memory)  # (n_src, m, d)
