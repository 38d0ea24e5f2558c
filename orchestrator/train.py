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
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline import Manifest
from data_pipeline.storage import as_path, check_writable, local_copy, url
from trainers.engine import check_zero3
from trainers.export import export_package
from trainers.models import ModelConfig
from trainers.package import Lineage, PackageError, check_compatible, read_model_config, sha256_file
from trainers.run_folder import RunFolder

from .checkpoint_eval import checkpoint_evaluation, plan_checkpoint_evaluation
from .cluster import local_cpus, ray_session
from .config import ConfigError, JobConfig
from .tracking import Tracker, new_run_id

CHECKPOINTS = "checkpoints"


@dataclass
class Plan:
    """What preflight established, before any Ray resource is requested."""

    mode: str
    run: RunFolder
    """`run.dir`, local or in object storage."""
    storage_path: str
    manifest: Manifest
    model: ModelConfig
    pretrained: str
    config_sha256: str
    has_checkpoint: bool

    @property
    def run_dir(self) -> Path:
        """Where this process writes the run's files (the run folder, or its local mirror)."""
        return self.run.local


def run_pretrain(job: JobConfig) -> int:
    return train(job, mode="pretrain")


def run_finetune(job: JobConfig) -> int:
    return train(job, mode="finetune")


def train(job: JobConfig, *, mode: str) -> int:
    plan = preflight(job, mode=mode)
    job, evaluation = plan_checkpoint_evaluation(job, plan)  # eval.during_training: checked now, started in Ray
    run_info = open_run_dir(job, plan)
    t0 = time.perf_counter()
    try:
        with ray_session(job.cluster), checkpoint_evaluation(evaluation, run_info) as on_checkpoint:
            fit(job, plan, run_info, on_checkpoint=on_checkpoint)
    except Exception as err:  # a failure after Ray Train's retries: one line, checkpoints kept
        if not type(err).__module__.startswith("ray"):
            raise
        print(f"seqfoundry {mode}: error: training failed after {job.trainer.max_failures} restarts: "
              f"{failure_summary(err)} (checkpoints kept in {plan.storage_path}/{CHECKPOINTS})", file=sys.stderr)
        return 1
    package = write_final_package(plan, run_info)
    print(f"{mode}: done in {time.perf_counter() - t0:.0f}s; model package {package}")
    return 0


def failure_summary(err: BaseException) -> str:
    """The root exception line of a Ray Train worker failure."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or [type(err).__name__])[-1][:300]


# --- preflight ------------------------------------------------------------------

def preflight(job: JobConfig, *, mode: str) -> Plan:
    """Every check that can fail on the config, the data or the run folder (ConfigError)."""
    manifest = load_manifest(job.data.dir)
    model = job.model
    if mode == "finetune":
        model = finetune_model_config(job, manifest)
    if model.vocab_size != manifest.vocab_size:
        raise ConfigError(f"model.vocab_size: {model.vocab_size} != {manifest.vocab_size}, the vocabulary of "
                          f"{manifest.tokenizer_path} (set model.vocab_size={manifest.vocab_size})")
    check_fields(job, manifest, mode)
    check_resources(job)
    try:
        check_zero3(model.arch, job.deepspeed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run = run_folder(job.run.dir, writable=True)
    storage = (run_folder(job.cluster.storage_path, key="cluster.storage_path", writable=True).location
               if job.cluster.storage_path else run.location)
    has_ckpt = bool(list_checkpoints(storage))
    if has_ckpt and not job.resume:
        raise ConfigError(f"run.dir: {run.location} already holds a run with checkpoints; pass resume=true to "
                          "continue it or choose another run.dir")
    if job.resume and not has_ckpt:
        raise ConfigError(f"resume: {run.location} has no checkpoint to resume from")
    pretrained = url(job.pretrained) if job.pretrained else ""
    return Plan(mode, run, storage, manifest, model, pretrained, config_sha256(job), has_ckpt)


def run_folder(run_dir: str, *, key: str = "run.dir", writable: bool = False) -> RunFolder:
    """`run.dir` (or another folder key) as a RunFolder; a bucket URL is checked for access now."""
    try:
        run = RunFolder.of(run_dir)
        if writable and run.remote:
            check_writable(run.location)
        return run
    except (ValueError, OSError) as err:  # no fsspec backend for the scheme, no bucket, no rights
        raise ConfigError(f"{key}: {err}") from None


def list_checkpoints(storage: str) -> list[Path]:
    """The run's checkpoint folders (`step_*`), oldest first, local or in object storage."""
    root = as_path(storage) / CHECKPOINTS
    try:
        return sorted((p for p in root.iterdir() if p.name.startswith("step_")), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def load_manifest(data_dir: str) -> Manifest:
    try:
        path = as_path(data_dir) / "manifest.json"
        if not path.is_file():
            raise ConfigError(f"data.dir: {path} not found (run `seqfoundry prepare data.dir={data_dir}` first)")
        return Manifest.load(data_dir)
    except (ValueError, KeyError, OSError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"data.dir: {data_dir}: not a readable manifest ({' '.join(str(err).split())})") from err


def finetune_model_config(job: JobConfig, manifest: Manifest) -> ModelConfig:
    """The package's architecture, with the job's dropout; refuse a package of another vocabulary."""
    if not job.pretrained:
        raise ConfigError("pretrained: finetune needs pretrained=<model package folder>")
    try:
        packaged = read_model_config(job.pretrained)
        check_compatible(job.pretrained, tokenizer_json=manifest.local_tokenizer_path(),
                         vocab_size=manifest.vocab_size)
    except (ValueError, OSError) as err:  # PackageError is a ValueError
        raise ConfigError(f"pretrained: {err}") from err
    return dataclasses.replace(packaged, dropout=job.model.dropout)


def check_fields(job: JobConfig, manifest: Manifest, mode: str) -> None:
    fields = tuple(manifest.data.get("fields", ("tgt",)))
    if job.objective.name == "pairs" and "src" not in fields:
        raise ConfigError(f"objective.name: 'pairs' needs source/target pairs but {manifest.path} holds plain "
                          "text (prepare with data.task=restore or data.task=pairs)")


def check_resources(job: JobConfig) -> None:
    cpus = local_cpus(job.cluster)
    t = job.trainer
    if cpus is not None and t.num_workers * t.cpus_per_worker > cpus:
        raise ConfigError(f"trainer.num_workers: {t.num_workers} workers x {t.cpus_per_worker} CPUs exceed the "
                          f"{cpus} CPUs of the local cluster (lower it, or join a cluster with cluster.address)")
    if t.use_gpu and cpus is not None:
        import torch

        if torch.cuda.device_count() < t.num_workers:
            raise ConfigError(f"trainer.use_gpu: {t.num_workers} workers need {t.num_workers} GPUs, this machine "
                              f"has {torch.cuda.device_count()}")


def config_sha256(job: JobConfig) -> str:
    """Hash of what defines the training (run folder, resume and chaos keys left out)."""
    cfg = OmegaConf.to_container(OmegaConf.structured(job))
    for key in ("run", "resume", "chaos", "cluster", "tracking", "demo", "decoding", "eval", "generate",
                "sweep"):
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


# --- the run folder -----------------------------------------------------------------

def open_run_dir(job: JobConfig, plan: Plan) -> dict:
    """Create (or reopen on resume) the run folder: config.yaml and run.json with the W&B run id."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if plan.has_checkpoint:
        plan.run.pull("run.json")  # a resume on another machine keeps the run's W&B run id
    info_path = plan.run_dir / "run.json"
    if plan.has_checkpoint and info_path.is_file():
        info = json.loads(info_path.read_text())
        info["resumed"] = info.get("resumed", 0) + 1
    else:
        info = {"wandb_run_id": new_run_id(), "mode": plan.mode, "created": time.time(), "resumed": 0}
    info.update(config_sha256=plan.config_sha256, pretrained=plan.pretrained,
                data_manifest_sha256=sha256_file(plan.manifest.path))
    info_path.write_text(json.dumps(info, indent=2))
    (plan.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
    plan.run.push("run.json", "config.yaml")
    return info


# --- Ray Train -----------------------------------------------------------------------

def fit(job: JobConfig, plan: Plan, run_info: dict, *, callbacks: tuple = (), on_checkpoint=None) -> None:
    """Run the TorchTrainer to `trainer.max_steps` (restoring from the run's storage if it has a checkpoint).

    `callbacks` go to Ray Train's RunConfig (e.g. Ray Tune's report callback);
    `on_checkpoint(step=, path=)` is called by rank 0 after each checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.loop import WorkerJob, train_loop_per_worker

    t = job.trainer
    worker_job = WorkerJob(
        model=plan.model, trainer=t, deepspeed=job.deepspeed, data=job.data, objective=job.objective,
        chaos=job.chaos, run_dir=plan.run.location, pretrained=plan.pretrained,
        make_tracker=TrackerFactory(job, plan, run_info),
        checkpoint_root=f"{plan.storage_path}/{CHECKPOINTS}", on_checkpoint=on_checkpoint,
        extra={"wandb_run_id": run_info["wandb_run_id"], "config_sha256": plan.config_sha256})
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": worker_job},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=plan.storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_last),
                             callbacks=list(callbacks)))
    trainer.fit()


@dataclass
class TrackerFactory:
    """Picklable recipe for rank 0's Tracker (W&B + metrics.jsonl), made inside the worker."""

    job: JobConfig
    plan: Plan
    run_info: dict

    def __call__(self, *, resume_from_step: int) -> Tracker:
        config = OmegaConf.to_container(OmegaConf.structured(self.job))
        return Tracker(self.job.tracking, run_dir=self.plan.run.local, run_id=self.run_info["wandb_run_id"],
                       name=run_name(self.plan.run), config=config, resume_from_step=resume_from_step,
                       job_type=self.plan.mode)


# --- packages --------------------------------------------------------------------------

def run_name(run: RunFolder) -> str:
    """The W&B run name: the run folder's name (`s3://b/runs/p1` -> `p1`)."""
    return run.location.rstrip("/").rsplit("/", 1)[-1]


def latest_checkpoint(storage_path: str) -> Path:
    found = list_checkpoints(storage_path)
    if not found:
        raise ConfigError(f"run.dir: no checkpoint under {storage_path}/{CHECKPOINTS}")
    return found[-1]


def write_final_package(plan: Plan, run_info: dict, *, checkpoint: Path | None = None,
                        out: str | Path | None = None) -> str:
    """Consolidate a checkpoint (default: the latest) into `<run.dir>/model` (uploaded when run.dir is remote)."""
    checkpoint = local_copy(checkpoint or latest_checkpoint(plan.storage_path))  # DeepSpeed reads local files
    tag = next(p.name for p in checkpoint.iterdir() if p.is_dir() and p.name.startswith("step_"))
    lineage = Lineage(
        parent_package=plan.pretrained or None,
        parent_sha256=sha256_file(as_path(plan.pretrained) / "model.safetensors") if plan.pretrained else None,
        data_manifest_sha256=sha256_file(plan.manifest.path), config_sha256=plan.config_sha256,
        wandb_run_id=run_info["wandb_run_id"], step=int(tag.split("_")[1]))
    target = RunFolder.of(out) if out else RunFolder(plan.run.where("model"))
    export_package(checkpoint, target.local, model_cfg=plan.model, tokenizer=plan.manifest.local_tokenizer_path(),
                   lineage=lineage, tag=tag)
    target.push_all()
    return target.location


def run_export(job: JobConfig) -> int:
    """Write the model package of any checkpoint of the run in `run.dir` (local or object storage)."""
    run = run_folder(job.run.dir)
    run.local.mkdir(parents=True, exist_ok=True)
    run.pull("run.json", "config.yaml")
    info_path, config_path = run.local / "run.json", run.local / "config.yaml"
    if not info_path.is_file() or not config_path.is_file():
        raise ConfigError(f"run.dir: {run.location} is not a training run folder (no run.json/config.yaml)")
    from .config import load_job_config

    saved = load_job_config(config_path)
    info = json.loads(info_path.read_text())
    manifest = load_manifest(saved.data.dir)
    model = read_model_config(saved.pretrained) if saved.pretrained else saved.model
    storage = url(saved.cluster.storage_path) if saved.cluster.storage_path else run.location
    checkpoint = as_path(storage) / CHECKPOINTS / job.export.tag if job.export.tag else latest_checkpoint(storage)
    if not checkpoint.is_dir():
        raise ConfigError(f"export.tag: {checkpoint} not found")
    plan = Plan(info.get("mode", "pretrain"), run, storage, manifest,
                dataclasses.replace(model, dropout=saved.model.dropout), saved.pretrained,
                info.get("config_sha256", ""), True)
    print(f"export: {write_final_package(plan, info, checkpoint=checkpoint, out=job.export.out or None)}")
    return 0
