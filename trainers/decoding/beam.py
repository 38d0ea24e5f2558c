"""Beam search with n-best lists, length penalty and exact stopping.

Bookkeeping (as fairseq).  Each source keeps k <= beam_size live rows.  At a
step every live row's score plus each allowed token's log-prob is a candidate;
the 2 * beam_size best of the k * V candidates of a source are taken, sorted.
Among them, an eos candidate ranked within the first beam_size becomes a
finished hypothesis; the first beam_size candidates that are not eos continue.
(With beam_size 1 and length_penalty 0 this is exactly greedy search.)
Each source keeps its n_best best finished hypotheses, ranked by

    normalized = score / len ** length_penalty        (score <= 0, len counts eos)

Exact stopping.  A source is finished when no live row can still finish with a
normalized score above its n_best-th finished one (or when nothing is live,
which happens at its length limit).  The bound on a live row with score s
(<= 0) after L tokens: log-probs are <= 0, so any finished extension has a raw
score <= s and a length in [L_lo, L_hi] = [max(L + 1, min_len), max_len], and
its normalized score is at most

    max over L' in [L_lo, L_hi] of  s / L' ** length_penalty
        = max(s / L_lo ** length_penalty, s / L_hi ** length_penalty)

because s / L' ** lp is monotonic in L' for a fixed sign of s: for lp > 0 and
s < 0 it grows with L' (the bound sits at L_hi = max_len); for lp < 0 it
shrinks (the bound sits at L_lo); for lp = 0 it is s.  The source stops when
its n_best-th finished normalized score >= the largest bound of its live rows
(-inf when it has fewer than n_best).  Unlike fairseq's "beam_size finished"
rule or HF's `early_stopping`, no hypothesis the beam could still reach is cut
off, so with a beam wide enough to hold every candidate this is exhaustive
search.

Early stopping (`early_stopping=True`, with a length penalty only).  A source
also stops once beam_size hypotheses have finished (counted as they finish,
whether or not they stay in the n_best list): fairseq's rule, which
CTranslate2 applies with patience 1 and HF with `early_stopping=True`.  The
n_best list it returns is the best of those finished so far.  Without a length
penalty the exact stop comes as early as the best hypothesis allows, and the
flag changes nothing (CTranslate2 also stops exactly there).
"""

from __future__ import annotations

import torch

from trainers.models import EOS_ID, PAD_ID

from .config import DecodingConfig
from .hypothesis import Hypothesis, best_first, make_hypothesis
from .strategy import NEG_INF, DecodeStrategy


class BeamSearch(DecodeStrategy):
    """Beam search over source groups of up to `beam_size` live rows."""

    def __init__(self, cfg: DecodingConfig, max_lens: list[int], device: torch.device):
        super().__init__(cfg, max_lens, device)
        n, nb, t_max = len(max_lens), cfg.n_best, max(max_lens, default=1)
        self.seqs = torch.empty(n, 1, 0, dtype=torch.long, device=device)  # (n, k, t) live tokens
        self.lps = torch.empty(n, 1, 0, device=device)  # (n, k, t) their log-probs
        self.scores = torch.zeros(n, 1, device=device)  # (n, k) live scores; -inf = dead row
        # The n_best best finished hypotheses of each source, best first (padded with pad / -inf).
        self.fin_norm = torch.full((n, nb), NEG_INF, device=device)  # (n, nb)
        self.fin_len = torch.zeros(n, nb, dtype=torch.long, device=device)  # (n, nb)
        self.fin_seqs = torch.full((n, nb, t_max), PAD_ID, dtype=torch.long, device=device)  # (n, nb, T)
        self.fin_lps = torch.zeros(n, nb, t_max, device=device)  # (n, nb, T)
        self.fin_count = torch.zeros(n, dtype=torch.long, device=device)  # (n,) hypotheses finished so far

    def advance(self, logp: torch.Tensor) -> None:
        n, k, t = self.seqs.shape
        V = logp.size(1)
        logp = self.mask_(logp, self.seqs.view(n * k, t)).view(n, k * V)  # (n, k*V)
        cand = (self.scores[:, :, None] + logp.view(n, k, V)).view(n, k * V)  # (n, k*V) raw scores
        top, flat = cand.topk(min(2 * self.cfg.beam_size, k * V), dim=1)  # (n, C) best first
        origin, token = flat // V, flat % V  # (n, C) row within the group, token
        ranked = min(self.cfg.beam_size, top.size(1))  # k of the next step

        finished = (token[:, :ranked] == EOS_ID) & (top[:, :ranked] > NEG_INF)  # (n, ranked)
        self.fin_count += finished.sum(dim=1)
        if bool(finished.any()):
            self.add_finished(finished, top[:, :ranked], origin[:, :ranked], logp.gather(1, flat[:, :ranked]))
        pick = self.first_non_eos(token, ranked)  # (n, k')
        self.extend(origin.gather(1, pick), token.gather(1, pick), top.gather(1, pick),
                    logp.gather(1, flat.gather(1, pick)))

        rows = torch.arange(n, device=self.device)[:, None] * k + origin.gather(1, pick)  # (n, k') old rows
        token = token.gather(1, pick)  # (n, k')
        keep = self.retire(self.finished_sources().cpu())
        if keep is not None:
            keep = keep.to(self.device)
            for name in ("seqs", "lps", "scores", "fin_norm", "fin_len", "fin_seqs", "fin_lps", "fin_count"):
                setattr(self, name, getattr(self, name)[keep])
            rows, token = rows[keep], token[keep]
        self.k, self.select_indices, self.next_tokens = ranked, rows, token.reshape(-1)

    @staticmethod
    def first_non_eos(token: torch.Tensor, count: int) -> torch.Tensor:
        """Positions (n, count) of the first `count` candidates that are not eos, in rank order
        (eos ones fill up when there are too few; `extend` marks them dead)."""
        rank = torch.arange(token.size(1), device=token.device)  # (C,)
        key = rank + (token == EOS_ID) * token.size(1)  # (n, C): eos candidates sort last
        return key.topk(count, dim=1, largest=False).indices

    def extend(self, origin: torch.Tensor, token: torch.Tensor, scores: torch.Tensor,
               token_lp: torch.Tensor) -> None:
        """The new live rows (n, k'): each continues row `origin` of its group with `token`."""
        n, k_new = origin.shape
        t = self.seqs.size(2)
        index = origin[:, :, None].expand(n, k_new, t)  # (n, k', t)
        self.seqs = torch.cat([self.seqs.gather(1, index), token[:, :, None]], dim=2)  # (n, k', t+1)
        self.lps = torch.cat([self.lps.gather(1, index), token_lp[:, :, None]], dim=2)  # (n, k', t+1)
        self.scores = scores.masked_fill(token == EOS_ID, NEG_INF)  # (n, k')
        self.t = t + 1

    def add_finished(self, mask: torch.Tensor, scores: torch.Tensor, origin: torch.Tensor,
                     eos_lp: torch.Tensor) -> None:
        """Merge eos candidates (n, c) -- where `mask` -- into the n_best lists."""
        n, c = mask.shape
        t, length, lp = self.t, self.t + 1, self.cfg.length_penalty
        norm = (scores / length ** lp).masked_fill(~mask, NEG_INF)  # (n, c)
        seqs = torch.full((n, c, self.fin_seqs.size(2)), PAD_ID, dtype=torch.long, device=self.device)
        seqs[:, :, :t] = self.seqs.gather(1, origin[:, :, None].expand(n, c, t))
        seqs[:, :, t] = EOS_ID
        lps = torch.zeros(n, c, self.fin_lps.size(2), device=self.device)
        lps[:, :, :t] = self.lps.gather(1, origin[:, :, None].expand(n, c, t))
        lps[:, :, t] = eos_lp

        all_norm = torch.cat([self.fin_norm, norm], dim=1)  # (n, nb + c): old ones first, so ties keep them
        best = all_norm.sort(dim=1, descending=True, stable=True).indices[:, :self.cfg.n_best]  # (n, nb)
        self.fin_norm = all_norm.gather(1, best)
        self.fin_len = torch.cat([self.fin_len, torch.full_like(norm, length, dtype=torch.long)], 1).gather(1, best)
        T = seqs.size(2)
        self.fin_seqs = torch.cat([self.fin_seqs, seqs], 1).gather(1, best[:, :, None].expand(n, -1, T))
        self.fin_lps = torch.cat([self.fin_lps, lps], 1).gather(1, best[:, :, None].expand(n, -1, T))

    def finished_sources(self) -> torch.Tensor:
        """(n,) bool: no live row can outrank the n_best-th finished hypothesis, or (early stopping with a
        length penalty) beam_size hypotheses have finished (see the module docstring)."""
        lp = self.cfg.length_penalty
        max_lens = self.max_lens.to(self.device, torch.float32)  # (n,)
        shortest = torch.full_like(max_lens, float(max(self.t + 1, self.cfg.min_len)))  # (n,)
        live_best = self.scores.max(dim=1).values  # (n,) the bound is monotone in s, so the best row decides
        bound = torch.maximum(live_best / shortest ** lp, live_best / max_lens ** lp)  # (n,)
        bound = bound.masked_fill(max_lens <= self.t, NEG_INF)  # at the length limit nothing is live
        done = self.fin_norm[:, -1] >= bound
        if self.cfg.early_stopping and lp != 0:
            done |= self.fin_count >= self.cfg.beam_size
        return done

    def finished_hypotheses(self, groups: torch.Tensor) -> list[list[Hypothesis]]:
        groups = groups.to(self.device)
        norms, lens = self.fin_norm[groups].tolist(), self.fin_len[groups].tolist()
        seqs, lps = self.fin_seqs[groups].tolist(), self.fin_lps[groups].tolist()
        out = []
        for g in range(len(norms)):
            hyps = [make_hypothesis(seqs[g][j][:lens[g][j]], lps[g][j][:lens[g][j]], self.cfg.length_penalty)
                    for j in range(len(norms[g])) if norms[g][j] > NEG_INF]
            out.append(best_first(hyps))
        return out
