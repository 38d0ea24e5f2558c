"""The training loss, shared by the distributed loop and the toy trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import PAD_ID


def seq2seq_loss(logits: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32, padding ignored. logits (B, T, V), tgt_out (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID)
