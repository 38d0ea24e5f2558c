"""The model's typed configuration slice (see DESIGN.md, `trainers.models`)."""

from __future__ import annotations

from dataclasses import dataclass

# Token ids fixed for every tokenizer the project trains (DESIGN.md, "Token ids").
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3

ARCHS = ("transformer", "lstm", "gru")
RNN_ATTENTIONS = ("dot", "general", "additive")


@dataclass
class ModelConfig:
    arch: str = "transformer"
    """Model family: `transformer`, `lstm` or `gru`."""
    vocab_size: int = 8000
    """Size of the shared source/target vocabulary (must equal the tokenizer's)."""
    d_model: int = 512
    """Hidden width: embedding size and, for RNNs, the decoder's hidden size."""
    num_encoder_layers: int = 6
    """Number of encoder layers."""
    num_decoder_layers: int = 6
    """Number of decoder layers."""
    dropout: float = 0.1
    """Dropout probability applied in training mode."""

    # --- Transformer ---------------------------------------------------------
    num_heads: int = 8
    """Attention heads (Transformer); must divide `d_model`."""
    ffn_dim: int = 2048
    """Inner width of the position-wise feed-forward block (Transformer)."""
    norm_first: bool = True
    """Pre-LN (True, the default) or post-LN (False) residual blocks (Transformer)."""
    positions: str = "sinusoidal"
    """Position encoding: `sinusoidal` (fixed) or `learned` (Transformer)."""
    max_positions: int = 1024
    """Longest source or target sequence the position table covers (Transformer)."""
    activation: str = "gelu"
    """Feed-forward activation: `gelu` or `relu` (Transformer)."""

    # --- LSTM / GRU ----------------------------------------------------------
    attention: str = "general"
    """Decoder attention (RNN): `dot`, `general` (Luong) or `additive` (Bahdanau)."""
    bidirectional_encoder: bool = True
    """Run the RNN encoder in both directions (outputs are projected to `d_model`)."""
    input_feeding: bool = True
    """Feed the previous attentional vector into the next RNN decoder step (Luong)."""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "arch", f"must be one of {ARCHS}, got {self.arch!r}")
        _check(self.vocab_size > 4, "vocab_size", f"must exceed the 4 special tokens, got {self.vocab_size}")
        for key in ("d_model", "num_encoder_layers", "num_decoder_layers"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.arch == "transformer":
            self._check_transformer()
        else:
            _check(self.attention in RNN_ATTENTIONS, "attention",
                   f"must be one of {RNN_ATTENTIONS}, got {self.attention!r}")

    def _check_transformer(self) -> None:
        _check(self.num_heads >= 1 and self.d_model % self.num_heads == 0, "num_heads",
               f"must divide d_model={self.d_model}, got {self.num_heads}")
        _check(self.ffn_dim >= 1, "ffn_dim", f"must be >= 1, got {self.ffn_dim}")
        _check(self.positions in ("sinusoidal", "learned"), "positions",
               f"must be 'sinusoidal' or 'learned', got {self.positions!r}")
        _check(self.activation in ("gelu", "relu"), "activation",
               f"must be 'gelu' or 'relu', got {self.activation!r}")
        _check(self.max_positions >= 2, "max_positions", f"must be >= 2, got {self.max_positions}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"model.{key}: {message}")
