"""The Ray Train driver: run a `Run` to `trainer.max_steps` with a TorchTrainer, and turn its
checkpoints into model packages.

    fit(run, spec)                        # TorchTrainer(train_loop_per_worker) over N DeepSpeed workers
    fit(run, spec, callbacks=[...])       # a sweep trial adds Ray Tune's report callback
    write_package(run)                    # the latest checkpoint -> <run.dir>/model (pushed when remote)

`pretrain`, `finetune`, `export` and every sweep trial go through here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data_pipeline import DataConfig, ObjectiveConfig
from data_pipeline.storage import local_copy
from trainers.checkpoint import TAG_PREFIX, step_of
from trainers.config import ChaosConfig, DeepSpeedConfig, TrainerConfig
from trainers.export import export_package
from trainers.package import WEIGHTS
from trainers.selection import RANK_KEY
from trainers.run_folder import RunFolder

from .runs import CHECKPOINTS, Run
from .tracking import TrackerSpec, TrackingConfig


@dataclass(frozen=True)
class TrainSpec:
    """The config slices a training run uses, resolved once by preflight (`preflight.train_spec`)."""

    trainer: TrainerConfig
    deepspeed: DeepSpeedConfig
    data: DataConfig
    objective: ObjectiveConfig
    chaos: ChaosConfig
    tracking: TrackingConfig


def fit(run: Run, spec: TrainSpec, *, callbacks: tuple = (), on_checkpoint: Callable[..., Any] | None = None) -> None:
    """Run the TorchTrainer to `trainer.max_steps` (restoring from the run's storage if it has a checkpoint).

    `callbacks` go to Ray Train's RunConfig (e.g. Ray Tune's report callback);
    `on_checkpoint(step=, path=)` is called by rank 0 after each checkpoint.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.loop import train_loop_per_worker

    t = spec.trainer
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": worker_job(run, spec, on_checkpoint=on_checkpoint)},
        torch_config=torch_config(t),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=run.storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=checkpoint_config(t),
                             callbacks=list(callbacks)))
    try:
        trainer.fit()
    finally:  # the run folder's lock (taken by run.open) is free again for a resume or an export
        run.release()


def checkpoint_config(t: TrainerConfig):
    """Ray Train keeps `keep_last` checkpoints besides the latest: the newest, or with `trainer.best_metric`
    the best validated ones (by the `checkpoint_rank` each checkpoint reports, trainers.selection)."""
    from ray.train import CheckpointConfig

    if t.best_metric == "none":
        return CheckpointConfig(num_to_keep=t.keep_last)
    return CheckpointConfig(num_to_keep=t.keep_last, checkpoint_score_attribute=RANK_KEY, checkpoint_score_order="max")


def torch_config(t: TrainerConfig):
    """Ray Train's process-group setup: a lost rank fails a collective after `trainer.collective_timeout_s`."""
    from ray.train.torch import TorchConfig

    return TorchConfig(timeout_s=t.collective_timeout_s)


def worker_job(run: Run, spec: TrainSpec, *, on_checkpoint: Callable[..., Any] | None = None):
    """The typed WorkerJob every rank receives (no job config, no untyped extras)."""
    from trainers.loop import WorkerJob

    tracker = TrackerSpec(spec.tracking, run_dir=run.folder.location, run_id=run.wandb_run_id, name=run.name,
                          config=run.config, job_type=run.kind)
    return WorkerJob(model=run.model, trainer=spec.trainer, deepspeed=spec.deepspeed, data=spec.data,
                     objective=spec.objective, chaos=spec.chaos, run_dir=run.folder.location,
                     pretrained=run.pretrained, make_tracker=tracker, checkpoint_root=run.checkpoints.location,
                     on_checkpoint=on_checkpoint, wandb_run_id=run.wandb_run_id, config_sha256=run.config_sha256)


def failure_summary(err: BaseException | str) -> str:
    """The root exception line of a Ray Train worker failure."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or [type(err).__name__])[-1][:300]


def write_package(run: Run, *, checkpoint: Path | None = None, out: str | Path | None = None,
                  average: list[Path] = ()) -> str:
    """Consolidate a checkpoint (default: the best validated one with `trainer.best_metric`, else the latest)
    into `<run.dir>/model` or `out` (uploaded when remote); with `average`, the mean of its weights and those
    of these other checkpoints."""
    checkpoint = checkpoint or run.checkpoints.best() or run.checkpoints.latest()
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {run.checkpoints.location}")
    local = local_copy(checkpoint)  # DeepSpeed reads local files
    tag = next(p.name for p in local.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    target = RunFolder.of(out) if out else RunFolder(run.folder.where("model"))
    export_package(local, target.local, model_cfg=run.model, tokenizer=run.manifest.local_tokenizer_path(),
                   lineage=run.lineage(step_of(tag)), tag=tag, average=[local_copy(p) for p in average])
    target.push_all(last=(WEIGHTS,))  # a package in a bucket counts as written once its weights are there
    return target.location
