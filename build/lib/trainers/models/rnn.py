"""LSTM / GRU encoder-decoder with attention (Luong et al. 2015 style).

    src ─embed─▶ Encoder (packed, optionally bidirectional) ─▶ memory (B, S, d)
                   │ final states                                │ keys (once per source)
                   ▼                                             ▼
                 Bridge ─▶ decoder h (and c) ─▶ Decoder: RNN ─▶ h_t ─attend─▶ context
                                                 ▲                     │
    tgt ─embed─(+ previous h~ if input feeding)──┘   h~ = tanh(W_c [context; h_t])
                                                                       │
                                                    logits = h~ E^T (tied embedding)

Choices (documented here because they are the model's definition):

* **Width.** Everything is `d = d_model` wide: embeddings, each encoder
  direction, the decoder, the memory and the attentional vector h~.  A
  bidirectional encoder's (B, S, 2d) outputs are projected to d by a Linear.
* **Output projection.** W_c maps [context; h_t] (2d) to d, so h~ is already
  as wide as the embedding and the tied output layer uses it directly
  (`logits = h~ @ E^T`, no bias, no extra projection).
* **Bridge.** Decoder layer j starts from encoder layer
  `max(0, j + L_enc - L_dec)`: the stacks are aligned at the top (the top
  decoder layer starts from the top encoder layer); with more decoder than
  encoder layers the extra bottom layers all start from encoder layer 0.
  Per decoder layer a learned map takes the concatenated directions
  (dirs*d -> d): h_j = tanh(W_j [h_fwd; h_bwd] + b_j); for an LSTM also
  c_j = U_j [c_fwd; c_bwd] + u_j (no tanh: cell values are not bounded).
* **Attention query** is the top decoder layer's output of the current step
  (Luong), for all three score functions (`additive` is Bahdanau's score,
  not his previous-state query).
* **Dropout** on the source and target embeddings, between stacked RNN layers
  (nn.LSTM / nn.GRU `dropout`) and on h~ (before the output layer and the
  input feed).

One code path serves training and decoding: `Decoder.forward` advances
(N, T) queries from a state.  `step` calls it with T=1; `forward` calls it
once with the whole target when input feeding is off (nn.LSTM over T steps is
the same recurrence as T calls with T=1) and once per step when it is on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .attention import Attention
from .base import FlopCount, Seq2SeqModel, group_rows, padding_mask
from .config import PAD_ID, ModelConfig

RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU}
GATES = {"lstm": 4, "gru": 3}


@dataclass
class RNNEncoded:
    """What `encode` returns: per source, before the bridge."""

    memory: torch.Tensor  # (B, S, d) encoder outputs, projected to d_model
    src_mask: torch.Tensor  # (B, S) bool, True at padding
    final: tuple[torch.Tensor, ...]  # (h_n,) or (h_n, c_n), each (L_enc * dirs, B, d)


@dataclass
class RNNState:
    """Decoder state.  Per hypothesis (N = n_src * k rows): `hidden`, `feed`.
    Per source (n_src rows, shared by its k hypotheses): `memory`, `keys`, `src_mask`."""

    hidden: tuple[torch.Tensor, ...]  # (h,) or (h, c), each (L_dec, N, d)
    feed: Optional[torch.Tensor]  # (N, d) previous h~ (zeros before bos); None without input feeding
    memory: torch.Tensor  # (n_src, S, d)
    keys: torch.Tensor  # (n_src, S, d); `memory` itself for dot attention
    src_mask: torch.Tensor  # (n_src, S) bool, True at padding

    @property
    def group_size(self) -> int:
        """k: hypotheses per source."""
        return self.hidden[0].size(1) // self.memory.size(0)


def _rnn(cfg: ModelConfig, input_size: int, num_layers: int, bidirectional: bool = False) -> nn.RNNBase:
    return RNN_CLASSES[cfg.arch](input_size, cfg.d_model, num_layers=num_layers, batch_first=True,
                                 dropout=cfg.dropout if num_layers > 1 else 0.0,
                                 bidirectional=bidirectional)


def _as_tuple(state: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


class Encoder(nn.Module):
    """Stacked (bi)RNN over packed sequences; outputs projected to d_model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, bi = cfg.d_model, cfg.bidirectional_encoder
        self.rnn = _rnn(cfg, d, cfg.num_encoder_layers, bidirectional=bi)
        self.proj = nn.Linear(2 * d, d) if bi else nn.Identity()

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """emb (B, S, d), lengths (B,) >= 1 -> memory (B, S, d), final states."""
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.size(1))  # (B, S, dirs*d)
        return self.proj(out), _as_tuple(final)


class Bridge(nn.Module):
    """Encoder final states -> initial decoder states (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, L_enc, L_dec = cfg.d_model, cfg.num_encoder_layers, cfg.num_decoder_layers
        self.dirs = 2 if cfg.bidirectional_encoder else 1
        self.source_layers = [max(0, j + L_enc - L_dec) for j in range(L_dec)]
        n_states = 2 if cfg.arch == "lstm" else 1  # (h, c) or (h,)
        self.maps = nn.ModuleList(
            nn.ModuleList(nn.Linear(self.dirs * d, d) for _ in range(L_dec)) for _ in range(n_states))

    def forward(self, final: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(h_n[, c_n]) each (L_enc * dirs, B, d) -> (h[, c]) each (L_dec, B, d)."""
        out = []
        for i, (state, maps) in enumerate(zip(final, self.maps)):
            n, B, d = state.shape
            state = state.view(n // self.dirs, self.dirs, B, d).transpose(1, 2)  # (L_enc, B, dirs, d)
            state = state.reshape(n // self.dirs, B, self.dirs * d)  # (L_enc, B, dirs*d)
            layers = torch.stack([m(state[s]) for m, s in zip(maps, self.source_layers)])  # (L_dec, B, d)
            out.append(torch.tanh(layers) if i == 0 else layers)  # tanh for h only
        return tuple(out)


class Decoder(nn.Module):
    """Stacked unidirectional RNN + attention + attentional vector h~."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.input_feeding = cfg.input_feeding
        self.rnn = _rnn(cfg, 2 * d if cfg.input_feeding else d, cfg.num_decoder_layers)
        self.attention = Attention(cfg.attention, d)
        self.combine = nn.Linear(2 * d, d, bias=False)  # W_c
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, emb: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """emb (N, T, d) target embeddings (T = 1 with input feeding) -> h~ (N, T, d), new state."""
        N, T, d = emb.shape
        x = emb
        if self.input_feeding:
            assert T == 1, "input feeding advances one step at a time"
            x = torch.cat([emb, state.feed.unsqueeze(1)], dim=-1)  # (N, 1, 2d)
        hx = state.hidden if len(state.hidden) == 2 else state.hidden[0]
        h_top, hidden = self.rnn(x, hx)  # (N, T, d)
        n_src = state.memory.size(0)
        query = h_top.reshape(n_src, -1, d)  # (n_src, k*T, d): a source's beams share its memory
        context = self.attention(query, state.memory, state.keys, state.src_mask)  # (n_src, k*T, d)
        att = torch.tanh(self.combine(torch.cat([context, query], dim=-1)))  # (n_src, k*T, d)
        att = self.dropout(att).view(N, T, d)  # (N, T, d)
        feed = att[:, -1] if self.input_feeding else None
        return att, replace(state, hidden=_as_tuple(hidden), feed=feed)


class RNNSeq2Seq(Seq2SeqModel):
    """LSTM or GRU encoder-decoder with attention; `cfg.arch` in {"lstm", "gru"}."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch not in RNN_CLASSES:
            raise ValueError(f"model.arch: RNNSeq2Seq needs 'lstm' or 'gru', got {cfg.arch!r}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg)
        self.bridge = Bridge(cfg)
        self.decoder = Decoder(cfg)
        # Tied weights serve as input and output layer: scale like fairseq (std d^-1/2).
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()

    # --- training ------------------------------------------------------------
    def hidden_states(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (B, S), src_lengths (B,), tgt_in (B, T) -> attentional vectors h~ (B, T, d)."""
        state = self.init_state(self.encode(src, src_lengths))
        emb = self.dropout(self.embed(tgt_in))  # (B, T, d)
        if not self.config.input_feeding:
            att, _ = self.decoder(emb, state)  # (B, T, d)
        else:
            steps = []
            for t in range(emb.size(1)):
                att_t, state = self.decoder(emb[:, t:t + 1], state)  # (B, 1, d)
                steps.append(att_t)
            att = torch.cat(steps, dim=1)  # (B, T, d)
        return att

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight

    def output(self, att: torch.Tensor) -> torch.Tensor:
        """(..., d) attentional vectors -> (..., V) logits through the tied embedding."""
        return F.linear(att, self.embed.weight)

    # --- incremental decoding ------------------------------------------------
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> RNNEncoded:
        emb = self.dropout(self.embed(src))  # (B, S, d)
        memory, final = self.encoder(emb, src_lengths)  # (B, S, d)
        return RNNEncoded(memory=memory, src_mask=padding_mask(src_lengths, src.size(1)), final=final)

    def init_state(self, encoded: RNNEncoded) -> RNNState:
        hidden = self.bridge(encoded.final)  # each (L_dec, B, d)
        B, d = encoded.memory.size(0), self.config.d_model
        feed = encoded.memory.new_zeros(B, d) if self.config.input_feeding else None
        return RNNState(hidden=hidden, feed=feed, memory=encoded.memory,
                        keys=self.decoder.attention.keys(encoded.memory), src_mask=encoded.src_mask)

    def step(self, tokens: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        emb = self.dropout(self.embed(tokens.unsqueeze(1)))  # (N, 1, d)
        att, state = self.decoder(emb, state)  # (N, 1, d)
        return self.output(att.squeeze(1)), state  # (N, V)

    def reorder_state(self, state: RNNState, beam_indices: torch.Tensor) -> RNNState:
        rows = beam_indices.reshape(-1)  # (n_src' * k',)
        groups = group_rows(beam_indices, state.group_size)  # (n_src',)
        memory = state.memory.index_select(0, groups)
        keys = memory if state.keys is state.memory else state.keys.index_select(0, groups)
        return RNNState(
            hidden=tuple(h.index_select(1, rows) for h in state.hidden),
            feed=None if state.feed is None else state.feed.index_select(0, rows),
            memory=memory, keys=keys, src_mask=state.src_mask.index_select(0, groups))

    # --- accounting ----------------------------------------------------------
    def flops(self, src_len: int, tgt_len: int) -> FlopCount:
        """Forward FLOPs per token, counting 2 per multiply-add of every matmul.

        Per source token: each encoder layer and direction costs
        2*G*(in + d)*d (G = 4 gates for LSTM, 3 for GRU; in = d for layer 0,
        dirs*d above), plus the bidirectional output projection 2*(2d)*d and,
        for `general` / `additive`, the keys' projection 2*d*d.
        Per target token: each decoder layer 2*G*(in + d)*d (in = 2d for layer
        0 with input feeding), attention scores and context 2*2*S*d (S =
        src_len; `additive` adds the query projection 2*d*d, and its v^T
        product is the 2*S*d of the scores), W_c 2*(2d)*d and the output
        projection 2*d*V.  Biases, gate nonlinearities, tanh, softmax, the
        embedding lookup and the once-per-sequence bridge are left out.
        `tgt_len` does not enter: an RNN step costs the same at every position.
        """
        cfg, d = self.config, self.config.d_model
        G, dirs = GATES[cfg.arch], (2 if cfg.bidirectional_encoder else 1)
        src = sum(dirs * 2 * G * ((d if i == 0 else dirs * d) + d) * d for i in range(cfg.num_encoder_layers))
        src += 2 * 2 * d * d if dirs == 2 else 0
        src += 2 * d * d if cfg.attention != "dot" else 0
        dec_in0 = 2 * d if cfg.input_feeding else d
        tgt = sum(2 * G * ((dec_in0 if i == 0 else d) + d) * d for i in range(cfg.num_decoder_layers))
        tgt += 2 * 2 * src_len * d + (2 * d * d if cfg.attention == "additive" else 0)
        tgt += 2 * 2 * d * d + 2 * d * cfg.vocab_size
        return FlopCount(per_source_token=float(src), per_target_token=float(tgt))


__all__ = ["RNNSeq2Seq", "RNNEncoded", "RNNState"]
