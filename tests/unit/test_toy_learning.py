"""Each architecture learns the reverse task on the CPU, and every decoding
strategy then decodes it correctly."""

from __future__ import annotations

import pytest
import torch

from trainers.decoding import DecodingConfig, decode
from trainers.models import ModelConfig, build_model
from trainers.toy import expected_outputs, toy_batch, train_toy

TINY = dict(vocab_size=16, d_model=64, num_encoder_layers=2, num_decoder_layers=2, dropout=0.0,
            num_heads=4, ffn_dim=128)


@pytest.fixture(scope="module", params=["transformer", "lstm", "gru"])
def trained(request):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=request.param, **TINY))
    losses = train_toy(model, task="reverse", steps=400, batch_size=64, lr=3e-3,
                       alphabet=12, min_len=3, max_len=8, seed=0)
    return request.param, model, losses


def test_loss_falls_to_near_zero(trained):
    arch, _, losses = trained
    assert losses[0] > 1.5, arch
    assert sum(losses[-10:]) / 10 < 0.05, (arch, losses[-10:])


@pytest.mark.parametrize("cfg", [
    DecodingConfig(strategy="greedy", max_len=9),
    DecodingConfig(strategy="beam", beam_size=4, n_best=2, max_len=9),
    DecodingConfig(strategy="sample", temperature=0.5, top_p=0.9, seed=1, max_len=9),
], ids=["greedy", "beam", "sample"])
def test_every_strategy_decodes_the_learned_task(trained, cfg):
    arch, model, _ = trained
    batch = toy_batch("reverse", 32, alphabet=12, min_len=3, max_len=8,
                      generator=torch.Generator().manual_seed(123))
    hyps = decode(model, batch.src, batch.src_lengths, cfg)
    best = [h[0].tokens for h in hyps]
    refs = expected_outputs(batch)
    accuracy = sum(b == r for b, r in zip(best, refs)) / len(refs)
    assert accuracy >= 0.95, (arch, cfg.strategy, accuracy)
