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

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline.stages: unknown stages {unknown}; choose from {list(STAGES)}")
