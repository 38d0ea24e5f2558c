"""Ancestral sampling with temperature, top-k and top-p (nucleus) filtering.

The sampling distribution of a row is built from its constrained log-probs
(see `strategy.py`) in this order: divide by `temperature`, keep the `top_k`
most probable tokens, keep the nucleus of mass `top_p`, renormalise.  These
only shape the draw: the score added is still the model's log-prob of the
token drawn, so `Hypothesis.score == model.score`.

Randomness.  Each source draws from its own `torch.Generator`, seeded from
`cfg.seed` and the source's tokens (a hash of both), one uniform number per
row and step, and samples by inverting the CDF.  A source's samples therefore
depend on the seed and the source only: not on the global RNG, the other
sources in the batch, its position there or the padding.  (Identical sources
get identical samples; use `num_samples` for several samples of one source.)
`num_samples` rows per source are drawn, returned best first by
normalized score (ties in draw order).
"""

from __future__ import annotations

import hashlib

import torch

from .config import DecodingConfig
from .greedy import GreedySearch

NEG_INF = float("-inf")
TOP_P_TOLERANCE = 1e-6  # float32 sums: a set whose mass is within this of p counts as reaching p
HEAD_SIZES = (64, 512)  # top-p without top-k first tries these heads of the distribution before a full sort


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, -inf elsewhere: (N, V) -> (N, V).

    k = 0 or k >= V keeps everything.  Exactly k entries survive, even on ties.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    top = logits.topk(k, dim=-1)
    return torch.full_like(logits, NEG_INF).scatter_(-1, top.indices, top.values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose total
    probability (under softmax(logits)) reaches p; -inf elsewhere.  (N, V) -> (N, V).

    A token survives when the mass of the tokens ranked strictly above it is
    still below p; the most probable token always survives.  p = 1 keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, nucleus(sorted_logits, p))
    return logits.masked_fill(~keep, NEG_INF)


def nucleus(sorted_logits: torch.Tensor, p: float, log_total: torch.Tensor | None = None) -> torch.Tensor:
    """(N, m) logits sorted in descending order -> (N, m) bool, True inside the top-p nucleus.

    log_total (N, 1) is the log normaliser of the whole distribution when the
    m sorted logits are only its head (default: they are all of it).
    """
    if log_total is None:
        log_total = sorted_logits.logsumexp(dim=-1, keepdim=True)
    probs = (sorted_logits - log_total).exp()  # (N, m)
    mass_above = probs.cumsum(dim=-1) - probs  # (N, m) mass ranked strictly above each token
    keep = mass_above < p - TOP_P_TOLERANCE
    keep[..., 0] = True
    return keep


def sample_tokens(logp: torch.Tensor, uniforms: torch.Tensor, cfg: DecodingConfig) -> torch.Tensor:
    """Draw one token per row: logp (N, V), uniforms (N,) in [0, 1) -> (N,).

    The distribution is softmax(top_p_filter(top_k_filter(logp / temperature))),
    computed on the sorted head of the distribution that the filters can keep
    (the top k, or the first of the top 64 / top 512 whose mass reaches p,
    else the whole sorted vocabulary),
    so that no step sorts the whole vocabulary unless it must.
    """
    logits = logp / cfg.temperature if cfg.temperature != 1.0 else logp
    if not cfg.top_k and cfg.top_p >= 1.0:
        return inverse_cdf_sample(logits, uniforms)
    V = logits.size(1)
    if 0 < cfg.top_k < V:
        values, order = logits.topk(cfg.top_k, dim=1)  # (N, k) best first; top-p acts on these alone
        log_total = None
    else:
        log_total = logits.logsumexp(dim=1, keepdim=True)  # (N, 1)
        values, order = sorted_head(logits, log_total, cfg.top_p)  # (N, m)
    if cfg.top_p < 1.0:
        values = values.masked_fill(~nucleus(values, cfg.top_p, log_total), NEG_INF)
    return order.gather(1, inverse_cdf_sample(values, uniforms)[:, None]).squeeze(1)


def sorted_head(logits: torch.Tensor, log_total: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest logits of each row, sorted, with m large enough to hold every top-p nucleus."""
    for m in HEAD_SIZES:
        if 4 * m > logits.size(1):  # a partial selection this large costs about a full sort
            break
        values, order = logits.topk(m, dim=1)  # (N, m)
        if bool(((values - log_total).exp().sum(dim=1) >= p - TOP_P_TOLERANCE).all()):
            return values, order
    return logits.sort(dim=1, descending=True)


def inverse_cdf_sample(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of softmax(logits) (N, V) with uniforms (N,) in [0, 1)."""
    probs = logits.softmax(dim=-1)  # (N, V)
    cdf = probs.double().cumsum(dim=-1)  # (N, V)
    target = uniforms.to(cdf) * cdf[:, -1]  # (N,)
    tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # first index with cdf > target
    vocab = torch.arange(probs.size(1), device=probs.device)
    last_possible = torch.where(probs > 0, vocab, 0).amax(dim=1)  # guards against target rounding up to the total
    return torch.minimum(tokens, last_possible)


def source_seed(seed: int, tokens: list[int]) -> int:
    """A 63-bit seed from the config seed and one source's tokens (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}:{','.join(map(str, tokens))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Sampling(GreedySearch):
    """`num_samples` independent samples per source."""

    def __init__(self, cfg: DecodingConfig, max_lens: list[int], device: torch.device, sources: list[list[int]]):
        super().__init__(cfg, max_lens, device, rows_per_source=cfg.num_samples)
        self.generators = [torch.Generator().manual_seed(source_seed(cfg.seed, src)) for src in sources]

    def choose(self, logp: torch.Tensor) -> torch.Tensor:
        uniforms = torch.stack([torch.rand(self.k, generator=g, dtype=torch.float64)
                                for g in self.generators])  # (n, k) on the CPU, like the generators
        return sample_tokens(logp, uniforms.view(-1).to(logp.device), self.cfg)

    def keep_groups(self, keep: torch.Tensor) -> None:
        super().keep_groups(keep)
        self.generators = [self.generators[g] for g in keep.tolist()]
