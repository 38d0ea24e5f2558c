"""`seqfoundry sweep`: a Ray Tune search over fine-tuning hyperparameters of a
model package; every trial is a DeepSpeed fine-tune through Ray Train
(`sweep/trial.py`), stopped early by ASHA when it falls behind.

    seqfoundry sweep pretrained=runs/p1/model experiment=tiny run.dir=runs/s1
    seqfoundry sweep pretrained=... sweep=tiny sweep.num_samples=4 sweep.scheduler=fifo
    seqfoundry sweep pretrained=... '+sweep.space.trainer.grad_clip={choice: [0.5, 1.0]}'
    seqfoundry sweep pretrained=... sweep.metric=val_bleu sweep.search=optuna     # TPE on greedy BLEU
    seqfoundry sweep pretrained=... run.dir=runs/s1 resume=true                   # continue an interrupted sweep
    seqfoundry sweep pretrained=... run.dir=s3://bucket/sweeps/s1                 # everything in a bucket

    <run.dir>/config.yaml          the sweep's resolved config
    <run.dir>/trial_<id>/          one fine-tuning run folder per trial (metrics.jsonl, wandb/, model/, ...)
    <run.dir>/tune/                Ray Tune's experiment state
    <run.dir>/sweep_results.json   every trial (config, metrics, status, error, package) and the best

A `run.dir` in object storage (`s3://`, `gs://`) holds the same files: Tune
keeps its experiment state there itself (its `storage_path`, through pyarrow),
each trial's run folder goes through the run-folder layer (written in a local
mirror, pushed: `trainers.run_folder`), and the sweep's own files are pushed
the same way.

Everything that can be refused (space keys and every value it can take, data,
package, resources, a bucket that cannot be written) is checked before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass

from ray import tune

from data_pipeline import Manifest
from data_pipeline.storage import as_path
from trainers.run_folder import RunFolder

from ..artifacts import log_artifact, model_artifact
from ..cluster import ray_session
from ..config import ConfigError, JobConfig
from ..driver import failure_summary
from ..preflight import open_folder, preflight_training
from ..runs import CONFIG, RUN_INFO, config_container, folder_name, write_config
from .config import SweepConfig
from .space import Domain, flatten, nest, num_trials, parse_space
from .trial import AbortTrainingOnStop, TrialRecipe, run_trial, trial_job, trial_name

RESULTS = "sweep_results.json"
TUNE_DIR = "tune"
SET_BY_THE_SWEEP = ("run.", "sweep.", "cluster.", "tracking.", "data.dir", "pretrained", "resume")
"""Keys the sweep sets itself: a space may not search them."""
REPORTED = ("step", "val_loss", "val_ppl", "val_bleu", "val_chrf")
"""What trials report to Tune (at each validation)."""


@dataclass
class SweepPlan:
    """What the checks established, before Ray starts."""

    job: JobConfig
    folder: RunFolder
    """The sweep's run folder (`run.dir`), local or in a bucket."""
    name: str
    domains: list[Domain]
    num_trials: int
    grace_period: int
    recipe: TrialRecipe
    resume: bool = False
    """Continue the interrupted sweep in the folder (`Tuner.restore`): finished trials are not run again."""


def run(job: JobConfig) -> int:
    plan = plan_sweep(job)
    write_config(plan.folder.local, config_container(plan.job))
    plan.folder.push(CONFIG)
    t0 = time.perf_counter()
    with ray_session(job.cluster):
        trials = tune_trials(plan)
    results = summarize(plan, trials, wall_s=time.perf_counter() - t0)
    (plan.folder.local / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    plan.folder.push(RESULTS)
    log_best(plan, results["best"])
    print_table(results)
    if not results["best"]:
        print(f"seqfoundry sweep: error: no trial finished ({results['counts']}); see "
              f"{plan.folder.where(RESULTS)}", file=sys.stderr)
        return 1
    return 0


def best_trial(sweep_dir: str) -> dict:
    """The best trial's record in `<sweep_dir>/sweep_results.json` (its `package`, `wandb_run_id`, ...);
    `sweep_dir` may be a bucket URL."""
    path = as_path(sweep_dir) / RESULTS
    if not path.is_file():
        raise ConfigError(f"run.dir: {path} not found (run `seqfoundry sweep` first)")
    best = json.loads(path.read_text()).get("best")
    if not best:
        raise ConfigError(f"{path}: no trial of the sweep finished, so there is no best package")
    return best


# --- checks, before Ray -------------------------------------------------------------------

def plan_sweep(job: JobConfig) -> SweepPlan:
    check_sweep_config(job)
    folder = open_folder(job.run.dir, writable=True)  # a bucket that cannot be written stops here, in one line
    resume, job = job.resume, dataclasses.replace(absolute_paths(job), resume=False)  # trials decide their own
    s = job.sweep
    check_resumable(job, folder, resume=resume)
    check_validation_split(preflight_training(job, kind="finetune").manifest)  # data, package, resources
    name = sweep_name(job, folder)
    recipe = TrialRecipe(job=job, sweep=folder, group=job.tracking.group or name, storage=shared_storage(job, folder))
    domains = parse_space(s.space)
    for domain in domains:
        check_domain(recipe, domain)
    grace = s.grace_period or job.trainer.val_every
    return SweepPlan(job, folder, name, domains, num_trials(domains, s.num_samples, search=s.search), grace, recipe,
                     resume=resume)


def check_resumable(job: JobConfig, folder: RunFolder, *, resume: bool) -> None:
    tune_dir = tune_path(job, folder)
    if resume and not tune.Tuner.can_restore(tune_dir):
        raise ConfigError(f"resume: {tune_dir} holds no sweep to resume (start it without resume=true)")
    if resume:
        check_tune_state(tune_dir)
    root = as_path(folder.location)
    if not resume and ((root / RESULTS).exists() or (root / TUNE_DIR).exists()):
        raise ConfigError(f"run.dir: {folder.location} already holds a sweep; pass resume=true to continue it or "
                          "choose another run.dir")


def check_tune_state(tune_dir: str) -> None:
    """Tune restores from its newest `experiment_state-*.json`; when that file cannot be read, Tune logs the
    error and starts the sweep again from nothing. Refuse that in one line instead, naming the file."""
    states = sorted(as_path(tune_dir).glob("experiment_state-*.json"), key=lambda p: p.name)
    if not states:
        return
    try:
        json.loads(states[-1].read_text())
    except ValueError:
        raise ConfigError(f"resume: {states[-1]} is empty or torn (its driver died while writing it), so Tune "
                          "cannot continue this sweep; start it again in another run.dir") from None


def sweep_name(job: JobConfig, folder: RunFolder) -> str:
    """`sweep.name`, else the run folder's name."""
    return job.sweep.name or folder_name(folder.location)


def shared_storage(job: JobConfig, folder: RunFolder) -> str:
    """<cluster.storage_path>/<name>, where Tune's state and the trials' checkpoints go; empty = the run folder."""
    storage = job.cluster.storage_path
    return f"{storage.rstrip('/')}/{sweep_name(job, folder)}" if storage else ""


def tune_path(job: JobConfig, folder: RunFolder) -> str:
    """Tune's experiment folder: <cluster.storage_path>/<name>/tune, else <run.dir>/tune (a path or a URL)."""
    return f"{shared_storage(job, folder) or folder.location}/{TUNE_DIR}"


def check_sweep_config(job: JobConfig) -> None:
    """The checks that need no data or package (the pipeline runs them before its first stage)."""
    s = job.sweep
    if not s.space:
        raise ConfigError("sweep.space: empty; pick a preset (sweep=default, sweep=tiny) or add domains")
    for domain in parse_space(s.space):
        if domain.key.startswith(SET_BY_THE_SWEEP):
            raise ConfigError(f"sweep.space.{domain.key}: set by the sweep itself, it cannot be searched")
    grace = s.grace_period or job.trainer.val_every
    if s.scheduler == "asha" and not job.trainer.val_every:
        raise ConfigError("trainer.val_every: ASHA stops trials on their validation results; set it "
                          f"(e.g. trainer.val_every={max(1, job.trainer.max_steps // 10)}) or use sweep.scheduler=fifo")
    if s.scheduler == "asha" and grace > job.trainer.max_steps:
        raise ConfigError(f"sweep.grace_period: {grace} steps exceed trainer.max_steps={job.trainer.max_steps}")


def absolute_paths(job: JobConfig) -> JobConfig:
    """Tune runs each trial in its own working directory: every path the trials read is made absolute
    (bucket URLs stay URLs; a scheme without its fsspec backend is one line naming the key)."""
    def absolute(location: str, key: str) -> str:
        return open_folder(location, key=key).location if location else ""

    return dataclasses.replace(
        job, run=dataclasses.replace(job.run, dir=absolute(job.run.dir, "run.dir")),
        data=dataclasses.replace(job.data, dir=absolute(job.data.dir, "data.dir")),
        pretrained=absolute(job.pretrained, "pretrained"))


def check_validation_split(manifest: Manifest) -> None:
    if not manifest.split_samples("valid"):
        raise ConfigError(f"data.dir: {manifest.path} has no validation samples, and trials are ranked on them "
                          "(prepare with data.valid_fraction > 0)")


def check_domain(recipe: TrialRecipe, domain: Domain) -> None:
    """Every value a domain bounds must make a valid fine-tuning job (else one line naming the key)."""
    if domain.key.startswith(SET_BY_THE_SWEEP):
        raise ConfigError(f"sweep.space.{domain.key}: set by the sweep itself, it cannot be searched")
    if domain.key.startswith("model.") and domain.key != "model.dropout":
        raise ConfigError(f"sweep.space.{domain.key}: a fine-tune keeps the package's architecture; of model.* "
                          "only model.dropout can be searched")
    for value in domain.candidates():
        try:
            preflight_training(trial_job(recipe, {domain.key: value}, trial="trial_check"), kind="finetune")
        except ConfigError as err:
            where = f"sweep.space.{domain.key}"
            raise ConfigError(f"{where}: {value!r} is refused ({str(err).removeprefix(where + ': ')})") from err


# --- Ray Tune -------------------------------------------------------------------------------

def tune_trials(plan: SweepPlan) -> list:
    """Run the Tuner (or restore the interrupted one); returns Tune's Trial objects, finished, failed or stopped."""
    s = plan.job.sweep
    concurrency = trial_concurrency(plan.job)
    trainable = tune.with_parameters(run_trial, recipe=plan.recipe)
    trainable.__mixins__ = (AbortTrainingOnStop,)  # wrap_function adds it to the trainable class
    trainable = tune.with_resources(trainable, {"cpu": s.trial_cpus, "memory": s.trial_memory_mb * 2**20})
    param_space = nest({d.key: d.to_tune(search=s.search) for d in plan.domains})
    print(f"sweep {plan.name}: {plan.num_trials} trials over {', '.join(d.key for d in plan.domains)}; "
          f"{concurrency} at a time; {s.search} search; {describe_scheduler(plan)}; W&B group {plan.recipe.group}"
          + ("; resumed" if plan.resume else ""), flush=True)
    TrialLog.ended = []
    if plan.resume:  # finished trials keep their results; unfinished ones continue (from their checkpoints)
        tuner = tune.Tuner.restore(tune_path(plan.job, plan.folder), trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                        search_alg=search_algorithm(s, concurrency), scheduler=make_scheduler(plan),
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=plan.recipe.storage or plan.folder.location,
                                      failure_config=tune.FailureConfig(max_failures=0), callbacks=[TrialLog()],
                                      verbose=0))
    tuner.fit()  # a failed trial is recorded, never raised
    return TrialLog.ended


def search_algorithm(s: SweepConfig, max_concurrent: int):
    """The `sweep.search` algorithm, seeded by `sweep.seed` so that a sweep samples the same trials again:
    Tune's random/grid variant generator, or Optuna's TPE (OptunaSearch) limited to `max_concurrent`."""
    if s.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=s.seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=s.seed)


def trial_concurrency(job: JobConfig) -> int:
    """`sweep.max_concurrent`, or as many trials as the cluster's CPUs (and GPUs) hold at once."""
    import ray

    s, t = job.sweep, job.trainer
    if s.max_concurrent:
        return s.max_concurrent
    total = ray.cluster_resources()
    fits = total.get("CPU", 0.0) // (t.num_workers * t.cpus_per_worker + s.trial_cpus)
    if t.use_gpu:
        fits = min(fits, total.get("GPU", 0.0) // t.num_workers)
    return max(1, int(fits))


def make_scheduler(plan: SweepPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = plan.job.sweep
    if s.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr "step": rungs in optimizer steps; stop_last_trials=False lets a trial that reaches
    # max_steps write its package instead of being stopped at its final report.
    return ASHAScheduler(time_attr="step", max_t=plan.job.trainer.max_steps, grace_period=plan.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def describe_scheduler(plan: SweepPlan) -> str:
    s = plan.job.sweep
    if s.scheduler == "fifo":
        return f"every trial runs out; best {s.mode} {s.metric}"
    return (f"ASHA on {s.mode} {s.metric} (grace {plan.grace_period} steps, reduction {s.reduction_factor}, "
            f"max {plan.job.trainer.max_steps} steps)")


class TrialLog(tune.Callback):
    """One console line per trial event; keeps Tune's Trial objects for the results.

    `Tuner.restore` brings back the pickled callback of the interrupted run, not this process's
    instance, so the trials are kept on the class (`TrialLog.ended`): one sweep runs at a time per driver.
    """

    ended: list = []

    def on_trial_start(self, iteration, trials, trial, **info):
        values = " ".join(f"{k}={fmt(v)}" for k, v in flatten(trial.config).items())
        print(f"sweep: {trial_name(trial)} started ({values})", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = trial.last_result.get("step", 0)
        metrics = " ".join(f"{k} {fmt(trial.last_result[k])}" for k in REPORTED[1:] if k in trial.last_result)
        print(f"sweep: {trial_name(trial)} ended at step {step}: {metrics}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"sweep: {trial_name(trial)} failed: {trial_error(trial)}", flush=True)

    def on_experiment_end(self, trials, **info):
        TrialLog.ended = list(trials)


# --- results -------------------------------------------------------------------------------

def log_best(plan: SweepPlan, best: dict) -> None:
    """The best trial's package as the sweep's model artifact (`model-<sweep name>`, alias `best`),
    logged from the best trial's W&B run."""
    if not best:
        return
    spec = model_artifact(best["package"], name=f"model-{plan.name}", sweep=plan.name, trial=best["trial_id"],
                          metric=plan.job.sweep.metric, value=best["metrics"].get(plan.job.sweep.metric))
    trial = RunFolder(best["dir"])
    log_artifact(plan.job.tracking, spec, run_dir=trial.local, run_id=best["wandb_run_id"],
                 job_type="sweep-best", group=plan.recipe.group, aliases=("best",))
    trial.push("wandb")


def summarize(plan: SweepPlan, trials: list, *, wall_s: float) -> dict:
    s = plan.job.sweep
    records = [trial_record(plan, t) for t in trials]
    best = best_record(records, metric=s.metric, mode=s.mode)
    counts = {status: sum(r["status"] == status for r in records)
              for status in ("TERMINATED", "EARLY_STOPPED", "ERROR") if any(r["status"] == status for r in records)}
    return {"name": plan.name, "dir": plan.folder.location, "pretrained": plan.job.pretrained,
            "metric": s.metric, "mode": s.mode, "scheduler": s.scheduler, "space": s.space,
            "num_trials": len(records), "counts": counts, "wall_s": round(wall_s, 1),
            "best": best, "trials": records}


def best_record(records: list[dict], *, metric: str, mode: str) -> dict:
    """The best finished trial by `metric` ({} if none); a NaN or inf metric never wins."""
    finished = [r for r in records if r["status"] == "TERMINATED"
                and isinstance(r["metrics"].get(metric), (int, float)) and math.isfinite(r["metrics"][metric])]
    pick = min if mode == "min" else max
    return pick(finished, key=lambda r: r["metrics"][metric]) if finished else {}


def trial_record(plan: SweepPlan, trial) -> dict:
    """One trial: TERMINATED (ran out, package written), EARLY_STOPPED (by ASHA), ERROR, or Tune's status.
    Read where the trial's run folder lies (its bucket, for a bucket run.dir)."""
    location = plan.folder.where(trial_name(trial))
    folder = as_path(location)
    package = folder / "model"
    status = trial.status
    if status == "TERMINATED" and not (package / "model.safetensors").is_file():
        status = "EARLY_STOPPED"
    run_json = folder / RUN_INFO
    return {
        "trial_id": trial.trial_id, "dir": location, "status": status,
        "config": flatten(trial.config),
        "metrics": {k: trial.last_result[k] for k in REPORTED if k in trial.last_result},
        "error": trial_error(trial) if trial.status == "ERROR" else None,
        "package": str(package) if status == "TERMINATED" else None,
        "wandb_run_id": json.loads(run_json.read_text()).get("wandb_run_id") if run_json.is_file() else None,
    }


def trial_error(trial) -> str:
    """One line: the root exception of a failed trial and, through Ray Train, what its worker said."""
    error = trial.get_error()
    if error is None:
        return f"unknown error (see {TUNE_DIR}/{trial_name(trial)}/error.txt)"
    head, marker, snippet = str(error).partition(" Error Snippet]:")
    summary = failure_summary(head if marker else error).rstrip(":")
    if marker:  # a WorkerGroupError: rank N's own exception, or how its process died
        lines = [ln.strip() for ln in snippet.splitlines() if ln.strip()]
        raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
        died = [ln for ln in lines if "health check" in ln or "died" in ln]
        rank = head.rsplit("[", 1)[-1]
        summary += f" ({rank.lower()}: {raised[-1] if raised else ' '.join(died[:2]) or lines[0]})"
    return summary[:500]


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(results: dict) -> None:
    metric = results["metric"]
    keys = list(dict.fromkeys(k for t in results["trials"] for k in t["config"]))
    header = ["trial", "status", "step", metric, *keys]
    rows = [[f"trial_{t['trial_id']}", t["status"], fmt(t["metrics"].get("step", "-")),
             fmt(t["metrics"].get(metric, "-")), *(fmt(t["config"].get(k, "-")) for k in keys)]
            for t in results["trials"]]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    print()
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    for t in results["trials"]:
        if t["error"]:
            print(f"trial_{t['trial_id']}: {t['error']}")
    best = results["best"]
    if best:
        print(f"best: trial_{best['trial_id']} {metric} {fmt(best['metrics'][metric])}; package {best['package']}")
    print(f"sweep {results['name']}: {results['counts']} in {results['wall_s']:.0f}s; "
          f"{RunFolder(results['dir']).where(RESULTS)}")
