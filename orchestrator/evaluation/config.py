"""The `eval.*` config slice of `seqfoundry evaluate` and of evaluation during training
(kept apart from the actor so that the config module stays light: no Ray, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.engines import check_engine_keys

from .presets import strategy_configs, strategy_engines

SPLITS = ("", "train", "valid", "test")
BASELINES = ("auto", "copy", "none")
COPY_BASELINE = "copy source"
"""The baseline row's name in tables and results."""


@dataclass
class EvalConfig:
    package: str = ""
    """Model package to evaluate (`seqfoundry evaluate package=runs/p1/model`)."""
    split: str = ""
    """Split of the prepared data to evaluate: `train`, `valid` or `test`; empty = `test` for
    `seqfoundry evaluate`, `valid` during training."""
    strategies: list[str] = field(default_factory=lambda: ["greedy", "beam", "sample"])
    """Decoding strategies: presets of conf/decoding (`greedy`, `beam`, `sample`), each with optional
    overrides, e.g. 'eval.strategies=[greedy,"beam:beam_size=10,length_penalty=0.6"]'. The length limits
    decoding.max_len/max_len_a/max_len_b/min_len apply to every strategy that does not set them."""
    max_samples: int = 0
    """Evaluate at most this many pairs (the first ones of the split); 0 = all."""
    batch_size: int = 32
    """Sources decoded together (the outputs do not depend on it; latency is measured per batch)."""
    num_examples: int = 16
    """Sample outputs (source, reference, one hypothesis per strategy) in eval_results.json and the W&B table."""
    during_training: bool = False
    """pretrain/finetune: hand every new checkpoint to a long-lived evaluation actor without blocking
    training; results go to <run.dir>/eval_metrics.jsonl and to W&B against the training step."""
    wait_s: float = 600.0
    """At the end of training, wait at most this many seconds for pending checkpoint evaluations."""
    num_cpus: float = 1.0
    """CPUs reserved for the evaluation actor (during training: at most what the workers leave free)."""
    use_gpu: bool = False
    """Run the evaluation actor on one GPU."""
    baseline: str = "auto"
    """A baseline row that needs no model: `copy` (each source copied unchanged: the floor a model must clear
    when source and target are the same language), `none`, or `auto` (= copy for the restoration task)."""
    engine: str = "torch"
    """Decoding engine of every strategy: `torch` (our decoder) or `ctranslate2` (the package converted once,
    cached beside it). A strategy entry may name its own: 'eval.strategies=[greedy,greedy@ctranslate2/int8]'."""
    compute_type: str = "float32"
    """Precision of `eval.engine`: `float32`; with ctranslate2 also `int8`, `int8_float32`, `bfloat16`."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"eval.split: must be train, valid, test or empty, got {self.split!r}")
        for key in ("max_samples", "num_examples"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key}: must be >= 0, got {getattr(self, key)}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.wait_s < 0 or self.num_cpus < 0:
            raise ValueError(f"eval.wait_s/num_cpus: must be >= 0, got {self.wait_s}, {self.num_cpus}")
        strategy_configs(list(self.strategies))  # ValueError naming eval.strategies
        check_engine_keys(self.engine, self.compute_type, key="eval")
        if self.baseline not in BASELINES:
            raise ValueError(f"eval.baseline: must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        strategy_engines(list(self.strategies), engine=self.engine, compute_type=self.compute_type)
