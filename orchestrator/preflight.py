"""Every check that can fail on a config, its data, a package or a run folder, before any Ray
resource is requested (`ConfigError`: one line naming the key).

    run = preflight_training(job, kind="finetune")   # -> a typed Run (orchestrator.runs)
    spec = train_spec(job)                           # -> the resolved slices the workers get
    check_training_config(job, kind="pretrain")      # config-only checks (the pipeline runs them for
                                                     #   every stage before its first stage starts)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_pipeline import Manifest
from data_pipeline.storage import as_path, check_writable, is_remote, url
from trainers.engine import check_zero3
from trainers.models import ModelConfig
from trainers.package import PackageError, check_compatible, read_model_config
from trainers.run_folder import RunFolder

from .cluster import local_cpus
from .config import ConfigError, JobConfig, load_job_config
from .driver import TrainSpec
from .runs import (CONFIG, RUN_INFO, TRAINING_SLICES, CheckpointRoot, Run, RunInfo, RunLock, config_container,
                   config_sha256, saved_run_id, training_identity)
from .tracking import new_run_id

KINDS = ("pretrain", "finetune")


def preflight_training(job: JobConfig, *, kind: str, finished_ok: bool = False, lock_wait_s: float = 0.0) -> Run:
    """The Run of a pretrain or finetune job, every check passed (reads, never writes the run).
    `finished_ok`: a resume may find the run at trainer.max_steps (a sweep trial restored by Tune after its
    last checkpoint: the workers restore, save nothing, and the package is written).
    `lock_wait_s`: how long a live holder of run.dir's lock may keep it before the run is refused."""
    check_training_config(job, kind=kind)
    manifest = load_manifest(job.data.dir)
    model = job.model
    if job.pretrained:  # finetune, or pretraining continued from a package: its architecture, checked
        model = package_model(job.pretrained, manifest=manifest, dropout=job.model.dropout)
    if model.vocab_size != manifest.vocab_size:
        raise ConfigError(f"model.vocab_size: {model.vocab_size} != {manifest.vocab_size}, the vocabulary of "
                          f"{manifest.tokenizer_path} (set model.vocab_size={manifest.vocab_size})")
    if job.objective.name == "pairs" and not manifest.has_pairs:
        raise ConfigError(f"objective.name: 'pairs' needs source/target pairs but {manifest.path} holds plain "
                          "text (prepare with data.task=restore or data.task=pairs)")
    _check(lambda: check_zero3(model.arch, job.deepspeed))
    folder = open_folder(job.run.dir, writable=True)
    storage = (open_folder(job.cluster.storage_path, key="cluster.storage_path", writable=True).location
               if job.cluster.storage_path else folder.location)
    if not folder.remote:
        _check(lambda: RunLock(folder.local).check(wait_s=lock_wait_s))  # another run active in this folder
    resumed = _check_resume(folder, CheckpointRoot.under(storage), resume=job.resume)
    config = config_container(job)
    if resumed and not finished_ok:
        check_unfinished(CheckpointRoot.under(storage), max_steps=job.trainer.max_steps)
    if resumed:
        check_same_config(folder, config)
    return Run(kind=kind, folder=folder, manifest=manifest, model=model, storage_path=storage,
               pretrained=url(job.pretrained) if job.pretrained else "", config=config,
               config_sha256=config_sha256(config),
               wandb_run_id=(saved_run_id(folder) if resumed else None) or new_run_id(), resumed=resumed)


def check_training_config(job: JobConfig, *, kind: str) -> None:
    """The checks that need no data, package or folder: they hold for a stage that has not run yet."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} not in {KINDS}")
    if kind == "finetune" and not job.pretrained:
        raise ConfigError("pretrained: finetune needs pretrained=<model package folder>")
    if not job.pretrained:
        _check(lambda: check_zero3(job.model.arch, job.deepspeed))
    check_resources(job)


def train_spec(job: JobConfig) -> TrainSpec:
    """The slices every rank trains with, resolved here once (never mutated on a rank)."""
    batch = job.data.batch
    resolved = dataclasses.replace(batch, max_sentences=batch.max_sentences or job.trainer.micro_batch_size)
    return TrainSpec(trainer=job.trainer, deepspeed=job.deepspeed, data=dataclasses.replace(job.data, batch=resolved),
                     objective=job.objective, chaos=job.chaos, tracking=job.tracking)


def _check_resume(folder: RunFolder, checkpoints: CheckpointRoot, *, resume: bool) -> bool:
    has_checkpoint = checkpoints.latest() is not None
    if has_checkpoint and not resume:
        raise ConfigError(f"run.dir: {folder.location} already holds a run with checkpoints; pass resume=true to "
                          "continue it or choose another run.dir")
    if resume and not has_checkpoint:
        raise ConfigError(f"resume: {folder.location} has no checkpoint to resume from")
    return has_checkpoint


def check_unfinished(checkpoints: CheckpointRoot, *, max_steps: int) -> None:
    """`resume=true` on a run whose latest checkpoint is at trainer.max_steps: nothing to train (and no step
    to re-save: Ray Train would register the same folder again)."""
    latest = checkpoints.latest()
    step = CheckpointRoot.step(latest) if latest is not None else 0
    if step >= max_steps:
        raise ConfigError(f"resume: {checkpoints.location} already finished at step {step} (trainer.max_steps="
                          f"{max_steps}); raise trainer.max_steps to train on, or package it with "
                          "`seqfoundry export`")


def check_same_config(folder: RunFolder, config: dict) -> None:
    """`resume=true` continues the run the folder holds, not another one: its saved config.yaml must agree on
    every training key a resume may not change (runs.RESUME_MAY_CHANGE)."""
    folder.pull(CONFIG)
    path = folder.local / CONFIG
    if not path.is_file():
        return
    from omegaconf import OmegaConf

    saved = training_identity(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    new = training_identity(config)
    differing = [key for key in TRAINING_SLICES if saved.get(key) != new.get(key)]
    if differing:
        keys = [f"{s}.{k}" for s in differing if isinstance(new.get(s), dict) and isinstance(saved.get(s), dict)
                for k in sorted(set(new[s]) | set(saved[s])) if new[s].get(k) != saved[s].get(k)]
        raise ConfigError(f"resume: {folder.location} holds a run of another config (differs in "
                          f"{', '.join(keys[:5] or differing)}); resume with its config or choose another run.dir")


def _check(check) -> None:
    """Run a trainers-level check; its ValueError (which names the key) becomes a ConfigError."""
    try:
        check()
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --- folders, data, packages ----------------------------------------------------------

def open_folder(location: str, *, key: str = "run.dir", writable: bool = False) -> RunFolder:
    """A folder key (`run.dir`, `cluster.storage_path`) as a RunFolder; a bucket URL is checked for access now."""
    try:
        folder = RunFolder.of(location)
        if writable and folder.remote:
            check_writable(folder.location)
        return folder
    except (ValueError, OSError) as err:  # no fsspec backend for the scheme, no bucket, no rights
        raise ConfigError(f"{key}: {err}") from None


def load_manifest(data_dir: str, *, key: str = "data.dir") -> Manifest:
    """The prepared data in `data_dir` (a folder or URL), or a ConfigError naming `key`."""
    try:
        path = as_path(data_dir) / "manifest.json"
        if not path.is_file():
            raise ConfigError(f"{key}: {path} not found (run `seqfoundry prepare data.dir={data_dir}` first)")
        return Manifest.load(data_dir)
    except (ValueError, KeyError, OSError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{key}: {data_dir}: not a readable manifest ({' '.join(str(err).split())})") from err


def check_package(path: str, *, key: str) -> Path:
    """A readable model package folder (a resolved local path or a URL), or a ConfigError naming `key`."""
    if not path:
        raise ConfigError(f"{key}: needs package=<model package folder> (e.g. runs/<run>/model)")
    package = as_path(path)
    package = package if is_remote(package) else package.resolve()
    try:
        read_model_config(package)
    except PackageError as err:
        raise ConfigError(f"{key}: {err}") from None
    for name in ("model.safetensors", "tokenizer.json"):
        if not (package / name).is_file():
            raise ConfigError(f"{key}: {package / name} not found (is {path} a model package?)")
    return package


def package_model(package: str, *, manifest: Manifest, dropout: float, key: str = "pretrained") -> ModelConfig:
    """A package's architecture with the job's dropout; refuse a package of another tokenizer or vocabulary."""
    try:
        packaged = read_model_config(package)
        check_compatible(package, tokenizer_json=manifest.local_tokenizer_path(), vocab_size=manifest.vocab_size)
    except (ValueError, OSError) as err:  # PackageError is a ValueError
        raise ConfigError(f"{key}: {err}") from err
    return dataclasses.replace(packaged, dropout=dropout)


def check_pairs(manifest: Manifest, split: str, *, key: str = "data.dir", split_key: str = "eval.split") -> None:
    """Evaluation needs source/target pairs in `split`."""
    if not manifest.has_pairs:
        raise ConfigError(f"{key}: {manifest.path} holds plain text; evaluation needs source/target pairs "
                          "(prepare with data.task=restore or data.task=pairs)")
    if not manifest.split_samples(split):
        raise ConfigError(f"{split_key}: {manifest.path} has no samples in split {split!r} "
                          f"(splits: {', '.join(manifest.nonempty_splits())})")


def check_resources(job: JobConfig) -> None:
    t = job.trainer
    cpus = local_cpus(job.cluster)
    if cpus is not None and t.num_workers * t.cpus_per_worker > cpus:
        raise ConfigError(f"trainer.num_workers: {t.num_workers} workers x {t.cpus_per_worker} CPUs exceed the "
                          f"{cpus} CPUs of the local cluster (lower it, or join a cluster with cluster.address)")
    if t.use_gpu and cpus is not None:
        import torch

        if torch.cuda.device_count() < t.num_workers:
            raise ConfigError(f"trainer.use_gpu: {t.num_workers} workers need {t.num_workers} GPUs, this machine "
                              f"has {torch.cuda.device_count()}")


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


def storage_of(saved: JobConfig, folder: RunFolder) -> str:
    """Where a saved run's checkpoints are: its `cluster.storage_path`, else its run folder."""
    return url(saved.cluster.storage_path) if saved.cluster.storage_path else folder.location


__all__ = ["preflight_training", "saved_run", "check_training_config", "train_spec", "open_folder",
           "load_manifest", "check_package", "package_model", "check_pairs", "check_resources", "storage_of"]
