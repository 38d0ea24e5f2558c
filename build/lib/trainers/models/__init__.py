"""Pure single-device Seq2Seq models (PyTorch only; see DESIGN.md)."""

from __future__ import annotations

from .base import FlopCount, Seq2SeqModel
from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ModelConfig


def build_model(cfg: ModelConfig) -> Seq2SeqModel:
    """Build the model family named by `cfg.arch` with freshly initialised weights."""
    if cfg.arch == "transformer":
        from .transformer import TransformerSeq2Seq

        return TransformerSeq2Seq(cfg)
    from .rnn import RNNSeq2Seq

    return RNNSeq2Seq(cfg)


__all__ = ["ModelConfig", "Seq2SeqModel", "FlopCount", "build_model",
           "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID"]
