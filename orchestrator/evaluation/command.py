"""`seqfoundry evaluate package=<model package>`: decode a paired dataset with
every strategy of `eval.strategies` in the evaluation actor, then write
`<run.dir>/eval_results.json`, `<run.dir>/eval_outputs.jsonl`, a W&B run with
tables of sample outputs and metrics, and print strategies x metrics.

    seqfoundry evaluate package=runs/p1/model                          # the package's data, test split
    seqfoundry evaluate package=runs/p1/model data.dir=data/mypairs eval.split=valid eval.max_samples=200
    seqfoundry evaluate package=runs/p1/model 'eval.strategies=[greedy,"beam:beam_size=10"]' decoding.max_len=64

Data: `data.dir` when given; otherwise the folder the package was trained on
(`data.dir` of the run's config.yaml next to the package).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data_pipeline.storage import as_path, local_copy
from trainers.decoding import DecodingConfig
from trainers.models import max_positions
from trainers.package import read_lineage, read_model_config, sha256_file

from ..cluster import ray_session
from ..config import ConfigError, JobConfig, load_job_config
from ..preflight import check_package, check_pairs, load_manifest, open_folder
from ..runs import config_container, folder_name, write_config
from ..tracking import TrackingConfig, finish_run, new_run_id, open_wandb
from .actor import EvalSpec, metrics_table, samples_table
from .presets import strategy_configs, strategy_engines
from .result import EvalResult

FROM_PACKAGE = "@package"
"""`data.dir` value meaning "the data the package was trained on" (the evaluate command's default)."""
RESULTS = "eval_results.json"
OUTPUTS = "eval_outputs.jsonl"


def run(job: JobConfig) -> int:
    spec = plan_evaluation(job)  # every check, before Ray starts
    folder = open_folder(job.run.dir, writable=True)  # an object-storage run.dir is written locally, then uploaded
    write_config(folder.local, config_container(job))
    print(f"evaluate: {spec.package} on {spec.data_dir} ({spec.split}), strategies {', '.join(spec.strategies)}",
          file=sys.stderr)
    with ray_session(job.cluster):
        results = evaluate_in_actor(spec, num_cpus=job.eval.num_cpus, use_gpu=job.eval.use_gpu)
    results.package = package_info(spec.package)
    results.wandb_run_id = log_to_wandb(job.tracking, results, folder.local, package=job.eval.package)
    write_results(results, folder.local)
    folder.push("config.yaml", OUTPUTS, "wandb", RESULTS)  # the results last: they mark the evaluation done
    print_table(results)
    print(f"results in {folder.where(RESULTS)}")
    return 0


def evaluate_in_actor(spec: EvalSpec, *, num_cpus: float, use_gpu: bool) -> EvalResult:
    """One evaluation in a fresh EvaluationActor (Ray must be initialised)."""
    import ray

    from .actor import EvaluationActor

    actor = EvaluationActor.options(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0).remote(spec)
    try:
        return ray.get(actor.evaluate.remote())
    finally:
        ray.kill(actor)


# --- checks --------------------------------------------------------------------------

def plan_evaluation(job: JobConfig) -> EvalSpec:
    """The actor's spec: package, data folder, split and strategies, all checked (ConfigError)."""
    package = check_package(job.eval.package, key="eval.package")
    data_dir = data_for(package, job.data.dir)
    split = job.eval.split or "test"
    check_data(data_dir, split, package)
    source_len = job.data.batch.max_source_len
    configs = strategies(job)
    engines = strategy_engines(list(configs), engine=job.eval.engine, compute_type=job.eval.compute_type)
    check_engines(package, engines, configs, device="cuda" if job.eval.use_gpu else "cpu")
    return EvalSpec(data_dir=data_dir, split=split, strategies=configs, eval=job.eval, package=str(package),
                    max_source_len=min(source_len, max_positions(read_model_config(package)) or source_len),
                    verify=job.data.verify, engines=engines)


def check_engines(package: Path, engines: dict[str, tuple[str, str]], configs: dict[str, DecodingConfig], *,
                  device: str) -> None:
    """Every strategy's engine can run this package and express its decoding config (ConfigError)."""
    from trainers.engines import check_engine, translate_options
    from trainers.export_ct2 import check_exportable, vocabulary

    model = read_model_config(package)
    for name, (engine, compute_type) in engines.items():
        if engine == "torch":
            continue
        try:
            check_engine(engine, compute_type, key="eval", device=device)
            check_exportable(model)
            translate_options(configs[name], vocabulary(local_copy(package / "tokenizer.json"), model.vocab_size))
        except ValueError as err:
            raise ConfigError(f"eval.strategies: {name!r}: {err}") from None


SAVED_DATA_SCHEMES = ("file", "s3", "gs")
"""The locations evaluate follows when a package's own config.yaml names its data (never http or others)."""


def data_for(package: Path, data_dir: str) -> str:
    """`data.dir` as given, or (FROM_PACKAGE) the data.dir of the run that wrote the package."""
    if data_dir != FROM_PACKAGE:
        return data_dir
    config = package.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"data.dir: cannot tell which data {package} was trained on (no {config}); "
                          "pass data.dir=<prepared folder>")
    found = load_job_config(local_copy(config)).data.dir
    if "://" in found and found.split("://", 1)[0] not in SAVED_DATA_SCHEMES:
        raise ConfigError(f"data.dir: {config} names {found}; a saved data.dir must be a local, file://, s3:// "
                          "or gs:// location (pass data.dir=<prepared folder>)")
    expected = read_lineage(package).data_manifest_sha256
    manifest = as_path(found) / "manifest.json"
    if expected and manifest.is_file() and sha256_file(manifest) != expected:
        print(f"evaluate: warning: {manifest} changed since {package} was trained", file=sys.stderr)
    return found


def check_data(data_dir: str, split: str, package: Path) -> None:
    """Pairs in `split`, tokenized with the package's tokenizer."""
    from trainers.package import PackageError, check_compatible

    manifest = load_manifest(data_dir)
    check_pairs(manifest, split)
    try:
        check_compatible(package, tokenizer_json=manifest.local_tokenizer_path(), vocab_size=manifest.vocab_size)
    except PackageError as err:
        raise ConfigError(f"data.dir: {err} (prepare the pairs with data.tokenizer={package}/tokenizer.json)") from None


def strategies(job: JobConfig) -> dict[str, DecodingConfig]:
    try:
        return strategy_configs(list(job.eval.strategies), job.decoding)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --- outputs ---------------------------------------------------------------------------

def package_info(package: str) -> dict:
    path = as_path(package)
    return {"path": str(path), "model_sha256": sha256_file(path / "model.safetensors"),
            "arch": read_model_config(path).arch, "lineage": read_lineage(path).__dict__}


def write_results(results: EvalResult, run_dir: Path) -> None:
    """eval_results.json (everything but the outputs) and eval_outputs.jsonl (one line per source)."""
    (run_dir / RESULTS).write_text(json.dumps(results.to_json(), indent=2) + "\n")
    with open(run_dir / OUTPUTS, "w") as f:
        for row in results.outputs:
            f.write(json.dumps(row) + "\n")


def log_to_wandb(tracking: TrackingConfig, results: EvalResult, run_dir: Path, *, package: str) -> str | None:
    """A W&B run of job type `evaluate`: metrics, a metrics table and a table of sample outputs."""
    if tracking.resolved_mode() == "disabled":
        return None
    run_id = new_run_id()
    run = open_wandb(tracking, run_dir=run_dir, run_id=run_id, name=f"eval-{folder_name(str(Path(package).parent))}",
                     job_type="evaluate", config={"package": package, "dataset": results.dataset,
                                                  "strategies": results.decoding})
    metrics = results.wandb_metrics()
    run.log({**metrics, "eval/samples": samples_table(results), "eval/metrics": metrics_table(results)})
    run.summary.update(metrics)
    finish_run(run)
    return run_id


COLUMNS = (("bleu", "BLEU", "{:.2f}"), ("chrf", "chrF", "{:.2f}"), ("exact_match", "exact", "{:.1%}"),
           ("avg_len", "len", "{:.1f}"), ("tokens_per_s", "tok/s", "{:,.0f}"), ("latency_ms", "ms/batch", "{:.1f}"),
           ("search_error_rate", "search err", "{:.1%}"))


def print_table(results: EvalResult) -> None:
    """Strategies x metrics, then perplexity and the sacreBLEU signatures."""
    width = max(10, *(len(n) + 2 for n in (*results.strategies, *results.baselines)))
    print(f"{'strategy':<{width}}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS))
    for name, metrics in results.strategies.items():
        cells = [fmt.format(metrics[key]) if metrics.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        print(f"{name:<{width}}" + "".join(f"{c:>12}" for c in cells))
    for name, metrics in results.baselines.items():  # needs no model: only the quality columns
        cells = [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in COLUMNS]
        print(f"{name:<{width}}" + "".join(f"{c:>12}" for c in cells))
    print(f"{results.counts['samples']} pairs of {results.dataset['dir']} ({results.dataset['split']}); "
          f"teacher-forced perplexity {results.perplexity:.3f}")
    first = next(iter(results.signatures.values()))
    print(f"BLEU {first['bleu']}\nchrF {first['chrf']}")
