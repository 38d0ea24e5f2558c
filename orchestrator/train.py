"""`seqfoundry pretrain` / `finetune` / `export`: preflight → Ray Train
(`TorchTrainer` × DeepSpeed) → model package.

    seqfoundry pretrain experiment=tiny data.dir=data/tiny run.dir=runs/p1
    seqfoundry pretrain ... resume=true              # continue after the driver died
    seqfoundry finetune pretrained=runs/p1/model data.dir=data/tiny run.dir=runs/f1
    seqfoundry export run.dir=runs/p1 [export.tag=step_00000100] [export.out=...]
    seqfoundry pretrain data.dir=s3://bucket/data run.dir=s3://bucket/runs/p1   # object storage

`run.dir`, `cluster.storage_path`, `data.dir` and `pretrained` may be
object-storage URLs: Ray Train persists the checkpoints there itself, the
run's files are written in a local mirror and uploaded (trainers.run_folder).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from trainers.package import read_model_config

from .cluster import ray_session
from .config import ConfigError, JobConfig, load_job_config
from .driver import failure_summary, fit, write_package
from .evaluation.during_training import checkpoint_evaluation, plan_checkpoint_evaluation
from .preflight import load_manifest, open_folder, preflight_training, storage_of, train_spec
from .runs import CONFIG, RUN_INFO, Run, RunInfo, config_container


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
        return 1
    package = write_package(run)
    print(f"{kind}: done in {time.perf_counter() - t0:.0f}s; model package {package}")
    return 0


def run_export(job: JobConfig) -> int:
    """Write the model package of any checkpoint of the run in `run.dir` (local or object storage)."""
    run = saved_run(job.run.dir)
    checkpoint = run.checkpoints.get(job.export.tag) if job.export.tag else run.checkpoints.latest()
    if checkpoint is None:
        raise ConfigError(f"run.dir: no checkpoint under {run.checkpoints.location}")
    if not checkpoint.is_dir():
        raise ConfigError(f"export.tag: {checkpoint} not found")
    print(f"export: {write_package(run, checkpoint=checkpoint, out=job.export.out or None)}")
    return 0


def saved_run(run_dir: str) -> Run:
    """The Run of an existing training run folder, from its config.yaml and run.json."""
    folder = open_folder(run_dir)
    folder.local.mkdir(parents=True, exist_ok=True)
    folder.pull(RUN_INFO, CONFIG)
    info_path, config_path = folder.local / RUN_INFO, folder.local / CONFIG
    if not info_path.is_file() or not config_path.is_file():
        raise ConfigError(f"run.dir: {folder.location} is not a training run folder (no {RUN_INFO}/{CONFIG})")
    saved, info = load_job_config(config_path), RunInfo.load(info_path)
    model = read_model_config(saved.pretrained) if saved.pretrained else saved.model
    return Run(kind=info.mode, folder=folder, manifest=load_manifest(saved.data.dir),
               model=dataclasses.replace(model, dropout=saved.model.dropout), storage_path=storage_of(saved, folder),
               pretrained=saved.pretrained, config=config_container(saved), config_sha256=info.config_sha256,
               wandb_run_id=info.wandb_run_id, resumed=True)
