"""LSTM / GRU Seq2Seq: incremental decoding, parity with textbook references,
score, padding invariance, FLOPs and parameter counts (tiny CPU models)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.models import ModelConfig, build_model
from trainers.models.rnn import RNNSeq2Seq

V, D = 50, 32
ATTENTIONS = ("dot", "general", "additive")


def make_model(arch="lstm", attention="general", input_feeding=True, bidirectional=True,
               enc_layers=2, dec_layers=2, dropout=0.0, seed=0) -> RNNSeq2Seq:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=V, d_model=D, num_encoder_layers=enc_layers,
                      num_decoder_layers=dec_layers, dropout=dropout, attention=attention,
                      input_feeding=input_feeding, bidirectional_encoder=bidirectional)
    return build_model(cfg).eval()


def make_batch(lengths=(7, 4, 5), tgt_len=6, seed=1):
    """Right-padded sources (B, S) and bos-started targets (B, T), no pads in tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    src = torch.randint(4, V, (len(lengths), int(lengths.max())), generator=g)
    src = src.masked_fill(torch.arange(src.size(1))[None, :] >= lengths[:, None], 0)
    tgt_in = torch.randint(4, V, (len(lengths), tgt_len), generator=g)
    tgt_in[:, 0] = 1
    return src, lengths, tgt_in


# --- incremental decoding == teacher forcing ---------------------------------

@pytest.mark.parametrize("arch,attention,input_feeding,bidirectional",
                         list(itertools.product(("lstm", "gru"), ATTENTIONS, (True, False), (True, False))))
@torch.no_grad()
def test_incremental_matches_forward_through_reorders(arch, attention, input_feeding, bidirectional):
    model = make_model(arch, attention, input_feeding, bidirectional)
    src, lengths, _ = make_batch()
    g = torch.Generator().manual_seed(2)
    state = model.init_state(model.encode(src, lengths))
    tokens = torch.ones(3, dtype=torch.long)  # bos
    history = tokens[:, None]  # (N, t) tokens fed so far
    logps = []  # per step (N, V)

    def advance(state, tokens, history, logps):
        logits, state = model.step(tokens, state)
        logps = logps + [F.log_softmax(logits, -1)]
        new = torch.randint(4, V, (tokens.size(0),), generator=g)
        return state, new, torch.cat([history, new[:, None]], 1), logps

    state, tokens, history, logps = advance(state, tokens, history, logps)
    # Expand to k=3 beams, then permute beams (with a duplicate) and drop source 1.
    for beam_indices in (torch.arange(3)[:, None].expand(3, 3), torch.tensor([[2, 0, 0], [8, 6, 7]])):
        state = model.reorder_state(state, beam_indices)
        rows = beam_indices.reshape(-1)
        tokens, history = tokens[rows], history[rows]
        logps = [lp[rows] for lp in logps]
        state, tokens, history, logps = advance(state, tokens, history, logps)
        state, tokens, history, logps = advance(state, tokens, history, logps)

    assert state.memory.size(0) == 2 and state.group_size == 3  # memory kept once per source
    sources = torch.tensor([0, 0, 0, 2, 2, 2])
    ref = F.log_softmax(model(src[sources], lengths[sources], history[:, :-1]), -1)  # (N, T, V)
    torch.testing.assert_close(torch.stack(logps, 1), ref, atol=1e-5, rtol=0)


# --- parity with references --------------------------------------------------

@pytest.mark.parametrize("arch,bidirectional", list(itertools.product(("lstm", "gru"), (True, False))))
@torch.no_grad()
def test_packed_encoder_matches_plain_rnn_per_sequence(arch, bidirectional):
    model = make_model(arch, bidirectional=bidirectional, enc_layers=3)
    src, lengths, _ = make_batch(lengths=(3, 7, 1, 5))
    plain = type(model.encoder.rnn)(D, D, num_layers=3, batch_first=True, bidirectional=bidirectional)
    plain.load_state_dict(model.encoder.rnn.state_dict())
    enc = model.encode(src, lengths)
    for b, n in enumerate(lengths.tolist()):
        out, final = plain(model.embed(src[b:b + 1, :n]))  # (1, n, dirs*d), unpadded
        torch.testing.assert_close(enc.memory[b:b + 1, :n], model.encoder.proj(out), atol=1e-6, rtol=0)
        for mine, ref in zip(enc.final, final if isinstance(final, tuple) else (final,)):
            torch.testing.assert_close(mine[:, b], ref[:, 0], atol=1e-6, rtol=0)
    assert enc.src_mask.tolist() == (torch.arange(7)[None, :] >= lengths[:, None]).tolist()


def reference_logits(model: RNNSeq2Seq, src, lengths, tgt_in):
    """A textbook loop, one source at a time: nn.LSTMCell / nn.GRUCell decoder with
    weights copied from the model, attention written from the formulas."""
    cfg, att = model.config, model.decoder.attention
    dirs, L_enc, L_dec = 2 if cfg.bidirectional_encoder else 1, cfg.num_encoder_layers, cfg.num_decoder_layers
    cell_cls = nn.LSTMCell if cfg.arch == "lstm" else nn.GRUCell
    cells = []
    for j in range(L_dec):
        cell = cell_cls(2 * D if (j == 0 and cfg.input_feeding) else D, D)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data.copy_(getattr(model.decoder.rnn, f"{name}_l{j}"))
        cells.append(cell)
    out = []
    for b, n in enumerate(lengths.tolist()):
        enc_out, final = model.encoder.rnn(model.embed(src[b:b + 1, :n]))
        memory = model.encoder.proj(enc_out)[0]  # (n, d)
        final = final if isinstance(final, tuple) else (final,)
        states = []  # per kind (h, c): list over decoder layers of (1, d)
        for kind, maps in enumerate(model.bridge.maps):
            layers = []
            for j in range(L_dec):
                s = max(0, j + L_enc - L_dec)
                x = maps[j](torch.cat([final[kind][s * dirs + r] for r in range(dirs)], -1))
                layers.append(torch.tanh(x) if kind == 0 else x)
            states.append(layers)
        feed, logits = torch.zeros(1, D), []
        for t in range(tgt_in.size(1)):
            x = model.embed(tgt_in[b:b + 1, t])  # (1, d)
            if cfg.input_feeding:
                x = torch.cat([x, feed], -1)
            for j, cell in enumerate(cells):
                if cfg.arch == "lstm":
                    states[0][j], states[1][j] = cell(x, (states[0][j], states[1][j]))
                else:
                    states[0][j] = cell(x, states[0][j])
                x = states[0][j]
            q = x[0]  # (d,)
            scores = []
            for m in memory:
                if cfg.attention == "dot":
                    scores.append(q @ m)
                elif cfg.attention == "general":
                    scores.append(q @ att.w_k.weight @ m)
                else:
                    hid = torch.tanh(att.w_q.weight @ q + att.w_k.weight @ m + att.w_k.bias)
                    scores.append(att.v.weight[0] @ hid)
            context = torch.softmax(torch.stack(scores), 0) @ memory  # (d,)
            feed = torch.tanh(model.decoder.combine.weight @ torch.cat([context, q]))[None]  # (1, d)
            logits.append(model.embed.weight @ feed[0])  # tied output layer
        out.append(torch.stack(logits))
    return torch.stack(out)  # (B, T, V)


@pytest.mark.parametrize("arch,attention", list(itertools.product(("lstm", "gru"), ATTENTIONS)))
@pytest.mark.parametrize("input_feeding,bidirectional,layers",
                         [(True, True, (2, 2)), (False, False, (3, 2)), (True, False, (1, 3))])
@torch.no_grad()
def test_forward_matches_textbook_reference(arch, attention, input_feeding, bidirectional, layers):
    model = make_model(arch, attention, input_feeding, bidirectional, *layers)
    src, lengths, tgt_in = make_batch(lengths=(5, 2), tgt_len=4)
    ref = reference_logits(model, src, lengths, tgt_in)
    torch.testing.assert_close(model(src, lengths, tgt_in), ref, atol=1e-5, rtol=1e-5)


# --- score, invariance -------------------------------------------------------

def test_score_equals_hand_sum_of_step_log_probs():
    model = make_model("gru", "additive", dropout=0.3).train()  # score must switch to eval itself
    src, lengths, tgt_in = make_batch()
    tgt = torch.cat([tgt_in[:, 1:], torch.full((3, 1), 2)], 1)  # (B, T): no bos, eos last
    tgt_lengths = torch.tensor([6, 3, 5])
    tgt = tgt.masked_fill(torch.arange(6)[None, :] >= tgt_lengths[:, None], 0)
    tgt[1, 2], tgt[2, 4] = 2, 2  # eos ends every target
    scores = model.score(src, lengths, tgt, tgt_lengths)
    assert model.training and scores.dtype == torch.float32 and scores.shape == (3,)
    model.eval()
    with torch.no_grad():
        state = model.init_state(model.encode(src, lengths))
        prev, expected = torch.ones(3, dtype=torch.long), torch.zeros(3)
        for t in range(6):
            logits, state = model.step(prev, state)
            lp = F.log_softmax(logits, -1)[torch.arange(3), tgt[:, t]]
            expected += torch.where(t < tgt_lengths, lp, torch.zeros(3))
            prev = tgt[:, t]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,input_feeding", [("lstm", True), ("gru", False)])
@torch.no_grad()
def test_logits_do_not_depend_on_padding_or_batch(arch, input_feeding):
    model = make_model(arch, "additive", input_feeding)
    src, lengths, tgt_in = make_batch()
    full = model(src, lengths, tgt_in)
    for b in range(3):
        n = int(lengths[b])
        alone = model(src[b:b + 1, :n], lengths[b:b + 1], tgt_in[b:b + 1])
        torch.testing.assert_close(full[b:b + 1], alone, atol=1e-5, rtol=0)
    padded_src = F.pad(src, (0, 4))  # extra source padding
    padded_tgt = F.pad(tgt_in, (0, 3))  # extra target padding
    torch.testing.assert_close(model(padded_src, lengths, padded_tgt)[:, :6], full, atol=1e-5, rtol=0)


def test_dot_attention_shares_memory_as_keys_through_reorder():
    model = make_model("lstm", "dot")
    src, lengths, _ = make_batch()
    state = model.init_state(model.encode(src, lengths))
    state = model.reorder_state(state, torch.tensor([[0, 0], [2, 2]]))
    assert state.keys is state.memory and state.memory.shape == (2, 7, D)
    assert state.hidden[0].shape == (2, 4, D) and state.feed.shape == (4, D)


def test_training_step_reaches_every_parameter():
    model = make_model("lstm", "additive", dropout=0.1).train()
    src, lengths, tgt_in = make_batch()
    model(src, lengths, tgt_in).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_rejects_transformer_config():
    with pytest.raises(ValueError, match="model.arch"):
        RNNSeq2Seq(ModelConfig(arch="transformer", vocab_size=V, d_model=D, num_heads=4))


# --- accounting --------------------------------------------------------------

def test_flops_hand_counted():
    # lstm, general, bidirectional, input feeding; d=32, 2+2 layers, V=50, S=7.
    flops = make_model("lstm", "general", True, True).flops(src_len=7, tgt_len=5)
    enc = (2 * (2 * 4 * (32 + 32) * 32)  # layer 0, both directions
           + 2 * (2 * 4 * (64 + 32) * 32)  # layer 1 reads 2d
           + 2 * 64 * 32  # bidirectional projection
           + 2 * 32 * 32)  # general keys W_a m
    dec = (2 * 4 * (64 + 32) * 32  # layer 0 reads [emb; feed]
           + 2 * 4 * (32 + 32) * 32  # layer 1
           + 2 * 2 * 7 * 32  # scores + context over S=7
           + 2 * 64 * 32  # W_c
           + 2 * 32 * 50)  # output projection
    assert (flops.per_source_token, flops.per_target_token) == (enc, dec) == (88064, 49152)
    # gru, additive, unidirectional, no feeding: 3 gates, W_q, no projection.
    flops = make_model("gru", "additive", False, False).flops(src_len=7, tgt_len=5)
    assert flops.per_source_token == 2 * (2 * 3 * 64 * 32) + 2 * 32 * 32
    assert flops.per_target_token == 2 * (2 * 3 * 64 * 32) + 2 * 2 * 7 * 32 + 2 * 32 * 32 + 4096 + 3200


def test_parameter_count_by_hand():
    # lstm, general, bidirectional, input feeding; d=32, 2+2 layers, V=50.
    lstm = lambda i, h: 4 * h * i + 4 * h * h + 2 * 4 * h  # noqa: E731  (nn.LSTM layer, one direction)
    expected = (50 * 32  # shared embedding, counted once (tied output layer)
                + 2 * lstm(32, 32) + 2 * lstm(64, 32) + (64 * 32 + 32)  # encoder + projection
                + 2 * 2 * (64 * 32 + 32)  # bridge: (h, c) x 2 decoder layers
                + lstm(64, 32) + lstm(32, 32)  # decoder
                + 32 * 32 + 64 * 32)  # W_a, W_c
    model = make_model("lstm", "general", True, True)
    assert model.num_parameters() == expected == 78048
    assert [n for n, p in model.named_parameters() if p.shape == (V, D)] == ["embed.weight"]
