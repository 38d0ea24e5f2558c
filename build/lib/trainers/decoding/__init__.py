"""Decoding strategies (greedy, beam search, sampling) over the incremental
interface every `trainers.models` model implements (see DESIGN.md)."""

from __future__ import annotations

from .beam import BeamSearch
from .config import STRATEGIES, DecodingConfig
from .decode import decode, make_strategy
from .greedy import GreedySearch
from .hypothesis import Hypothesis
from .sampling import Sampling, top_k_filter, top_p_filter
from .strategy import DecodeStrategy

__all__ = ["DecodingConfig", "Hypothesis", "decode", "STRATEGIES", "make_strategy", "DecodeStrategy",
           "GreedySearch", "BeamSearch", "Sampling", "top_k_filter", "top_p_filter"]
