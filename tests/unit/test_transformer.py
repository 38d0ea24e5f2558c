"""Fast CPU tests of the Transformer encoder-decoder on tiny configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainers.models import ModelConfig, build_model
from trainers.models.losses import linear_cross_entropy
from trainers.models.transformer import CACHE_CAPACITY, Dropout, TransformerSeq2Seq

V, D, H, FFN = 50, 32, 4, 64
ATOL = 1e-5


def tiny(**overrides) -> TransformerSeq2Seq:
    cfg = ModelConfig(arch="transformer", vocab_size=V, d_model=D, num_encoder_layers=2,
                      num_decoder_layers=2, num_heads=H, ffn_dim=FFN, max_positions=64, **overrides)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def batch(lengths: list[int], tgt_len: int = 6, seed: int = 1):
    """Right-padded random sources with the given lengths and a bos-led target input."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (len(lengths), max(lengths)), generator=g)
    lens = torch.tensor(lengths)
    src[torch.arange(src.size(1))[None, :] >= lens[:, None]] = 0
    tgt_in = torch.randint(4, V, (len(lengths), tgt_len), generator=g)
    tgt_in[:, 0] = 1
    return src, lens, tgt_in


VARIANTS = [dict(norm_first=nf, positions=p) for nf in (True, False) for p in ("sinusoidal", "learned")]
IDS = [f"{'pre' if v['norm_first'] else 'post'}-{v['positions']}" for v in VARIANTS]


# ----------------------------------------------------------------------------
# Incremental decoding == teacher forcing
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@torch.no_grad()
def test_step_matches_forward(variant):
    model = tiny(**variant)
    src, lens, tgt_in = batch([7, 5, 3])
    full = model(src, lens, tgt_in).log_softmax(-1)  # (B, T, V)
    state = model.init_state(model.encode(src, lens))
    for t in range(tgt_in.size(1)):
        logits, state = model.step(tgt_in[:, t], state)
        torch.testing.assert_close(logits.log_softmax(-1), full[:, t], atol=ATOL, rtol=0)
    assert state.pos == tgt_in.size(1)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@torch.no_grad()
def test_step_matches_forward_after_reorder(variant):
    """Expand to k=3 beams, step, then permute/duplicate beams, shrink to k=2 and
    drop a source; every hypothesis must still match teacher forcing on its history."""
    model = tiny(**variant)
    src, lens, _ = batch([6, 4, 5])
    g = torch.Generator().manual_seed(3)
    state = model.init_state(model.encode(src, lens))
    history = [[1] for _ in range(3)]  # token inputs of each row
    owner = [0, 1, 2]  # source of each row
    logps: list[list[torch.Tensor]] = [[] for _ in range(3)]

    def advance(n_steps):
        nonlocal state
        for _ in range(n_steps):
            logits, state = model.step(torch.tensor([h[-1] for h in history]), state)
            for row, lp in enumerate(logits.log_softmax(-1)):
                logps[row].append(lp)
                history[row].append(int(torch.randint(4, V, (1,), generator=g)))

    def reorder(beam_indices):
        nonlocal state, history, owner, logps
        state = model.reorder_state(state, beam_indices)
        rows = beam_indices.flatten().tolist()
        history = [list(history[r]) for r in rows]
        owner = [owner[r] for r in rows]
        logps = [list(logps[r]) for r in rows]

    advance(1)
    reorder(torch.arange(3)[:, None].expand(3, 3))  # k = 3
    advance(2)
    reorder(torch.tensor([[8, 6], [1, 1]]))  # source 2 (reversed), source 0 (duplicated); source 1 dropped
    assert state.k == 2
    advance(2)
    for row, src_id in enumerate(owner):
        tgt_in = torch.tensor([history[row][:-1]])
        full = model(src[src_id:src_id + 1], lens[src_id:src_id + 1], tgt_in).log_softmax(-1)[0]  # (T, V)
        torch.testing.assert_close(torch.stack(logps[row]), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_step_matches_forward_past_cache_capacity():
    """The preallocated self-attention cache grows (and is reordered) correctly."""
    model = tiny()
    T = CACHE_CAPACITY + 6
    src, lens, tgt_in = batch([5, 3], tgt_len=T)
    full = model(src, lens, tgt_in).log_softmax(-1)  # (B, T, V)
    state = model.init_state(model.encode(src, lens))
    for t in range(T):
        if t == CACHE_CAPACITY + 2:  # swap the two sources after the cache has grown
            state = model.reorder_state(state, torch.tensor([[1], [0]]))
            src, lens, tgt_in, full = src.flip(0), lens.flip(0), tgt_in.flip(0), full.flip(0)
        logits, state = model.step(tgt_in[:, t], state)
        torch.testing.assert_close(logits.log_softmax(-1), full[:, t], atol=ATOL, rtol=0)


@torch.no_grad()
def test_reorder_keeps_cross_attention_per_source():
    model = tiny()
    src, lens, _ = batch([5, 3])
    state = model.init_state(model.encode(src, lens))
    state = model.reorder_state(state, torch.arange(2)[:, None].expand(2, 5))
    _, state = model.step(torch.ones(10, dtype=torch.long), state)
    assert state.self_kv[0].shape[:2] == (2, 10)  # per hypothesis
    assert state.cross_kv[0].shape[:2] == (2, 2)  # per source, never per beam
    state = model.reorder_state(state, torch.tensor([[9, 5]]))  # keep source 1 only
    assert state.cross_kv[0].size(1) == 1 and state.attn_mask.size(0) == 1 and state.k == 2


# ----------------------------------------------------------------------------
# score(), padding, tying
# ----------------------------------------------------------------------------

@torch.no_grad()
def test_score_equals_hand_computation():
    model = tiny()
    src, lens, _ = batch([6, 4])
    tgt = torch.tensor([[7, 8, 9, 2], [5, 2, 0, 0]])
    tgt_lens = torch.tensor([4, 2])
    expected = []
    for b in range(2):
        n = int(tgt_lens[b])
        tgt_in = torch.tensor([[1] + tgt[b, :n - 1].tolist()])
        logp = model(src[b:b + 1, :lens[b]], lens[b:b + 1], tgt_in).log_softmax(-1)[0]  # (n, V)
        expected.append(sum(float(logp[t, tgt[b, t]]) for t in range(n)))
    got = model.score(src, lens, tgt, tgt_lens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=IDS[:2])
@torch.no_grad()
def test_padding_invariance(variant):
    model = tiny(**variant)
    src, lens, tgt_in = batch([4], tgt_len=5)
    ref = model(src, lens, tgt_in)
    padded = F.pad(src, (0, 5))  # more padding columns
    torch.testing.assert_close(model(padded, lens, tgt_in), ref, atol=ATOL, rtol=0)
    long_src, long_lens, _ = batch([9], seed=7)  # batched with a longer source
    both = torch.cat([F.pad(src, (0, 5)), long_src])
    out = model(both, torch.cat([lens, long_lens]), torch.cat([tgt_in, tgt_in]))
    torch.testing.assert_close(out[:1], ref, atol=ATOL, rtol=0)


def test_embedding_is_shared():
    model = tiny()
    vocab_matrices = [p for p in model.parameters() if p.shape == (V, D)]
    assert len(vocab_matrices) == 1 and vocab_matrices[0] is model.embed.weight
    src, lens, tgt_in = batch([5, 3])
    with torch.no_grad():
        hidden = model.decode_hidden(tgt_in, model.encode(src, lens))
        torch.testing.assert_close(model(src, lens, tgt_in), hidden @ model.embed.weight.T)
    model(src, lens, tgt_in).sum().backward()  # the output projection reaches the embedding
    assert model.embed.weight.grad[V - 1].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_fused_loss_matches_cross_entropy(chunk_size):
    """linear_cross_entropy: same value and gradients as projection + F.cross_entropy,
    with padded labels ignored."""
    model = tiny(dropout=0.0)
    src, lens, tgt_in = batch([6, 4], tgt_len=5)
    labels = torch.randint(4, V, tgt_in.shape)
    labels[1, 3:] = 0  # padding
    params = [p for p in model.parameters()]

    logits = model(src, lens, tgt_in)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=0)
    ref_grads = torch.autograd.grad(2 * ref, params)
    hidden = model.decode_hidden(tgt_in, model.encode(src, lens)).flatten(0, 1)
    got = linear_cross_entropy(hidden, model.embed.weight, labels.flatten(), chunk_size=chunk_size)
    got_grads = torch.autograd.grad(2 * got, params)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(src, lens, tgt_in, labels=labels), ref, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(src, lens, tgt_in, labels=labels), ref, atol=1e-6, rtol=1e-6)


def test_cpu_dropout_is_inverted_bernoulli():
    drop = Dropout(0.25)
    x = torch.ones(200, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient = mask / (1 - p)
    assert drop.eval()(x) is x


def test_initial_loss_near_uniform():
    cfg = ModelConfig(vocab_size=2000, d_model=256, num_encoder_layers=1, num_decoder_layers=1,
                      num_heads=4, ffn_dim=256)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    src = torch.randint(4, 2000, (4, 10))
    tgt_in, labels = torch.randint(4, 2000, (2, 4, 10))
    with torch.no_grad():
        loss = F.cross_entropy(model(src, torch.full((4,), 10), tgt_in).flatten(0, 1), labels.flatten())
    assert abs(float(loss) - math.log(2000)) < 0.5


def test_positions_beyond_table_raise():
    model = tiny()
    src = torch.randint(4, V, (1, 65))
    with pytest.raises(ValueError, match="max_positions"):
        model.encode(src, torch.tensor([65]))


# ----------------------------------------------------------------------------
# Parameter and FLOP accounting
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_parameter_count_closed_form(variant):
    model = tiny(**variant)
    enc_layer = 4 * D * D + 4 * D + 2 * D * FFN + FFN + D + 2 * 2 * D  # attn, ffn, 2 norms
    dec_layer = 8 * D * D + 8 * D + 2 * D * FFN + FFN + D + 3 * 2 * D  # self+cross, ffn, 3 norms
    expected = V * D + 2 * enc_layer + 2 * dec_layer
    expected += 2 * 64 * D if variant["positions"] == "learned" else 0  # one table per stack
    expected += 2 * 2 * D if variant["norm_first"] else 0  # final norms
    assert model.num_parameters() == expected


def test_flops_hand_count():
    flops = tiny().flops(src_len=7, tgt_len=5)
    per_src = 2 * (8 * D * D + 4 * D * FFN + 4 * 7 * D) + 2 * 4 * D * D
    per_tgt = 2 * (12 * D * D + 4 * D * FFN + 2 * D * 6 + 4 * 7 * D) + 2 * D * V
    assert (per_src, per_tgt) == (42752, 46720)
    assert flops.per_source_token == per_src and flops.per_target_token == per_tgt
    assert flops.training(14, 10) == 3 * (14 * per_src + 10 * per_tgt)


def test_flops_projections_match_flop_counter():
    """torch's FlopCounterMode counts every linear layer (not CPU attention):
    our total minus the attention terms must equal its count exactly."""
    model = tiny()
    B, S, T = 2, 7, 5
    src, lens, tgt_in = batch([S] * B, tgt_len=T)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(src, lens, tgt_in)
    attention = B * S * 2 * 4 * S * D + B * T * 2 * (2 * D * (T + 1) + 4 * S * D)
    assert model.flops(S, T).forward(B * S, B * T) - attention == counter.get_total_flops()


def test_flops_scale_with_length():
    model = tiny()
    base = model.flops(10, 10)
    longer_src, longer_tgt = model.flops(20, 10), model.flops(10, 20)
    L = 2
    assert longer_src.per_source_token - base.per_source_token == L * 4 * 10 * D
    assert longer_src.per_target_token - base.per_target_token == L * 4 * 10 * D
    assert longer_tgt.per_target_token - base.per_target_token == L * 2 * 10 * D
    assert longer_tgt.per_source_token == base.per_source_token


# ----------------------------------------------------------------------------
# Parity with torch.nn reference layers
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_layer_parity_with_torch(norm_first, activation):
    model = tiny(norm_first=norm_first, dropout=0.0, activation=activation)
    ours = model.encoder[0]
    ref = nn.TransformerEncoderLayer(D, H, FFN, dropout=0.0, activation=activation,
                                     batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(ours.attn.out.state_dict())
        ref.linear1.load_state_dict(ours.ffn.fc1.state_dict())
        ref.linear2.load_state_dict(ours.ffn.fc2.state_dict())
        ref.norm1.load_state_dict(ours.res_attn.norm.state_dict())
        ref.norm2.load_state_dict(ours.res_ffn.norm.state_dict())
    x = torch.randn(2, 6, D)
    lens = torch.tensor([6, 4])
    pad = torch.arange(6)[None, :] >= lens[:, None]  # (B, S) True = pad
    ours.train(), ref.train()  # dropout 0; avoids torch's nested-tensor fast path
    expected = ref(x, src_key_padding_mask=pad)
    got = ours(x, (~pad)[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_parity_with_torch(norm_first):
    model = tiny(norm_first=norm_first, dropout=0.0)
    ours = model.decoder[0]
    ref = nn.TransformerDecoderLayer(D, H, FFN, dropout=0.0, activation="gelu",
                                     batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.self_attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.self_attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(ours.self_attn.out.state_dict())
        ref.multihead_attn.in_proj_weight.copy_(torch.cat([ours.cross_attn.q.weight, ours.cross_attn.kv.weight]))
        ref.multihead_attn.in_proj_bias.copy_(torch.cat([ours.cross_attn.q.bias, ours.cross_attn.kv.bias]))
        ref.multihead_attn.out_proj.load_state_dict(ours.cross_attn.out.state_dict())
        ref.linear1.load_state_dict(ours.ffn.fc1.state_dict())
        ref.linear2.load_state_dict(ours.ffn.fc2.state_dict())
        for ref_norm, res in zip((ref.norm1, ref.norm2, ref.norm3), (ours.res_self, ours.res_cross, ours.res_ffn)):
            ref_norm.load_state_dict(res.norm.state_dict())
    x, memory = torch.randn(2, 5, D), torch.randn(2, 6, D)
    lens = torch.tensor([6, 3])
    pad = torch.arange(6)[None, :] >= lens[:, None]  # (B, S) True = pad
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    expected = ref(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
    got = ours(x, ours.cross_attn.memory_kv(memory), (~pad)[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
