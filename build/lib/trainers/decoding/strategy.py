"""What every decoding strategy shares: the narrow interface the decode loop
drives (as OpenNMT-py's `DecodeStrategy`), the bookkeeping of which sources are
still being decoded, and the token constraints.

The loop (`decode.py`) calls, once per step,

    strategy.advance(logp)            # (N, V) float32 log-probs of the live rows
    strategy.done                     # every source finished?
    strategy.select_indices           # (n_src', k') rows for model.reorder_state, None = keep all
    strategy.next_tokens              # (N',) the tokens to feed next

Rows are laid out in source groups of `k` rows (see `trainers/models/base.py`).
A strategy drops a source from the computation as soon as it is finished, by
leaving its group out of `select_indices`.

Constraints (`mask_`), applied to a copy of the log-probs that only chooses
tokens: a forbidden token gets -inf, an allowed one keeps the model's value, so
the log-prob added to a hypothesis' score is always the model's own.
With L = tokens generated so far + 1 (the length after this step, eos counted):
pad and bos are never allowed; eos is forbidden while L < min_len; at the last
allowed step (L = the source's length limit) only eos is allowed; a token that
would complete an n-gram already in the hypothesis is forbidden
(`no_repeat_ngram_size`), unless that leaves a row nothing at all (then the
n-gram ban is lifted for that row, the length rules are not).
"""

from __future__ import annotations

import torch

from trainers.models import BOS_ID, EOS_ID, PAD_ID

from .config import DecodingConfig
from .hypothesis import Hypothesis

NEG_INF = float("-inf")
assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)  # `mask_` forbids pad and bos as the slice [:EOS_ID]


class DecodeStrategy:
    """Base class: source bookkeeping and token constraints; subclasses choose tokens."""

    def __init__(self, cfg: DecodingConfig, max_lens: list[int], device: torch.device):
        self.cfg = cfg
        self.device = device
        n = len(max_lens)
        self.active = torch.arange(n)  # (n_active,) original index of each live source group (CPU)
        self.max_lens = torch.tensor(max_lens, dtype=torch.long)  # (n_active,) length limit per group (CPU)
        self.k = 1  # rows per source group
        self.t = 0  # tokens generated so far by every live row
        self.hypotheses: list[list[Hypothesis]] = [[] for _ in range(n)]
        self.select_indices: torch.Tensor | None = None
        self.next_tokens = torch.full((n,), BOS_ID, dtype=torch.long, device=device)  # (N,)

    @property
    def done(self) -> bool:
        return self.active.numel() == 0

    def advance(self, logp: torch.Tensor) -> None:
        """Consume the (N, V) log-probs of the live rows and take one step."""
        raise NotImplementedError

    # --- constraints -----------------------------------------------------------

    def mask_(self, logp: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        """Forbid tokens in place: logp (N, V) of rows whose tokens so far are seqs (N, t)."""
        length = self.t + 1
        logp[:, :EOS_ID] = NEG_INF  # pad (0) and bos (1) are never generated
        if length < self.cfg.min_len:
            logp[:, EOS_ID] = NEG_INF
        n = self.cfg.no_repeat_ngram_size
        if n and self.t >= n:
            ban = ngram_ban(seqs, n, logp.size(1))  # (N, V)
            ban &= ((logp > NEG_INF) & ~ban).any(dim=1, keepdim=True)  # never ban a row's last option
            logp.masked_fill_(ban, NEG_INF)
        last = self.max_lens == length  # (n_active,) groups at their last allowed step
        if bool(last.any()):
            rows = last.repeat_interleave(self.k).to(self.device)  # (N,)
            logp[rows, EOS_ID + 1:] = NEG_INF  # only eos remains
        return logp

    # --- source bookkeeping ------------------------------------------------------

    def retire(self, finished: torch.Tensor) -> torch.Tensor | None:
        """Drop finished source groups, finished (n_active,) bool on CPU.

        Records each finished group's hypotheses (`finished_hypotheses`) and
        returns the indices of the groups that stay (None when all stay).
        """
        if not bool(finished.any()):
            return None
        groups = finished.nonzero().squeeze(1)  # (n_done,)
        for g, hyps in zip(groups.tolist(), self.finished_hypotheses(groups)):
            self.hypotheses[int(self.active[g])] = hyps
        keep = (~finished).nonzero().squeeze(1)  # (n_keep,)
        self.active, self.max_lens = self.active[keep], self.max_lens[keep]
        return keep

    def finished_hypotheses(self, groups: torch.Tensor) -> list[list[Hypothesis]]:
        """The hypotheses, best first, of each of these (finished) groups."""
        raise NotImplementedError


def ngram_ban(seqs: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """Tokens that would repeat an n-gram: seqs (N, t) with t >= n -> (N, V) bool.

    Each row's last n-1 tokens are compared with the first n-1 tokens of every
    n-gram already in the row; the last token of each match is banned.
    """
    windows = seqs.unfold(1, n, 1)  # (N, t-n+1, n)
    suffix = seqs[:, seqs.size(1) - n + 1:]  # (N, n-1)
    hit = (windows[:, :, :-1] == suffix[:, None, :]).all(dim=2)  # (N, t-n+1)
    banned = windows[:, :, -1].masked_fill(~hit, PAD_ID)  # (N, t-n+1); pad is never allowed anyway
    ban = torch.zeros(seqs.size(0), vocab_size, dtype=torch.bool, device=seqs.device)
    ban.scatter_(1, banned, True)
    ban[:, PAD_ID] = False
    return ban
