"""Text sources, tokenizer training, shard writing, streaming, noising and batching.

    prepare(DataConfig)                      → folder: tokenizer.json, shards/*.tar, manifest.json
    ShardStream(manifest, rank=, world_size=, seed=)   → this rank's samples, resumable
    build_objective(ObjectiveConfig, specials, seed=)   → sample → Example(src, tgt)
    TokenBatcher(stream, objective, BatchConfig, seed=) → Batch(src, src_lengths, tgt_in, tgt_out, tgt_lengths)
    build_batcher(DataConfig, ObjectiveConfig, rank=, world_size=, seed=), data_loader(batcher, num_workers=)

`prepare` needs Ray (imported only there); everything else is plain torch/numpy.
See docs/data.md.
"""

from .batching import Batch, TokenBatcher, collate, cut_batches
from .config import BatchConfig, DataConfig, ObjectiveConfig
from .loader import build_batcher, data_loader
from .manifest import Manifest
from .objectives import (BartInfilling, Example, Objective, PairPassThrough, T5SpanCorruption, build_objective,
                         noise_rng)
from .prepare import prepare
from .stream import CorruptShardWarning, NoReadableShardsError, Progress, ShardStream, merge_states
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Specials, detokenize, load_tokenizer, tokenize

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "BartInfilling", "Batch", "BatchConfig", "CorruptShardWarning",
    "DataConfig", "Example", "Manifest", "NoReadableShardsError", "Objective", "ObjectiveConfig",
    "PairPassThrough", "Progress", "ShardStream", "Specials", "T5SpanCorruption", "TokenBatcher",
    "build_batcher", "build_objective", "collate", "data_loader", "cut_batches", "detokenize", "tokenize", "load_tokenizer", "merge_states",
    "noise_rng", "prepare",
]
