"""Pure single-device Seq2Seq models (PyTorch only; see DESIGN.md)."""

from __future__ import annotations

from .base import FlopCount, Seq2SeqModel
from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ModelConfig


def model_class(cfg: ModelConfig) -> type[Seq2SeqModel]:
    """The model family named by `cfg.arch`."""
    if cfg.arch == "transformer":
        from .transformer import TransformerSeq2Seq

        return TransformerSeq2Seq
    from .rnn import RNNSeq2Seq

    return RNNSeq2Seq


def build_model(cfg: ModelConfig) -> Seq2SeqModel:
    """Build the model family named by `cfg.arch` with freshly initialised weights."""
    return model_class(cfg)(cfg)


def max_positions(cfg: ModelConfig) -> int | None:
    """Longest source or target sequence a model of this config accepts (None = no limit), without building it."""
    return model_class(cfg).position_limit(cfg)


__all__ = ["ModelConfig", "Seq2SeqModel", "FlopCount", "build_model", "model_class", "max_positions",
           "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID"]
