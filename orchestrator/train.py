"""`seqfoundry pretrain` / `finetune`: preflight → Ray Train
(`TorchTrainer` × DeepSpeed) → model package.

    seqfoundry pretrain experiment=tiny data.dir=data/tiny run.dir=runs/p1
    seqfoundry pretrain ... resume=true              # continue after the driver died
    seqfoundry finetune pretrained=runs/p1/model data.dir=data/tiny run.dir=runs/f1
    seqfoundry pretrain data.dir=s3://bucket/data run.dir=s3://bucket/runs/p1   # object storage

`run.dir`, `cluster.storage_path`, `data.dir` and `pretrained` may be
object-storage URLs: Ray Train persists the checkpoints there itself, the
run's files are written in a local mirror and uploaded (trainers.run_folder).
"""

from __future__ import annotations

import sys
import time

from .artifacts import log_run_package
from .cluster import ray_session
from .config import JobConfig
from .driver import failure_summary, fit, write_package
from .evaluation.during_training import checkpoint_evaluation, plan_checkpoint_evaluation
from .preflight import preflight_training, train_spec
from .tracking import alert_run


def run_pretrain(job: JobConfig) -> int:
    return train(job, kind="pretrain")


def run_finetune(job: JobConfig) -> int:
    return train(job, kind="finetune")


def train(job: JobConfig, *, kind: str) -> int:
    run, spec = preflight_training(job, kind=kind), train_spec(job)
    spec, evaluation = plan_checkpoint_evaluation(run, spec, job.eval, decoding=job.decoding)  # checked now
    run.open()
    t0 = time.perf_counter()
    try:
        with ray_session(job.cluster), checkpoint_evaluation(evaluation, run) as on_checkpoint:
            fit(run, spec, on_checkpoint=on_checkpoint)
    except Exception as err:  # a failure after Ray Train's retries: one line, checkpoints kept
        if not type(err).__module__.startswith("ray"):
            raise
        print(f"seqfoundry {kind}: error: training failed after {spec.trainer.max_failures} restarts: "
              f"{failure_summary(err)} (checkpoints kept in {run.checkpoints.location})", file=sys.stderr)
        alert_run(spec.tracking, run_dir=run.local, run_id=run.wandb_run_id, title="run failed",
                  text=f"{run.name}: {failure_summary(err)}")
        return 1
    package = write_package(run)
    log_run_package(spec.tracking, run, package)
    print(f"{kind}: done in {time.perf_counter() - t0:.0f}s; model package {package}")
    return 0
