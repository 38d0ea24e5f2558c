"""Toy tasks (copy / reverse a random token sequence) and a single-process
training loop for them: the smoke test that a model family can learn, and the
engine of `seqfoundry demo`. No corpus, no Ray, no DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import BOS_ID, EOS_ID, PAD_ID, Seq2SeqModel

FIRST_TOKEN = 4  # after pad, bos, eos, unk


@dataclass
class ToyBatch:
    src: torch.Tensor  # (B, S) long, right-padded with 0
    src_lengths: torch.Tensor  # (B,)
    tgt_in: torch.Tensor  # (B, T) bos + target
    tgt_out: torch.Tensor  # (B, T) target + eos
    tgt_lengths: torch.Tensor  # (B,) target tokens incl. eos


def toy_batch(task: str, batch_size: int, *, alphabet: int, min_len: int, max_len: int,
              generator: torch.Generator) -> ToyBatch:
    """Random sequences over `alphabet` ordinary tokens; the target copies or reverses them."""
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)
    tokens = torch.randint(FIRST_TOKEN, FIRST_TOKEN + alphabet, (batch_size, max_len), generator=generator)
    positions = torch.arange(max_len)[None, :]  # (1, S)
    src = tokens.masked_fill(positions >= lengths[:, None], PAD_ID)  # (B, S)
    tgt = src if task == "copy" else _reverse_padded(src, lengths)
    tgt_out = torch.cat([tgt, torch.zeros_like(tgt[:, :1])], dim=1)  # (B, S+1)
    tgt_out[torch.arange(batch_size), lengths] = EOS_ID
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt], dim=1)  # (B, S+1)
    return ToyBatch(src, lengths, tgt_in, tgt_out, lengths + 1)


def _reverse_padded(src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first `length` tokens, keeping the padding on the right."""
    positions = torch.arange(src.size(1))[None, :]  # (1, S)
    index = (lengths[:, None] - 1 - positions).clamp(min=0)  # (B, S)
    return src.gather(1, index).masked_fill(positions >= lengths[:, None], PAD_ID)


def train_toy(model: Seq2SeqModel, *, task: str, steps: int, batch_size: int = 64, lr: float = 3e-3,
              alphabet: int = 12, min_len: int = 3, max_len: int = 8, seed: int = 0) -> list[float]:
    """Train `model` in place with AdamW (10% warm-up, then linear decay to 10% of
    `lr`); returns the loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def factor(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 1.0 - 0.9 * (s - warmup) / max(1, steps - warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    for _ in range(steps):
        b = toy_batch(task, batch_size, alphabet=alphabet, min_len=min_len, max_len=max_len, generator=gen)
        loss = model(b.src, b.src_lengths, b.tgt_in, labels=b.tgt_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def expected_outputs(batch: ToyBatch) -> list[list[int]]:
    """The reference target of each row (eos included), as token lists."""
    return [row[: int(n)].tolist() for row, n in zip(batch.tgt_out, batch.tgt_lengths)]
