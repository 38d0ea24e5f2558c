"""Model selection: the best validated checkpoint (`trainer.best_metric`) and early stopping
(`trainer.patience`).

Every checkpoint reports a `checkpoint_rank` to Ray Train, which keeps the `trainer.keep_last`
highest-ranked checkpoints plus the latest (`CheckpointConfig(checkpoint_score_attribute=RANK_KEY)`):
a validated checkpoint ranks by its metric (negated when lower is better), one no validation scored
ranks below every validated one, newer above older.
"""

from __future__ import annotations

import math

from .checkpoint import TrainState, step_of
from .config import TrainerConfig

RANK_KEY = "checkpoint_rank"
"""The metric Ray Train orders checkpoints by (higher is better)."""
UNVALIDATED = -1e12
"""Rank of a checkpoint at step s that no validation scored: UNVALIDATED + s."""


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether a validation value beats the best so far (a non-finite value never does)."""
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def observe(state: TrainState, cfg: TrainerConfig, metrics: dict[str, float]) -> bool:
    """Record one validation in `state` (best value and step, validations since, early stop);
    True when it improved `trainer.best_metric`."""
    if cfg.best_metric not in metrics:
        return False
    value = metrics[cfg.best_metric]
    if improves(value, state.best_value, cfg.best_mode):
        state.best_value, state.best_step, state.since_best = float(value), state.step, 0
        return True
    state.since_best += 1
    state.stopped_early = state.stopped_early or bool(cfg.patience and state.since_best >= cfg.patience)
    return False


def checkpoint_rank(cfg: TrainerConfig, metrics: dict[str, float] | None, step: int) -> float:
    """The rank Ray Train keeps checkpoints by; `metrics` are those of a validation at this step, or None."""
    if not metrics or cfg.best_metric not in metrics:
        return UNVALIDATED + step
    value = float(metrics[cfg.best_metric])
    return -value if cfg.best_mode == "min" else value


def best_of(results: list[dict]) -> str | None:
    """The checkpoint folder name with the highest validated rank among Ray Train's checkpoint records
    (`{"checkpoint_dir_name", "metrics"}`), or None when no kept checkpoint was validated. Of equal ranks
    the earliest wins, as an equal validation is no improvement."""
    scored = [(r["metrics"][RANK_KEY], -step_of(r["checkpoint_dir_name"]), r["checkpoint_dir_name"])
              for r in results if isinstance(r.get("metrics", {}).get(RANK_KEY), (int, float))
              and math.isfinite(r["metrics"][RANK_KEY]) and r["metrics"][RANK_KEY] > UNVALIDATED / 2]
    return max(scored)[2] if scored else None
