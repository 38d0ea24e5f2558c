"""One trial of `seqfoundry sweep`: a Ray Tune function trainable that runs a
DeepSpeed fine-tune through Ray Train (the Train V2 driver-function pattern).

    Tune trial (tiny resource share) ── run_trial(config)
        trial_job: the sweep's JobConfig with the sampled values, run.dir=<sweep>/trial_<id>
        preflight_training → Run.open → fit(TorchTrainer, callbacks=[ValidationToTune, ControllerMailbox])
        write_package → <sweep>/trial_<id>/model

A trial is an ordinary training `Run`: in a bucket sweep its run folder is a
bucket URL, worked on through the run-folder layer like any remote `run.dir`.

Workers report `{"step", "val_loss", "val_ppl"}` (and `val_bleu`, `val_chrf` when the sweep
ranks on them: `trainer.val_metric_samples`) at each validation and
`{"step", "tag", "final"}` at each checkpoint; only the validation reports go
on to Tune (its scheduler needs the metric in every result).

When ASHA stops a trial, Tune ends the trial's actor, and with it the Ray Train
controller it owns; the workers' placement group would outlive both (Ray
Train's own cleaner needs the dashboard's state API, which seqfoundry's local
clusters do not start). So the trainable aborts its TorchTrainer first:
the controller posts its actor handle to a mailbox when it starts, and the
trainable's `cleanup` (run by Tune before the actor ends) calls its `abort`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import ray
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from ray import tune
from ray.train.v2._internal.execution.callback import ControllerCallback  # a DeveloperAPI class
from ray.tune.integration.ray_train import TuneReportCallback

from trainers.run_folder import RunFolder

from ..artifacts import log_run_package
from ..config import ConfigError, JobConfig, one_line, to_typed
from ..driver import fit, write_package
from ..preflight import preflight_training, train_spec
from ..runs import CheckpointRoot
from .config import DECODED_METRICS
from .space import flatten


@dataclass
class TrialRecipe:
    """What every trial shares (handed to the trials through Ray's object store)."""

    job: JobConfig
    """The sweep's config, paths made absolute."""
    sweep: RunFolder
    """The sweep's run folder (local or a bucket URL): trial run folders go under it, <sweep>/trial_<id>."""
    group: str
    """W&B group of the trials."""
    storage: str
    """Shared storage of the sweep (cluster.storage_path/<name>); empty = the trial folders themselves."""


def trial_job(recipe: TrialRecipe, values: dict[str, Any], *, trial: str) -> JobConfig:
    """The typed config of one trial: the sampled `values` (dotted keys) over the sweep's config."""
    cfg = OmegaConf.structured(recipe.job)
    for key, value in values.items():
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"sweep.space.{key}: {one_line(err)}") from err
    cfg.run.dir = recipe.sweep.where(trial)
    cfg.cluster.storage_path = f"{recipe.storage}/{trial}" if recipe.storage else ""
    cfg.tracking.group = recipe.group
    cfg.tracking.tags = [*recipe.job.tracking.tags, "sweep"]
    if recipe.job.sweep.metric in DECODED_METRICS:  # the trial decodes validation sources to report it
        cfg.trainer.val_metric_samples = recipe.job.sweep.metric_samples
    return to_typed(cfg)


RESTART_LOCK_WAIT_S = 60.0
"""A trial restarted by a resumed sweep may find its folder still locked by the trial process of the killed
driver's cluster, which Ray ends within seconds of the driver's death: the trial waits for it this long."""


def interrupted(job: JobConfig) -> bool:
    """The trial's run folder has checkpoints: a resumed sweep continues the trial from the latest."""
    return CheckpointRoot.under(job.cluster.storage_path or job.run.dir).latest() is not None


def trial_name(trial) -> str:
    """Tune's name and folder of a trial, and our trial run folder: `trial_<id>`."""
    return f"trial_{trial.trial_id}"


def run_trial(config: dict, *, recipe: TrialRecipe) -> None:
    """A Tune trial: fine-tune with the sampled values, report validation to Tune, write the package."""
    from ray.util.queue import Queue

    context = tune.get_context()
    job = trial_job(recipe, flatten(config), trial=f"trial_{context.get_trial_id()}")
    job = dataclasses.replace(job, resume=interrupted(job))
    run = preflight_training(job, kind="finetune", finished_ok=True, lock_wait_s=RESTART_LOCK_WAIT_S)
    spec = train_spec(job)
    run.open()
    mailbox = Queue(actor_options={"num_cpus": 0})
    _RUNNING.update(mailbox=mailbox, folder=run.folder)
    try:
        fit(run, spec, callbacks=(ValidationToTune(job.sweep.metric), ControllerMailbox(mailbox)))
    finally:
        _RUNNING.clear()
    package = write_package(run)
    log_run_package(job.tracking, run, package)
    print(f"sweep: {run.name} wrote {package}", flush=True)


class ValidationToTune(TuneReportCallback):
    """Ray Train → Ray Tune, validation reports only (checkpoint reports carry no metric)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context=run_context, metrics=metrics, checkpoint=None)


# --- stopping a trial's TorchTrainer with the trial ----------------------------------------

_RUNNING: dict[str, Any] = {}
"""The mailbox and run folder of the trial running in this process (Tune runs one trial per actor process)."""


class ControllerMailbox(ControllerCallback):
    """Runs in the Ray Train controller: posts the controller's actor handle to the trial's mailbox."""

    def __init__(self, mailbox):
        self.mailbox = mailbox

    def after_controller_start(self, train_run_context) -> None:
        self.mailbox.put(ray.get_runtime_context().current_actor)


class AbortTrainingOnStop:
    """Mixin for the Tune trainable (`__mixins__`): abort the running TorchTrainer when Tune stops the trial."""

    def cleanup(self):
        abort_training()
        super().cleanup()


def abort_training(timeout_s: float = 60.0) -> None:
    """Abort this process's running TorchTrainer (workers stopped, placement group removed), if any; then
    push what rank 0 wrote since its last checkpoint when the run folder is in a bucket."""
    mailbox, folder = _RUNNING.pop("mailbox", None), _RUNNING.pop("folder", None)
    controller = None
    while mailbox is not None and not mailbox.empty():
        controller = mailbox.get_nowait()  # the latest controller of the trial
    if controller is None:
        return
    print("sweep: trial stopped by the scheduler; aborting its Ray Train run", flush=True)
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # abort() ends with exit_actor: the call fails once the controller is gone
        pass
    if folder is not None:  # rank 0 pushes only at checkpoints; its mirror is this node's when it ran here
        from trainers.loop import RANK0_FILES

        folder.push(*RANK0_FILES)  # (when rank 0 ran on another node, its files are not here: none is pushed)
