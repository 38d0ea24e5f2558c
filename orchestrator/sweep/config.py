"""The `sweep.*` config slice (kept apart from the driver so that the config module stays light)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .space import check_search, parse_space


DECODED_METRICS = ("val_bleu", "val_chrf")
"""Metrics a trial gets by decoding validation sources (trainer.val_metric_samples)."""
METRICS = ("val_loss", "val_ppl", *DECODED_METRICS)
SEARCHES = ("random", "grid", "optuna")


@dataclass
class SweepConfig:
    name: str = ""
    """Sweep name: the W&B group of its trials (unless tracking.group is set) and its folder under
    cluster.storage_path; empty = the run folder's name."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space, nested like the config (`trainer: {lr: [loguniform, 1e-5, 1e-3]}`); each leaf is one
    domain: `[uniform|loguniform|randint, low, high]`, `[choice, a, b, ...]` (one sampled per trial) or
    `[grid, a, b, ...]` (every value). Presets in conf/sweep/ (`sweep=default`, `sweep=tiny`)."""
    num_samples: int = 8
    """Trials sampled from the space (with `grid` domains: times the whole grid runs)."""
    seed: int | None = 0
    """Seed of the random search: the same seed samples the same trials; null = a fresh draw every run."""
    metric: str = "val_loss"
    """Validation metric that ranks trials and drives early stopping: `val_loss`, `val_ppl`, or `val_bleu` /
    `val_chrf` (sacreBLEU over `metric_samples` validation sources decoded greedily at each validation)."""
    mode: str = "auto"
    """`min` or `max` of `metric`; `auto` = max for val_bleu/val_chrf, min for val_loss/val_ppl."""
    metric_samples: int = 64
    """With metric=val_bleu/val_chrf: the fixed validation sources each trial decodes at each validation
    (sets `trainer.val_metric_samples` of the trials)."""
    search: str = "random"
    """How trials are chosen: `random` (Tune's random/grid variant generator, seeded by `seed`), `grid` (every
    `choice` domain becomes a grid: each combination runs `num_samples` times; ranges are refused) or
    `optuna` (Optuna's TPE through Ray Tune's OptunaSearch, seeded by `seed`; needs the `optuna` extra)."""
    scheduler: str = "asha"
    """`asha` (Async Successive Halving: stop weak trials at validation rungs) or `fifo` (run every trial out)."""
    grace_period: int = 0
    """ASHA: optimizer steps every trial runs before it may be stopped; 0 = `trainer.val_every`."""
    reduction_factor: int = 2
    """ASHA: about 1/reduction_factor of the trials reaching a rung go on to the next one."""
    max_concurrent: int = 0
    """Trials at once; 0 = as many as the cluster's CPUs (GPUs) hold, num_workers x cpus_per_worker each."""
    trial_cpus: float = 0.0
    """CPUs reserved for each trial's driver (it only waits on its TorchTrainer, whose workers hold the CPUs)."""
    trial_memory_mb: int = 256
    """Memory reserved for each trial's driver (Ray refuses a trial that reserves nothing at all)."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"sweep.metric: must be one of {', '.join(METRICS)} (what trials report), "
                             f"got {self.metric!r}")
        if self.mode == "auto":
            self.mode = "max" if self.metric in DECODED_METRICS else "min"
        if self.mode not in ("min", "max"):
            raise ValueError(f"sweep.mode: must be auto, min or max, got {self.mode!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"sweep.search: must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"sweep.scheduler: must be asha or fifo, got {self.scheduler!r}")
        for key, least in (("num_samples", 1), ("metric_samples", 1), ("grace_period", 0), ("reduction_factor", 2),
                           ("max_concurrent", 0), ("trial_cpus", 0), ("trial_memory_mb", 0)):
            if getattr(self, key) < least:
                raise ValueError(f"sweep.{key}: must be >= {least}, got {getattr(self, key)}")
        if not self.trial_cpus and not self.trial_memory_mb:
            raise ValueError("sweep.trial_cpus/trial_memory_mb: a trial must reserve something (Ray refuses "
                             "an empty request); keep trial_memory_mb > 0")
        check_search(parse_space(self.space), self.search)
