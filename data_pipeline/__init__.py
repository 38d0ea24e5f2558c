"""Text sources, tokenizer training, shard writing, streaming, noising and batching.

    prepare(DataConfig)                      → folder: tokenizer.json, shards/*.tar, manifest.json
    ShardStream(manifest, rank=, world_size=, seed=)   → this rank's samples, resumable
    build_objective(ObjectiveConfig, specials, seed=)   → sample → Example(src, tgt)
    TokenBatcher(stream, objective, BatchConfig, seed=) → Batch(src, src_lengths, tgt_in, tgt_out, tgt_lengths)
    build_batcher(DataConfig, ObjectiveConfig, rank=, world_size=, seed=), data_loader(batcher, num_workers=)

`prepare` needs Ray (imported only there) and no torch; everything else is plain torch/numpy.
Names load lazily: `import data_pipeline.scale` (a prepare task) does not import torch.
See docs/data.md.
"""

from importlib import import_module
from typing import TYPE_CHECKING

# eager, because the submodule has the function's name: importing `data_pipeline.prepare` lazily would
# leave the package attribute bound to the module (prepare imports no torch)
from .prepare import prepare

_HOME = {  # public name -> the submodule that defines it, imported on first use (PEP 562)
    **dict.fromkeys(["Batch", "TokenBatcher", "collate", "cut_batches"], "batching"),
    **dict.fromkeys(["BatchConfig", "DataConfig", "ObjectiveConfig"], "config"),
    **dict.fromkeys(["build_batcher", "data_loader"], "loader"),
    "Manifest": "manifest",
    **dict.fromkeys(["BartInfilling", "Example", "Objective", "PairPassThrough", "T5SpanCorruption",
                     "build_objective", "noise_rng"], "objectives"),
    **dict.fromkeys(["CorruptShardWarning", "NoReadableShardsError", "Progress", "ShardStream", "merge_states"],
                    "stream"),
    **dict.fromkeys(["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Specials", "detokenize", "load_tokenizer",
                     "tokenize"], "tokenizer"),
}


def __getattr__(name: str):
    """Submodules load on first use: a `prepare` Ray task imports `data_pipeline.scale` without torch
    (which `stream`, `batching` and `loader` need), saving seconds per worker process."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, eagerly
    from .batching import Batch, TokenBatcher, collate, cut_batches
    from .config import BatchConfig, DataConfig, ObjectiveConfig
    from .loader import build_batcher, data_loader
    from .manifest import Manifest
    from .objectives import (BartInfilling, Example, Objective, PairPassThrough, T5SpanCorruption,
                             build_objective, noise_rng)
    from .stream import CorruptShardWarning, NoReadableShardsError, Progress, ShardStream, merge_states
    from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Specials, detokenize, load_tokenizer, tokenize

__all__ = sorted([*_HOME, "prepare"])
