"""Evaluation during training (`eval.during_training=true`).

    plan ──preflight──▶ checks (pairs, split, strategies) before Ray starts
    ray_session ─▶ EvaluationActor (long-lived, restarted by Ray when it dies)
    fit(on_checkpoint=CheckpointHook(actor))   rank 0, after each persisted checkpoint:
                    actor.evaluate_checkpoint.remote(step, path)   (enqueue only: training never waits)
    end of fit ─▶ the driver asks for the final checkpoint too (a no-op when done), then waits at
                  most `eval.wait_s` for the queue to drain; the actor is then stopped.

The actor consolidates each checkpoint (`trainers.export`), evaluates it on
`eval.split` (default `valid`) and appends a line to `<run.dir>/eval_metrics.jsonl`;
its W&B run (`<run>-eval`, in the training run's group) plots every metric
against `train_step`.  Ray runs an actor's tasks one at a time in arrival
order, so the driver's last request returns after every earlier one.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from data_pipeline.storage import is_remote
from trainers.decoding import DecodingConfig
from trainers.models import max_positions

from ..config import ConfigError
from ..driver import TrainSpec
from ..runs import CheckpointRoot, Run
from .actor import EvalSpec
from .config import EvalConfig
from .presets import strategy_configs, strategy_engines

DEFAULT_SPLIT = "valid"


@dataclass
class CheckpointEvalPlan:
    """What preflight settled for the evaluation actor."""

    spec: EvalSpec
    """The actor's EvalSpec (W&B run id filled in once the run folder is open)."""
    checkpoints: CheckpointRoot
    """Where the run's checkpoints are persisted."""
    training_cpus: float
    """CPUs the training workers take (the actor gets at most what is left)."""


def plan_checkpoint_evaluation(run: Run, spec: TrainSpec, cfg: EvalConfig, *,
                               decoding: DecodingConfig) -> tuple[TrainSpec, CheckpointEvalPlan | None]:
    """Check the eval slice against the training data (ConfigError); put training and eval in one W&B group.

    Returns the training spec to use (its W&B group set) and the plan, or (spec, None) when off.
    """
    if not cfg.during_training:
        return spec, None
    refuse_remote_checkpoints(run.storage_path)
    manifest = run.manifest
    if not manifest.has_pairs:
        raise ConfigError(f"eval.during_training: {manifest.path} holds plain text; evaluation needs "
                          "source/target pairs (prepare with data.task=restore or data.task=pairs)")
    split = cfg.split or DEFAULT_SPLIT
    if not manifest.split_samples(split):
        raise ConfigError(f"eval.split: {manifest.path} has no samples in split {split!r}")
    try:
        strategies = strategy_configs(list(cfg.strategies), decoding)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    engines = strategy_engines(list(strategies), engine=cfg.engine, compute_type=cfg.compute_type)
    if any(engine != ("torch", "float32") for engine in engines.values()):
        raise ConfigError("eval.engine: checkpoints are evaluated with the torch engine during training (a "
                          "CTranslate2 conversion per checkpoint would cost more than it saves); evaluate the "
                          "package with eval.engine=ctranslate2 afterwards")
    tracking = dataclasses.replace(spec.tracking, group=spec.tracking.group or f"train-{run.name}")
    spec = dataclasses.replace(spec, tracking=tracking)
    source_len = spec.data.batch.max_source_len
    eval_spec = EvalSpec(data_dir=str(manifest.folder), split=split, strategies=strategies, eval=cfg,
                         model=run.model, tokenizer=str(manifest.tokenizer_path),
                         max_source_len=min(source_len, max_positions(run.model) or source_len),
                         verify=spec.data.verify, run_dir=str(run.local), tracking=tracking)
    t = spec.trainer
    return spec, CheckpointEvalPlan(eval_spec, run.checkpoints, t.num_workers * t.cpus_per_worker)


def refuse_remote_checkpoints(storage_path: str) -> None:
    """The actor evaluates each checkpoint as it lands on a file system; not in object storage (ConfigError)."""
    if is_remote(storage_path):
        raise ConfigError(f"eval.during_training: checkpoints in object storage ({storage_path}) are not "
                          "evaluated during training; evaluate the model package afterwards (seqfoundry evaluate)")


@dataclass(frozen=True)
class CheckpointHook:
    """The picklable `on_checkpoint` that rank 0 calls: it enqueues and returns at once."""

    actor: Any

    def __call__(self, *, step: int, path: str) -> None:
        self.actor.evaluate_checkpoint.remote(step, path)  # never waited on here


@contextmanager
def checkpoint_evaluation(evaluation: CheckpointEvalPlan | None, run: Run) -> Iterator[CheckpointHook | None]:
    """Inside a Ray session: start the actor, yield the hook for `fit`, then drain and stop it."""
    if evaluation is None:
        yield None
        return
    import ray

    from .actor import EvaluationActor

    spec = dataclasses.replace(evaluation.spec, wandb_run_id=f"{run.wandb_run_id}-eval")
    spare = ray.cluster_resources().get("CPU", 0.0) - evaluation.training_cpus
    actor = EvaluationActor.options(num_cpus=max(0.0, min(spec.eval.num_cpus, spare)),
                                    num_gpus=1 if spec.eval.use_gpu else 0).remote(spec)
    try:
        yield CheckpointHook(actor)
    except BaseException:
        ray.kill(actor)
        raise
    try:
        drain(actor, evaluation, wait_s=spec.eval.wait_s)
    finally:
        ray.kill(actor)


def drain(actor, evaluation: CheckpointEvalPlan, *, wait_s: float) -> list[dict]:
    """Request the final checkpoint (idempotent), wait for the queue, report; never fails the training."""
    import ray
    from ray.exceptions import RayError

    final = evaluation.checkpoints.latest()
    if final is not None:
        actor.evaluate_checkpoint.remote(CheckpointRoot.step(final), str(final))
    done = actor.finish.remote()
    ready, _ = ray.wait([done], timeout=wait_s)
    metrics = Path(evaluation.spec.run_dir) / "eval_metrics.jsonl"
    if not ready:
        print(f"eval: pending checkpoint evaluations unfinished after {wait_s:.0f}s; stopped "
              f"(results so far in {metrics})", file=sys.stderr)
        return []
    try:
        rows = ray.get(done)
    except RayError as err:
        print(f"eval: the evaluation actor failed: {' '.join(str(err).split())[:300]}", file=sys.stderr)
        return []
    scored = [r for r in rows if "strategies" in r]
    if scored:
        last = scored[-1]
        cells = ", ".join(f"{name} BLEU {m['bleu']:.2f}" for name, m in last["strategies"].items())
        print(f"eval: {len(scored)} checkpoints evaluated; step {last['step']}: {cells}, "
              f"ppl {last['perplexity']:.2f} ({metrics})")
    return rows
