"""The evaluation actor: load a model once, decode a paired dataset with a list
of strategies, score the outputs.

    spec = EvalSpec(data_dir=..., split="test", strategies=strategy_configs([...]), eval=job.eval,
                    package="runs/p1/model")
    actor = EvaluationActor.remote(spec)                  # loads the package and the pairs once
    results = ray.get(actor.evaluate.remote())            # strategies x metrics, samples, outputs
    actor.evaluate_checkpoint.remote(step, ckpt_dir)      # during training: consolidate, evaluate, log

`Evaluator` does the work in any process (tests use it directly); the Ray
actor wraps it and adds what a long-lived evaluator of checkpoints needs:
restart on death (Ray re-runs the constructor and retries the task), results
appended to `<run.dir>/eval_metrics.jsonl` (a step already there is not
evaluated again) and a W&B run whose metrics use the training step as x axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from data_pipeline import EOS_ID, Manifest, ShardStream, detokenize, load_tokenizer
from data_pipeline.storage import as_path, local_copy
from trainers.decoding import DecodingConfig, Hypothesis
from trainers.engines import Engine, TorchEngine, load_engine
from trainers.export import export_package
from trainers.models import ModelConfig, build_model
from trainers.package import TOKENIZER, Lineage, PackageError, load_package, sha256_file

from ..tracking import TrackingConfig, finish_run, open_wandb
from .config import COPY_BASELINE, EvalConfig
from .metrics import baseline_metrics, perplexity, strategy_metrics
from .result import EvalResult

TORCH = ("torch", "float32")
MAX_RESTARTS = 3
"""Times Ray restarts a dead evaluation actor (its constructor runs again)."""
MAX_TASK_RETRIES = 3
"""Times Ray retries an evaluation whose actor died while running it."""
CHECKPOINT_METRICS = "eval_metrics.jsonl"
STATUS = "eval_status.json"


@dataclass
class EvalSpec:
    """What an evaluator needs, built on the driver (picklable)."""

    data_dir: str
    """Prepared folder holding source/target pairs."""
    split: str
    strategies: dict[str, DecodingConfig]
    eval: EvalConfig
    package: str = ""
    """The model package to evaluate, loaded once; empty = checkpoints of `model` come later."""
    model: ModelConfig | None = None
    """Architecture of the checkpoints (during training)."""
    tokenizer: str = ""
    """tokenizer.json of the model; empty = the package's."""
    max_source_len: int = 1024
    """Longer sources are cut (eos kept) and counted."""
    verify: str = "sha256"
    """How the data's shards are checked before reading (`sha256` or `size`)."""
    run_dir: str = ""
    """Training run folder: checkpoint results, status file and W&B run go there."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    wandb_run_id: str = ""
    """W&B run of checkpoint evaluations (kept across actor restarts)."""
    engines: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Strategy name -> (engine, compute_type) it decodes with; a strategy not listed uses (torch, float32)."""


# --- the paired dataset ----------------------------------------------------------------

@dataclass
class EvalPairs:
    keys: list[str]
    src: list[list[int]]
    """Source ids + eos, cut to the source limit."""
    tgt: list[list[int]]
    """Reference ids + eos (what `model.score` scores)."""
    sources: list[str]
    references: list[str]
    info: dict
    """dir, split, manifest sha256, counts."""

    def __len__(self) -> int:
        return len(self.keys)


def load_pairs(spec: EvalSpec, tokenizer) -> EvalPairs:
    """The first `eval.max_samples` pairs of the split, in corpus order (no shuffling)."""
    manifest = Manifest.load(spec.data_dir)
    stream = ShardStream(manifest.path, rank=0, world_size=1, seed=0, shuffle=False, split=spec.split,
                         verify=spec.verify)
    limit = spec.eval.max_samples or None
    pairs = EvalPairs([], [], [], [], [], {})
    truncated = 0
    for sample in stream:
        if limit is not None and len(pairs) >= limit:
            break
        src, tgt = [int(t) for t in sample["src"]], [int(t) for t in sample["tgt"]]
        truncated += len(src) + 1 > spec.max_source_len
        pairs.keys.append(sample["__key__"])
        pairs.src.append(src[: spec.max_source_len - 1] + [EOS_ID])
        pairs.tgt.append(tgt + [EOS_ID])
        pairs.sources.append(detokenize(tokenizer, src))
        pairs.references.append(detokenize(tokenizer, tgt))
    pairs.info = {"dir": str(manifest.folder), "split": spec.split, "manifest_sha256": sha256_file(manifest.path),
                  "task": manifest.task, "num_samples": len(pairs), "split_samples": manifest.split_samples(spec.split),
                  "truncated_sources": truncated}
    return pairs


# --- the evaluator ----------------------------------------------------------------------

class Evaluator:
    """A model, its tokenizer and a paired dataset, loaded once; `evaluate()` any number of times."""

    def __init__(self, spec: EvalSpec, *, device: str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.tokenizer = load_tokenizer(local_copy(spec.tokenizer or as_path(spec.package) / TOKENIZER))
        if spec.package:
            self.model = load_package(spec.package).to(self.device)
        elif spec.model is not None:
            self.model = build_model(spec.model).eval().to(self.device)
        else:
            raise ValueError("EvalSpec: needs a package or a model config")
        self._engines: dict[tuple[str, str], Engine] = {}  # converted packages (CTranslate2), loaded once
        self.pairs = load_pairs(spec, self.tokenizer)
        if not len(self.pairs):
            raise ValueError(f"eval.split: no pairs in split {spec.split!r} of {spec.data_dir}")
        self.position_cap = self.model.max_positions or 2**31

    def load_checkpoint(self, checkpoint_dir: str | Path, *, step: int) -> None:
        """Consolidate a DeepSpeed checkpoint (any ZeRO stage) and load its fp32 weights."""
        with tempfile.TemporaryDirectory(prefix="seqfoundry-eval-") as tmp:
            package = export_package(checkpoint_dir, Path(tmp) / "model", model_cfg=self.model.config,
                                     tokenizer=self.spec.tokenizer, lineage=Lineage(step=step))
            self.model = load_package(package).to(self.device)
        self.position_cap = self.model.max_positions or 2**31

    def evaluate(self) -> EvalResult:
        """Every strategy's metrics, teacher-forced perplexity, and the decoded outputs."""
        t0 = time.perf_counter()
        runs = {name: self.decode_all(cfg, name=name, engine=self.engine_of(name))
                for name, cfg in self.spec.strategies.items()}
        texts = {name: [detokenize(self.tokenizer, h.tokens) for h in best] for name, (best, _) in runs.items()}
        strategies, signatures = {}, {}
        for name, cfg in self.spec.strategies.items():
            best, seconds = runs[name]
            greedy = self.greedy_twin(cfg, runs, engine=self.engine_of(name)) if cfg.strategy == "beam" else None
            strategies[name], signatures[name] = strategy_metrics(
                texts[name], self.pairs.references, best, seconds, greedy=greedy, length_penalty=cfg.length_penalty)
        ppl = perplexity(*self.sum_logprob())
        names = list(self.spec.strategies)  # `runs` may also hold greedy twins
        outputs = [{"key": key, "source": source, "reference": reference,
                    "outputs": {name: {"text": texts[name][i], "score": runs[name][0][i].score,
                                            "length": len(runs[name][0][i].tokens)} for name in names}}
                   for i, (key, source, reference) in enumerate(
                       zip(self.pairs.keys, self.pairs.sources, self.pairs.references))]
        return EvalResult(
            dataset=self.pairs.info, perplexity=ppl["ppl"], loss=ppl["loss"],
            counts={"samples": len(self.pairs), "reference_tokens": ppl["tokens"],
                    "truncated_sources": self.pairs.info["truncated_sources"]},
            strategies=strategies, signatures=signatures,
            decoding={name: dataclasses.asdict(cfg) for name, cfg in self.spec.strategies.items()},
            samples=[{"key": o["key"], "source": o["source"], "reference": o["reference"],
                      **{name: o["outputs"][name]["text"] for name in names}}
                     for o in outputs[: self.spec.eval.num_examples]],
            baselines=self.baselines(), outputs=outputs, elapsed_s=time.perf_counter() - t0)

    def baselines(self) -> dict[str, dict[str, float]]:
        """The rows that need no model: copying each source (`eval.baseline`; auto = for restoration data)."""
        wanted = self.spec.eval.baseline
        if wanted == "copy" or (wanted == "auto" and self.pairs.info.get("task") == "restore"):
            return {COPY_BASELINE: baseline_metrics(self.pairs.sources, self.pairs.references)}
        return {}

    def engine_of(self, name: str) -> tuple[str, str]:
        return self.spec.engines.get(name, TORCH)

    def engine(self, key: tuple[str, str]) -> Engine:
        """The engine of `key` = (engine, compute_type): the loaded model for torch, a converted package else."""
        if key == TORCH:
            return TorchEngine(self.model, device=str(self.device))
        if key not in self._engines:
            self._engines[key] = load_engine(self.spec.package, engine=key[0], compute_type=key[1],
                                             device=self.device.type, key="eval")
        return self._engines[key]

    def decode_all(self, cfg: DecodingConfig, *, name: str = "",
                   engine: tuple[str, str] = TORCH) -> tuple[list[Hypothesis], list[float]]:
        """Best hypothesis of every source (dataset order) and the seconds of each decode call.

        Sources are decoded in batches of similar length (outputs do not depend on batching).
        A progress bar (sources decoded) goes to stderr when it is a terminal, as `prepare`'s does.
        """
        order = sorted(range(len(self.pairs)), key=lambda i: len(self.pairs.src[i]))
        best: list[Hypothesis | None] = [None] * len(order)
        seconds = []
        bar = progress_bar(len(order), desc=f"evaluate {name or cfg.strategy}")
        decoder = self.engine(engine)
        for chunk in _chunks(order, self.spec.eval.batch_size):
            sources = [self.pairs.src[i] for i in chunk]
            t0 = time.perf_counter()
            hyps = decoder.decode(sources, cfg)
            seconds.append(time.perf_counter() - t0)
            for i, h in zip(chunk, hyps):
                best[i] = h[0]
            bar.update(len(chunk))
        bar.close()
        return best, seconds

    def greedy_twin(self, cfg: DecodingConfig, runs: dict, *, engine: tuple[str, str] = TORCH
                    ) -> list[Hypothesis]:
        """Greedy outputs under beam config `cfg`'s limits and engine: a listed greedy run's, or decoded now."""
        twin = DecodingConfig(strategy="greedy", beam_size=1, n_best=1, max_len=cfg.max_len, max_len_a=cfg.max_len_a,
                              max_len_b=cfg.max_len_b, min_len=cfg.min_len,
                              no_repeat_ngram_size=cfg.no_repeat_ngram_size)
        for name, other in self.spec.strategies.items():
            if other.strategy == "greedy" and _limits(other) == _limits(twin) and self.engine_of(name) == engine:
                return runs[name][0]
        key = f"_greedy_twin{_limits(twin)}{engine}"
        if key not in runs:
            runs[key] = self.decode_all(twin, engine=engine)
        return runs[key][0]

    def sum_logprob(self) -> tuple[float, int]:
        """Teacher-forced sum of reference log-probabilities (`model.score`) and reference tokens (eos included)."""
        order = sorted(range(len(self.pairs)), key=lambda i: len(self.pairs.tgt[i]))
        total, tokens = 0.0, 0
        for chunk in _chunks(order, self.spec.eval.batch_size):
            src, src_lengths = self.pad([self.pairs.src[i] for i in chunk])
            tgt, tgt_lengths = self.pad([self.pairs.tgt[i][: self.position_cap] for i in chunk])
            with torch.no_grad():
                total += float(self.model.score(src, src_lengths, tgt, tgt_lengths).sum())
            tokens += int(tgt_lengths.sum())
        return total, tokens

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad with 0: (B, L) ids and (B,) lengths on the evaluator's device."""
        lengths = torch.tensor([len(r) for r in rows])
        out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # (B, L)
        for row, ids in zip(out, rows):
            row[: len(ids)] = torch.tensor(ids)
        return out.to(self.device), lengths.to(self.device)


def progress_bar(total: int, *, desc: str):
    """Sources decoded: Ray's tqdm inside an actor (the driver draws it), else tqdm on stderr (a terminal)."""
    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit="src")
    from tqdm import tqdm

    return tqdm(total=total, unit="src", desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)


def _limits(cfg: DecodingConfig) -> tuple:
    return cfg.max_len, cfg.max_len_a, cfg.max_len_b, cfg.min_len, cfg.no_repeat_ngram_size


def _chunks(items: list[int], size: int):
    for start in range(0, len(items), size):
        yield items[start: start + size]


# --- the Ray actor -----------------------------------------------------------------------

@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
class EvaluationActor:
    """A long-lived evaluator.  Ray restarts it when its process dies and retries the running task."""

    def __init__(self, spec: EvalSpec):
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        device = "cuda" if spec.eval.use_gpu and torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.evaluator = Evaluator(spec, device=device)
        self.log = CheckpointLog(spec) if spec.run_dir else None

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self) -> EvalResult:
        """Evaluate the loaded package (or the last loaded checkpoint)."""
        return self.evaluator.evaluate()

    def evaluate_checkpoint(self, step: int, path: str) -> dict[str, Any]:
        """Consolidate the checkpoint in `path`, evaluate it and log the results against `step`.

        Idempotent: a step already in eval_metrics.jsonl is returned as it was
        logged, so a retried or repeated request costs nothing.
        """
        if self.log is None:
            raise ValueError("evaluate_checkpoint: the actor was made without a run_dir")
        done = self.log.find(step)
        if done is not None:
            return done
        self.log.status(step=step, state="running", checkpoint=path)
        try:
            self.evaluator.load_checkpoint(path, step=step)
        except (PackageError, OSError) as err:  # e.g. deleted by keep_last before its turn came
            row = {"step": step, "checkpoint": path, "skipped": " ".join(str(err).split())[:300]}
            self.log.status(step=step, state="idle")
            return self.log.append(row, results=None)
        results = self.evaluator.evaluate()
        row = self.log.append({"step": step, "checkpoint": path, **results.summary()}, results=results)
        self.log.status(step=step, state="idle")
        return row

    def finish(self) -> list[dict]:
        """Close the W&B run; every logged row of eval_metrics.jsonl."""
        if self.log is None:
            return []
        self.log.close()
        return self.log.rows()


class CheckpointLog:
    """eval_metrics.jsonl, eval_status.json and the W&B run of checkpoint evaluations."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self.run_dir = Path(spec.run_dir)
        self.path = self.run_dir / CHECKPOINT_METRICS
        self.wandb = None

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def find(self, step: int) -> dict | None:
        return next((r for r in self.rows() if r["step"] == step), None)

    def append(self, row: dict, *, results: EvalResult | None) -> dict:
        row = {**row, "time": time.time()}
        with open(self.path, "a") as f:  # first: W&B being down must not lose the results
            f.write(json.dumps(row) + "\n")
        if results is not None:
            self.log_wandb(row["step"], results)
        return row

    def status(self, *, step: int, state: str, checkpoint: str = "") -> None:
        """What the evaluator is doing now (`running` a step, or `idle`), with its pid."""
        status = {"state": state, "step": step, "checkpoint": checkpoint, "pid": os.getpid(), "time": time.time()}
        tmp = self.run_dir / f".{STATUS}.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.run_dir / STATUS)

    def log_wandb(self, step: int, results: EvalResult) -> None:
        if self.spec.tracking.resolved_mode() == "disabled":
            return
        if self.wandb is None:
            self.wandb = open_wandb(self.spec.tracking, run_dir=self.run_dir, run_id=self.spec.wandb_run_id,
                                    name=f"{self.run_dir.name}-eval", job_type="eval",
                                    config={"strategies": results.decoding, "dataset": results.dataset})
            self.wandb.define_metric("train_step")
            self.wandb.define_metric("eval/*", step_metric="train_step")
        self.wandb.log({"train_step": step, **results.wandb_metrics(), "eval/samples": samples_table(results)})

    def close(self) -> None:
        if self.wandb is not None:
            finish_run(self.wandb)
            self.wandb = None


# --- W&B tables ----------------------------------------------------------------------------

def samples_table(results: EvalResult):
    """W&B table: key, source, reference, then one hypothesis column per strategy."""
    import wandb

    names = list(results.strategies)
    rows = [[s["key"], s["source"], s["reference"], *(s[n] for n in names)] for s in results.samples]
    return wandb.Table(columns=["key", "source", "reference", *names], data=rows)


def metrics_table(results: EvalResult):
    """W&B table: one row per strategy, one column per metric."""
    import wandb

    names = list(results.strategies)
    columns = list(next(iter(results.strategies.values())))
    rows = [[n, *(results.strategies[n][c] for c in columns)] for n in names]
    return wandb.Table(columns=["strategy", *columns], data=rows)
