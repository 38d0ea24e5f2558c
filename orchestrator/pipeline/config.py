"""The pipeline's config slice (kept apart from pipeline.py so the config module stays light)."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("prepare", "pretrain", "sweep", "evaluate")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in order; a stage left out must have its output given (see below) or already made."""
    data: str = ""
    """Reuse this prepared-data folder instead of preparing `<run.dir>/data`."""
    finetuned: str = ""
    """Reuse this fine-tuned model package instead of sweeping (evaluation then uses it)."""
    finetune_steps: int = 0
    """`trainer.max_steps` of the sweep's fine-tunes (and of `compare_scratch`); 0 = the pretraining's
    `trainer.max_steps`."""
    compare_scratch: bool = False
    """After the evaluation, fine-tune once more from random weights with the best trial's config (same
    data, steps and sampled values; nothing frozen) into `<run.dir>/scratch`, evaluate it with the first
    strategy, and report what pretraining gained (`pipeline.json` metadata and the final table). Off by
    default: it costs a second fine-tune."""

    def __post_init__(self) -> None:
        if self.finetune_steps < 0:
            raise ValueError(f"pipeline.finetune_steps: must be >= 0, got {self.finetune_steps}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline.stages: unknown stages {unknown}; choose from {list(STAGES)}")
