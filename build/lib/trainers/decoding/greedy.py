"""Greedy search, and the row bookkeeping it shares with sampling: every source
has `k` independent rows (1 for greedy), each row ends at its own eos, and a
source leaves the computation when all its rows have ended."""

from __future__ import annotations

import torch

from trainers.models import EOS_ID, PAD_ID

from .config import DecodingConfig
from .hypothesis import Hypothesis, best_first, make_hypothesis
from .strategy import DecodeStrategy


class GreedySearch(DecodeStrategy):
    """Take the most probable allowed token at every step."""

    def __init__(self, cfg: DecodingConfig, max_lens: list[int], device: torch.device, rows_per_source: int = 1):
        super().__init__(cfg, max_lens, device)
        n, k = len(max_lens), rows_per_source
        if k > 1:  # expand the one row per source that init_state gives
            self.select_indices = torch.arange(n, device=device)[:, None].expand(n, k)  # (n, k)
            self.next_tokens = self.next_tokens.repeat_interleave(k)  # (n*k,)
            self.k = k
        self.seqs = torch.empty(n, k, 0, dtype=torch.long, device=device)  # (n, k, t) tokens, pad after eos
        self.lps = torch.empty(n, k, 0, device=device)  # (n, k, t) the model's log-prob of each token
        self.ended = torch.zeros(n, k, dtype=torch.bool, device=device)  # (n, k)

    def choose(self, logp: torch.Tensor) -> torch.Tensor:
        """(N, V) masked log-probs -> (N,) next tokens."""
        return logp.argmax(dim=1)

    def advance(self, logp: torch.Tensor) -> None:
        n, k = self.ended.shape
        logp = self.mask_(logp, self.seqs.view(n * k, self.t))  # (N, V)
        tokens = self.choose(logp)  # (N,)
        token_lp = logp.gather(1, tokens[:, None]).squeeze(1)  # (N,) the model's log-prob: allowed tokens are unmasked
        ended = self.ended.view(n * k)
        tokens = tokens.masked_fill(ended, PAD_ID)  # ended rows still run (their group is live); ignore them
        token_lp = token_lp.masked_fill(ended, 0.0)
        self.seqs = torch.cat([self.seqs, tokens.view(n, k, 1)], dim=2)  # (n, k, t+1)
        self.lps = torch.cat([self.lps, token_lp.view(n, k, 1)], dim=2)  # (n, k, t+1)
        self.ended = (ended | (tokens == EOS_ID)).view(n, k)
        self.t += 1

        self.next_tokens, self.select_indices = tokens, None
        keep = self.retire(self.ended.all(dim=1).cpu())
        if keep is not None and keep.numel():
            keep = keep.to(self.device)
            self.keep_groups(keep)
            self.next_tokens = tokens.view(n, k)[keep].view(-1)  # (n' * k,)
            self.select_indices = keep[:, None] * k + torch.arange(k, device=self.device)  # (n', k)

    def keep_groups(self, keep: torch.Tensor) -> None:
        """Keep only these source groups (n',) of the per-group tensors."""
        self.seqs, self.lps, self.ended = self.seqs[keep], self.lps[keep], self.ended[keep]

    def finished_hypotheses(self, groups: torch.Tensor) -> list[list[Hypothesis]]:
        groups = groups.to(self.device)
        seqs, lps = self.seqs[groups].tolist(), self.lps[groups].tolist()  # (n_done, k, t) each
        out = []
        for group_seqs, group_lps in zip(seqs, lps):
            hyps = []
            for row, row_lps in zip(group_seqs, group_lps):
                length = row.index(EOS_ID) + 1
                hyps.append(make_hypothesis(row[:length], row_lps[:length], self.cfg.length_penalty))
            out.append(best_first(hyps))
        return out
