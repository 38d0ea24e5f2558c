"""Transformer encoder-decoder (Vaswani et al.) with incremental decoding.

Pure single-device PyTorch. One embedding matrix serves the source, the target
and the output projection (tied).  All attention goes through
`F.scaled_dot_product_attention`; self-attention uses one fused QKV projection
and cross-attention one fused KV projection.

Incremental decoding (see `base.py` for the source-group layout):

* `encode` runs the encoder once and returns the memory and its padding mask.
* `init_state` projects the memory to cross-attention keys/values for every
  decoder layer ONCE per source: (2, n_src, H, S, hd).  They are never copied
  per beam: in `step` the N = n_src * k queries are viewed as
  (n_src, H, k, hd) -- the k beams of a source act as k query positions over
  that source's keys/values.
* The self-attention cache is a preallocated buffer per layer,
  (2, N, capacity, H, hd), of which positions [0, pos) are filled.  `step`
  writes the new position in place (no per-step concatenation, which would
  copy the whole cache every step) and doubles the capacity when it is full.
  `reorder_state` index-selects only the filled positions straight into a
  fresh buffer (one copy; with positions before heads, each row's filled part
  is one contiguous block).  Because `step` writes in place, a state must not
  be stepped twice; branch it with `reorder_state` first.

Training: `forward(..., labels=)` (in base.py) fuses the tied output
projection with the cross-entropy (`losses.linear_cross_entropy`, chunked,
never materialising the (B, T, V) logits), and on the CPU dropout draws its mask with `torch.rand` (see `Dropout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import FlopCount, Seq2SeqModel
from .config import ModelConfig


CACHE_CAPACITY = 32
"""Initial self-attention cache length in incremental decoding (doubled when full)."""

# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(P, D) fixed encodings: sin on even channels, cos on odd (Vaswani et al.)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (D/2,)
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


class Positions(nn.Module):
    """Position encodings, sinusoidal (a non-persistent buffer) or learned."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.learned = cfg.positions == "learned"
        if self.learned:
            self.table = nn.Embedding(cfg.max_positions, cfg.d_model)
        else:
            self.register_buffer("table", sinusoidal_table(cfg.max_positions, cfg.d_model), persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:
        """(length, D) encodings of positions [start, start + length)."""
        table = self.table.weight if self.learned else self.table
        if start + length > table.size(0):
            raise ValueError(f"position {start + length - 1} exceeds model.max_positions={table.size(0)}")
        return table[start:start + length]


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """x (B, T, D); attn_mask (B, 1, 1, T) bool, True = attend.  -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    def step(self, x: torch.Tensor, cache: torch.Tensor, t: int) -> torch.Tensor:
        """One new position per row: x (N, D) -> (N, D).

        cache (2, N, capacity, H, hd) holds positions [0, t); position t is written in place.
        """
        N, D = x.shape
        qkv = self.qkv(x).view(N, 3, self.num_heads, D // self.num_heads)  # (N, 3, H, hd)
        cache[:, :, t] = qkv[:, 1:].transpose(0, 1)  # (2, N, H, hd)
        k, v = cache[:, :, :t + 1].transpose(2, 3).unbind(0)  # 2 x (N, H, t+1, hd), strided views
        q = qkv[:, 0, :, None]  # (N, H, 1, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, H, 1, hd); all cached keys are visible
        return self.out(y.view(N, D))  # (N, D)


class CrossAttention(nn.Module):
    """Multi-head attention over the encoder memory, with one fused KV projection."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def memory_kv(self, memory: torch.Tensor) -> torch.Tensor:
        """memory (B, S, D) -> keys/values (2, B, H, S, hd), contiguous per half."""
        B, S, D = memory.shape
        kv = self.kv(memory).view(B, S, 2, self.num_heads, D // self.num_heads)  # (B, S, 2, H, hd)
        return kv.permute(2, 0, 3, 1, 4)  # (2, B, H, S, hd)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); kv (2, B, H, S, hd); attn_mask (B, 1, 1, S) or None.  -> (B, T, D).

        In incremental decoding B is the number of sources and T the number of
        beams per source (the beams are independent queries of one source).
        """
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, hd)
        k, v = kv.unbind(0)  # 2 x (B, H, S, hd); unbind's backward stacks, select's would zero-fill
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Dropout(nn.Dropout):
    """Inverted dropout; on the CPU its mask comes from `torch.rand` (same
    Bernoulli(1 - p) distribution).

    On the CPU `F.dropout` draws the mask with `bernoulli_` (a slow scalar
    path) and then divides it in a separate pass: forward + backward cost
    ~2x this version.  Other devices use F.dropout's fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        mask = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p)
        return x * mask


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act = F.gelu if cfg.activation == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Residual(nn.Module):
    """x + dropout(f(LN(x))) in pre-LN mode, LN(x + dropout(f(x))) in post-LN mode."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The sublayer's input."""
        return self.norm(x) if self.norm_first else x

    def leave(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the sublayer's output y to the residual stream x."""
        return x + self.dropout(y) if self.norm_first else self.norm(x + self.dropout(y))

    def forward(self, x: torch.Tensor, f, *args, **kwargs) -> torch.Tensor:
        return self.leave(x, f(self.enter(x), *args, **kwargs))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.num_heads)
        self.ffn = FeedForward(cfg)
        self.res_attn, self.res_ffn = Residual(cfg), Residual(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.res_attn(x, self.attn, attn_mask)  # (B, S, D)
        return self.res_ffn(x, self.ffn)  # (B, S, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.num_heads)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.num_heads)
        self.ffn = FeedForward(cfg)
        self.res_self, self.res_cross, self.res_ffn = Residual(cfg), Residual(cfg), Residual(cfg)

    def forward(self, x: torch.Tensor, memory_kv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D), memory_kv (2, B, H, S, hd) -> (B, T, D); causal self-attention."""
        x = self.res_self(x, self.self_attn, is_causal=True)  # right padding: causal alone hides pads
        x = self.res_cross(x, self.cross_attn, memory_kv, attn_mask)
        return self.res_ffn(x, self.ffn)

    def step(self, x: torch.Tensor, cache: torch.Tensor, t: int, memory_kv: torch.Tensor,
             attn_mask: torch.Tensor | None, k: int) -> torch.Tensor:
        """x (N, D) with N = n_src * k; cache (2, N, capacity, H, hd) filled to t;
        memory_kv (2, n_src, H, S, hd).  -> (N, D)."""
        N, D = x.shape
        x = self.res_self.leave(x, self.self_attn.step(self.res_self.enter(x), cache, t))  # (N, D)
        x = self.res_cross(x.view(N // k, k, D), self.cross_attn, memory_kv, attn_mask).view(N, D)  # (N, D)
        return self.res_ffn(x, self.ffn)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

@dataclass
class EncoderOutput:
    memory: torch.Tensor
    """(B, S, D) encoder output."""
    attn_mask: torch.Tensor | None
    """(B, 1, 1, S) bool, True where a key may be attended; None when nothing is padded."""


@dataclass
class DecoderState:
    """Incremental-decoding state for N = n_src * k hypotheses in source groups."""

    self_kv: list[torch.Tensor]
    """Per decoder layer, the self-attention cache (2, N, capacity, H, hd), filled to `pos`."""
    cross_kv: list[torch.Tensor]
    """Per decoder layer, the cross-attention keys/values, once per source (2, n_src, H, S, hd)."""
    attn_mask: torch.Tensor | None
    """(n_src, 1, 1, S) bool source mask (True = attend) or None without padding."""
    pos: int
    """Position of the next input token (0 for bos) = number of cached positions."""
    k: int
    """Hypotheses per source group."""


def key_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor | None:
    """(B,) lengths -> (B, 1, 1, max_len) bool, True = attend; None when no row is padded.

    Returning None lets SDPA run its unmasked kernel; the check costs a host
    sync, negligible next to a forward pass.
    """
    if bool((lengths >= max_len).all()):
        return None
    return (torch.arange(max_len, device=lengths.device) < lengths[:, None])[:, None, None, :]


class TransformerSeq2Seq(Seq2SeqModel):
    """Encoder-decoder Transformer with a shared (tied) embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        D = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, D)  # source, target and output projection
        self.embed_scale = math.sqrt(D)
        self.enc_pos, self.dec_pos = Positions(cfg), Positions(cfg)
        self.dropout = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        # Pre-LN stacks end un-normalised; post-LN layers already end with a LayerNorm.
        self.enc_norm = nn.LayerNorm(D) if cfg.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(D) if cfg.norm_first else nn.Identity()
        self.apply(self._init_weights)

    @classmethod
    def position_limit(cls, cfg: ModelConfig) -> int:
        """The position table covers `max_positions` source and target positions."""
        return cfg.max_positions

    def _init_weights(self, module: nn.Module) -> None:
        """Linear and embedding weights N(0, 0.02), zero biases (as BART/GPT-2).

        A small embedding matters with tied weights: the residual stream starts
        as sqrt(D) * embedding(input), so the input token's own tied logit is
        about sqrt(D) * |e|^2 / rms(x).  With std D^-1/2 (|e| ~ 1) that is ~13
        at D=256 and the initial loss far above log V; with std 0.02 the
        initial logits are O(1) and the loss starts near log V.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    # --- training -------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (..., T) + positions (T, D) -> (..., T, D)."""
        return self.dropout(torch.add(positions, self.embed(tokens), alpha=self.embed_scale))

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOutput:
        """src (B, S) right-padded, src_lengths (B,) -> EncoderOutput with memory (B, S, D)."""
        attn_mask = key_mask(src_lengths, src.size(1))
        x = self._embed(src, self.enc_pos(0, src.size(1)))  # (B, S, D)
        for layer in self.encoder:
            x = layer(x, attn_mask)
        return EncoderOutput(self.enc_norm(x), attn_mask)

    def decode_hidden(self, tgt_in: torch.Tensor, encoded: EncoderOutput) -> torch.Tensor:
        """Teacher-forced decoder states before the output projection: (B, T) -> (B, T, D)."""
        x = self._embed(tgt_in, self.dec_pos(0, tgt_in.size(1)))  # (B, T, D)
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.memory_kv(encoded.memory), encoded.attn_mask)
        return self.dec_norm(x)

    def hidden_states(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (B, S), src_lengths (B,), tgt_in (B, T) -> final decoder states (B, T, D)."""
        return self.decode_hidden(tgt_in, self.encode(src, src_lengths))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight

    # --- incremental decoding -------------------------------------------------

    def init_state(self, encoded: EncoderOutput) -> DecoderState:
        memory = encoded.memory
        n, H, D = memory.size(0), self.config.num_heads, self.config.d_model
        cross_kv = [layer.cross_attn.memory_kv(memory).contiguous() for layer in self.decoder]  # (2, n, H, S, hd)
        self_kv = [memory.new_empty(2, n, CACHE_CAPACITY, H, D // H) for _ in self.decoder]  # (2, n, C, H, hd)
        return DecoderState(self_kv=self_kv, cross_kv=cross_kv,
                            attn_mask=encoded.attn_mask, pos=0, k=1)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """tokens (N,) -> logits (N, V) for the next token, and the advanced state."""
        t, self_kv = state.pos, state.self_kv
        if t == self_kv[0].size(2):  # full: double the capacity
            self_kv = [_resized(kv, t, 2 * t) for kv in self_kv]
        x = self._embed(tokens, self.dec_pos(t, 1))  # (N, D)
        for layer, cache, memory_kv in zip(self.decoder, self_kv, state.cross_kv):
            x = layer.step(x, cache, t, memory_kv, state.attn_mask, state.k)  # (N, D)
        logits = F.linear(self.dec_norm(x), self.embed.weight)  # (N, V)
        return logits, replace(state, self_kv=self_kv, pos=t + 1)

    def reorder_state(self, state: DecoderState, beam_indices: torch.Tensor) -> DecoderState:
        """beam_indices (n_src', k') flat rows of the old state -> state with n_src' * k' rows.

        Index-selects the self-attention caches by the flat rows and the
        per-source tensors by the old group of each new group; either copy is
        skipped when its selection is the identity (greedy, nothing finished).
        """
        rows = beam_indices.flatten()  # (n_src' * k',)
        groups = beam_indices[:, 0] // state.k  # (n_src',)
        self_kv, t = state.self_kv, state.pos
        if not _is_identity(rows, self_kv[0].size(1)):
            self_kv = [_selected_rows(kv, rows, t) for kv in self_kv]  # (2, N', capacity, H, hd)
        cross_kv, attn_mask = state.cross_kv, state.attn_mask
        if not _is_identity(groups, cross_kv[0].size(1)):
            cross_kv = [kv.index_select(1, groups) for kv in cross_kv]  # (2, n_src', H, S, hd)
            attn_mask = None if attn_mask is None else attn_mask.index_select(0, groups)
        return replace(state, self_kv=self_kv, cross_kv=cross_kv, attn_mask=attn_mask,
                       k=beam_indices.size(1))

    # --- accounting -----------------------------------------------------------

    def flops(self, src_len: int, tgt_len: int) -> FlopCount:
        """Analytic forward FLOPs (2 per multiply-add) of all matmuls, per token.

        With D = d_model, F = ffn_dim, V = vocab, S = src_len, T = tgt_len,
        L_e / L_d encoder / decoder layers:

        per source token = L_e * (8 D^2 + 4 D F + 4 S D)   # QKV+out, FFN, scores+values
                         + L_d * 4 D^2                      # cross-attention K/V projection
        per target token = L_d * (12 D^2 + 4 D F            # QKV+out, cross Q+out, FFN
                                  + 2 D (T + 1)             # causal scores+values: (T+1)/2 keys on average
                                  + 4 S D)                  # cross scores+values
                         + 2 D V                            # tied output projection

        Embedding lookups, norms, softmax and elementwise ops are not counted.
        """
        cfg = self.config
        D, Fd, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
        S, T = src_len, tgt_len
        per_src = cfg.num_encoder_layers * (8 * D * D + 4 * D * Fd + 4 * S * D) + cfg.num_decoder_layers * 4 * D * D
        per_tgt = cfg.num_decoder_layers * (12 * D * D + 4 * D * Fd + 2 * D * (T + 1) + 4 * S * D) + 2 * D * V
        return FlopCount(per_source_token=float(per_src), per_target_token=float(per_tgt))


# ----------------------------------------------------------------------------
# KV-cache buffers
# ----------------------------------------------------------------------------

def _resized(cache: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    """A cache buffer (2, N, capacity, H, hd) holding the first `filled` positions of `cache`."""
    two, N, _, H, hd = cache.shape
    new = cache.new_empty(two, N, capacity, H, hd)
    new[:, :, :filled] = cache[:, :, :filled]
    return new


def _selected_rows(cache: torch.Tensor, rows: torch.Tensor, filled: int) -> torch.Tensor:
    """Rows (N',) of a cache buffer, copying only the filled positions -> (2, N', capacity, H, hd)."""
    two, _, capacity, H, hd = cache.shape
    new = cache.new_empty(two, rows.numel(), capacity, H, hd)
    if filled:
        torch.index_select(cache[:, :, :filled], 1, rows, out=new[:, :, :filled])  # one copy, in place
    return new


def _is_identity(indices: torch.Tensor, size: int) -> bool:
    """True when `indices` selects every one of `size` rows in order."""
    return indices.numel() == size and bool(
        torch.equal(indices, torch.arange(size, device=indices.device)))


__all__ = ["TransformerSeq2Seq", "EncoderOutput", "DecoderState", "sinusoidal_table"]
