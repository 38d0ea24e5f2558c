"""`seqfoundry pipeline`: prepare → pretrain → sweep → evaluate the best trial,
with a lineage record (`pipeline.json`) linking every artifact to its parents.

    seqfoundry pipeline                                  # the tiny demo on the embedded default
    seqfoundry pipeline run.dir=runs/demo                # every stage's output under one folder
    seqfoundry pipeline run.dir=runs/demo                # again: finished stages are reused
    seqfoundry pipeline pipeline.data=data/tiny pretrained=runs/p1/model   # reuse outputs made elsewhere
    seqfoundry pipeline run.dir=s3://bucket/pipelines/demo                # every stage's output in a bucket

Layout: `<run.dir>/data`, `<run.dir>/pretrain` (a training run folder),
`<run.dir>/sweep` (trials), `<run.dir>/eval`, `<run.dir>/pipeline.json`; with
`pipeline.compare_scratch=true` also `<run.dir>/scratch` and `<run.dir>/scratch_eval`.
All stages share one Ray session and one W&B group.

`run.dir` may be a bucket URL (`s3://`, `gs://`): every stage is then a command
that writes to a bucket (prepare, pretrain, sweep, evaluate), a finished stage is
recognised by its output in the bucket, and `pipeline.json` is written in the
run folder's local mirror and pushed (`trainers.run_folder`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline.storage import as_path

from ..cluster import ray_session
from ..config import ConfigError, JobConfig, to_typed
from ..evaluation.result import EvalResult
from ..preflight import open_folder
from ..runs import RUN_INFO, folder_name
from .lineage import LineageGraph, log_to_wandb, make_record


@dataclass
class Folders:
    """The pipeline's folders, typed once: absolute local `Path`s, or `UPath`s under a bucket URL."""

    root: Path
    data: Path
    pretrain: Path
    sweep: Path
    eval: Path


def folders(job: JobConfig) -> Folders:
    root = location(job.run.dir, key="run.dir")
    data = location(job.pipeline.data, key="pipeline.data") if job.pipeline.data else root / "data"
    return Folders(root, data, root / "pretrain", root / "sweep", root / "eval")


def location(folder: str, *, key: str) -> Path:
    """A folder key as a typed path: an absolute `Path`, or a `UPath` for a bucket URL (ConfigError naming
    `key` for a scheme without its fsspec backend)."""
    return as_path(open_folder(folder, key=key).location)


def stage_job(job: JobConfig, *, run_dir: Path, data_dir: Path, **changes) -> JobConfig:
    """The job config one stage sees: its own run folder, the pipeline's data and W&B group."""
    return dataclasses.replace(
        job, run=dataclasses.replace(job.run, dir=str(run_dir)), data=dataclasses.replace(job.data, dir=str(data_dir)),
        tracking=dataclasses.replace(job.tracking, group=job.tracking.group or f"pipeline-{folder_name(job.run.dir)}"),
        **changes)


def evaluation_job(job: JobConfig, *, run_dir: Path, data_dir: Path, package: Path, **changes) -> JobConfig:
    """An evaluate stage's job: its run folder, the pipeline's data, `package`, and any other `eval.` changes."""
    staged = stage_job(job, run_dir=run_dir, data_dir=data_dir)
    return dataclasses.replace(staged, eval=dataclasses.replace(staged.eval, package=str(package), **changes))


def finetune_job(job: JobConfig, *, run_dir: Path, data_dir: Path, pretrained: str) -> JobConfig:
    """The sweep stage's job: fine-tuning trains on the prepared pairs as they are (objective `pairs`, as
    `seqfoundry sweep` defaults to), whatever objective the pretraining stage noised text with, for
    `pipeline.finetune_steps` steps when set."""
    steps = job.pipeline.finetune_steps or job.trainer.max_steps
    return stage_job(job, run_dir=run_dir, data_dir=data_dir, pretrained=pretrained,
                     objective=dataclasses.replace(job.objective, name="pairs"),
                     trainer=dataclasses.replace(job.trainer, max_steps=steps))


def run(job: JobConfig) -> int:
    f = folders(job)
    check_stages(job, f)  # every stage's config, before the first stage starts
    root = open_folder(job.run.dir, writable=True)  # a bucket that cannot be written stops here, in one line
    group = job.tracking.group or f"pipeline-{f.root.name}"
    lineage = LineageGraph(root, group=group)
    with ray_session(job.cluster):
        data = stage_prepare(job, f, lineage)
        pretrained = stage_pretrain(job, f, lineage, data)
        finetuned = stage_sweep(job, f, lineage, data, pretrained)
        results = stage_evaluate(job, f, lineage, data, finetuned)
        gain = stage_scratch(job, f, lineage, data, results) if job.pipeline.compare_scratch else None
    for record in lineage.records.values():
        log_to_wandb(job.tracking, lineage, record, run_dir=root.local)
    root.push("wandb")
    lineage.write()
    print_results(results, lineage)
    if gain:
        print_gain(gain)
    return 0


def check_stages(job: JobConfig, f: Folders) -> None:
    """The config checks of every stage that will run (ConfigError), before any of them runs.

    What needs a stage's output (the prepared data, the pretrained package) is checked by that
    stage's own preflight when it starts.
    """
    from ..evaluation.command import strategies
    from ..evaluation.during_training import refuse_remote_checkpoints
    from ..preflight import check_training_config
    from ..sweep.command import check_sweep_config

    stages = job.pipeline.stages
    trains = ("pretrain" in stages and not job.pretrained) or job.pipeline.compare_scratch
    if trains and job.eval.during_training:  # the pretrain and scratch stages' checkpoints lie under run.dir
        refuse_remote_checkpoints(job.cluster.storage_path or str(f.root))
    if "pretrain" in stages and not job.pretrained:
        check_training_config(stage_job(job, run_dir=f.pretrain, data_dir=f.data, pretrained=""), kind="pretrain")
    if "sweep" in stages and not job.pipeline.finetuned:
        sweep = finetune_job(job, run_dir=f.sweep, data_dir=f.data, pretrained=str(job.pretrained or f.pretrain))
        check_sweep_config(sweep)
        check_training_config(sweep, kind="finetune")
    if "evaluate" in stages:
        strategies(job)


# --- stages -----------------------------------------------------------------------------

def stage_prepare(job: JobConfig, f: Folders, lineage: LineageGraph) -> Path:
    from data_pipeline.prepare import plan as plan_prepare

    from ..prepare import run as prepare

    stage = stage_job(job, run_dir=f.root, data_dir=f.data)
    reused = bool(job.pipeline.data) or "prepare" not in job.pipeline.stages
    if not reused:
        try:
            reused = plan_prepare(stage.data).up_to_date  # the same inputs were prepared before
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if not reused:
        check(prepare(stage), "prepare")
    if not (f.data / "manifest.json").is_file():
        raise ConfigError(f"pipeline.data: {f.data} has no manifest.json (run the prepare stage or name a folder)")
    lineage.add(make_record("data", "dataset", f.data, parents=[], wandb_run_id=None, reused=reused))
    return f.data


def stage_pretrain(job: JobConfig, f: Folders, lineage: LineageGraph, data: Path) -> Path:
    from ..train import train

    if job.pretrained:
        package, reused, run_id = location(job.pretrained, key="pretrained"), True, None
    else:
        package = f.pretrain / "model"
        reused = (package / "model.safetensors").is_file() or "pretrain" not in job.pipeline.stages
        if not reused:
            check(train(stage_job(job, run_dir=f.pretrain, data_dir=data, pretrained=""), kind="pretrain"), "pretrain")
        run_id = run_json(f.pretrain).get("wandb_run_id")
    if not (package / "model.safetensors").is_file():
        raise ConfigError(f"pretrained: {package} is not a model package (run the pretrain stage or name one)")
    lineage.add(make_record("pretrained", "model", package, parents=["data"], wandb_run_id=run_id, reused=reused))
    return package


def stage_sweep(job: JobConfig, f: Folders, lineage: LineageGraph, data: Path, pretrained: Path) -> Path:
    from ..sweep.command import best_trial, run as sweep

    if job.pipeline.finetuned:
        package, reused, run_id = location(job.pipeline.finetuned, key="pipeline.finetuned"), True, None
    else:
        results = f.sweep / "sweep_results.json"
        reused = results.is_file() or "sweep" not in job.pipeline.stages
        if not reused:
            check(sweep(finetune_job(job, run_dir=f.sweep, data_dir=data, pretrained=str(pretrained))), "sweep")
        best = best_trial(str(f.sweep))
        package, run_id = as_path(best["package"]), best.get("wandb_run_id")
    lineage.add(make_record("finetuned", "model", package, parents=["pretrained", "data"], wandb_run_id=run_id,
                            reused=reused))
    return package


def stage_evaluate(job: JobConfig, f: Folders, lineage: LineageGraph, data: Path, finetuned: Path) -> EvalResult:
    from ..evaluation.command import run as evaluate

    results = f.eval / "eval_results.json"
    reused = results.is_file() or "evaluate" not in job.pipeline.stages
    if not reused:
        check(evaluate(evaluation_job(job, run_dir=f.eval, data_dir=data, package=finetuned)), "evaluate")
    if not results.is_file():
        raise ConfigError(f"pipeline.stages: {results} missing (run the evaluate stage)")
    loaded = EvalResult.from_json(json.loads(results.read_text()))
    lineage.add(make_record("evaluation", "results", results, parents=["finetuned", "data"],
                            wandb_run_id=loaded.wandb_run_id, reused=reused))
    return loaded


def stage_scratch(job: JobConfig, f: Folders, lineage: LineageGraph, data: Path, results: EvalResult) -> dict:
    """`pipeline.compare_scratch`: the best trial's fine-tune again from random weights, evaluated with the
    first strategy; what pretraining gained goes into `pipeline.json` (metadata `pretraining_gain`)."""
    from ..evaluation.command import run as evaluate
    from ..sweep.command import best_trial
    from ..train import train

    strategy = str(job.eval.strategies[0]).strip()  # its row name in the results
    package, eval_dir = f.root / "scratch" / "model", f.root / "scratch_eval"
    reused = (package / "model.safetensors").is_file()
    if not reused:
        check(train(scratch_job(job, f, data, best_trial(str(f.sweep))), kind="pretrain"), "scratch")
    if not (eval_dir / "eval_results.json").is_file():
        check(evaluate(evaluation_job(job, run_dir=eval_dir, data_dir=data, package=package,
                                      strategies=[strategy], baseline="none")), "scratch evaluation")
    scratch = EvalResult.from_json(json.loads((eval_dir / "eval_results.json").read_text()))
    gain = pretraining_gain(results, scratch, strategy=strategy)
    lineage.metadata["pretraining_gain"] = gain
    lineage.add(make_record("scratch", "model", package, parents=["data"],
                            wandb_run_id=run_json(f.root / "scratch").get("wandb_run_id"), reused=reused,
                            metadata={"pretraining_gain": gain}))
    return gain


def scratch_job(job: JobConfig, f: Folders, data: Path, best: dict) -> JobConfig:
    """The best trial's config (its sampled values over the sweep's) with random initial weights and nothing
    frozen: a frozen random embedding would handicap the comparison, not measure pretraining."""
    cfg = OmegaConf.structured(finetune_job(job, run_dir=f.root / "scratch", data_dir=data, pretrained=""))
    for key, value in (best.get("config") or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.trainer.freeze = "none"
    cfg.resume = False
    return to_typed(cfg)


def pretraining_gain(pretrained: EvalResult, scratch: EvalResult, *, strategy: str) -> dict:
    """BLEU, chrF and test loss of the pipeline's fine-tuned model and of the same fine-tune from scratch;
    `gain` is positive where pretraining helped (higher BLEU/chrF, lower loss)."""
    def row(r: EvalResult) -> dict[str, float]:
        m = r.strategies[strategy]
        return {"bleu": m["bleu"], "chrf": m["chrf"], "loss": r.loss}

    a, b = row(pretrained), row(scratch)
    return {"strategy": strategy, "pretrained": a, "scratch": b,
            "gain": {"bleu": a["bleu"] - b["bleu"], "chrf": a["chrf"] - b["chrf"], "loss": b["loss"] - a["loss"]}}


def print_gain(gain: dict) -> None:
    a, b, g = gain["pretrained"], gain["scratch"], gain["gain"]
    print(f"\npretraining gain ({gain['strategy']}, same fine-tune from random weights):")
    print(f"{'':<12}{'BLEU':>8}{'chrF':>8}{'loss':>8}")
    for name, r in (("pretrained", a), ("scratch", b)):
        print(f"{name:<12}{r['bleu']:>8.2f}{r['chrf']:>8.2f}{r['loss']:>8.3f}")
    print(f"{'gain':<12}{g['bleu']:>+8.2f}{g['chrf']:>+8.2f}{g['loss']:>+8.3f}")


# --- helpers ------------------------------------------------------------------------------

def check(code: int, stage: str) -> None:
    if code != 0:
        raise SystemExit(f"seqfoundry pipeline: stage {stage} failed (exit {code}); finished stages are reused "
                         "when the same command runs again")


def run_json(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def print_results(results: EvalResult, lineage: LineageGraph) -> None:
    """The pipeline ends with the evaluation's table: decoding strategies x metrics."""
    from ..evaluation.command import print_table
    from ..evaluation.config import COPY_BASELINE

    print()
    print_table(results)
    for name, margin in results.margins(COPY_BASELINE).items():
        print(f"{name}: BLEU {margin['bleu']:+.2f}, chrF {margin['chrf']:+.2f} over copying the source")
    print(f"lineage: {lineage.path} ({len(lineage.records)} artifacts)")
