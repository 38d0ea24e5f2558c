"""The per-worker training loop that Ray Train runs on every rank.

It reads like a checklist: build the model → wrap it with DeepSpeed → restore
the last checkpoint → stream this rank's batches → step, log, validate,
checkpoint.  Rank awareness lives in the arguments (`rank`, `world_size` from
the Ray Train context) and in rank 0's tracker; nothing else asks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from data_pipeline import Batch, DataConfig, ObjectiveConfig, Progress, build_batcher, data_loader

from . import checkpoint as ckpt
from .config import ChaosConfig, DeepSpeedConfig, TrainerConfig
from .engine import build_engine
from .models import ModelConfig, Seq2SeqModel, build_model
from .package import load_package
from .run_folder import RunFolder
from .selection import RANK_KEY, checkpoint_rank, observe
from .throughput import StepTimer, device_peak_flops
from .val_samples import SampleRow, ValidationSamples, scores
from .watchdog import StallWatchdog


@dataclass
class WorkerJob:
    """Everything a worker needs, as typed slices (pickled to every rank by Ray)."""

    model: ModelConfig
    trainer: TrainerConfig
    deepspeed: DeepSpeedConfig
    data: DataConfig
    objective: ObjectiveConfig
    chaos: ChaosConfig
    run_dir: str
    """`run.dir`: a local path or an object-storage URL (worked on through a local mirror, see run_folder)."""
    pretrained: str = ""
    """Model package whose weights initialise the model (fine-tuning)."""
    make_tracker: Callable[..., Any] | None = None
    """Rank 0 calls make_tracker(resume_from_step=...) to get an object with log/commit/summary/table/alert/finish."""
    checkpoint_root: str = ""
    """Where Ray Train persists the checkpoints (<storage>/checkpoints)."""
    on_checkpoint: Callable[..., Any] | None = None
    """Rank 0 calls on_checkpoint(step=, path=) after each checkpoint is persisted (must not block)."""
    wandb_run_id: str = ""
    """The run's one W&B run id, kept in every checkpoint."""
    config_sha256: str = ""
    """Hash of the config that defines the training, kept in every checkpoint."""


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config={"job": WorkerJob})`."""
    job: WorkerJob = config["job"]
    # The trainer decides, not the environment the driver passed on (ray_session defaults it to cpu).
    os.environ["DS_ACCELERATOR"] = "cuda" if job.trainer.use_gpu else "cpu"
    # DeepSpeed calls torch.distributed's deprecated collectives every step: keep the console readable.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import ray.train

    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as folder:
        worker = Worker(job, rank=context.get_world_rank(), world_size=context.get_world_size(), checkpoint=folder)
    worker.run()


class Worker:
    """One rank: its DeepSpeed engine, its batches, its state; rank 0 also owns the run's sink."""

    def __init__(self, job: WorkerJob, *, rank: int, world_size: int, checkpoint: str | None = None):
        self.job, self.rank, self.world_size = job, rank, world_size
        self.cfg = job.trainer
        self.run_folder = RunFolder(job.run_dir)
        self.run_folder.local.mkdir(parents=True, exist_ok=True)
        self.sink = RunSink(job, self.run_folder) if rank == 0 else NullSink()
        torch.set_num_threads(self.cfg.cpus_per_worker)
        self.on_gpu = self.cfg.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.consumed = Progress()  # stream positions of the batches trained on this epoch
        self.dropped = self.truncated = 0  # over-long samples seen by this rank
        self.bad_samples = 0  # bad samples this rank's stream skipped (counted where they were read)
        self.unreadable: set[str] = set()  # shards found unreadable while this rank read them
        self.grad_norm = 0.0  # before clipping, of the last optimizer step (ZeRO-0 only; else DeepSpeed's)
        self.bad_steps = 0  # batches skipped for a non-finite loss on some rank (trainer.max_bad_steps)
        self.nan_fired = False  # chaos.nan_at_step poisons one batch once
        self.validated: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the last validation
        saved_world = ckpt.saved_world_size(checkpoint) if checkpoint else world_size
        self.load_universal = saved_world != world_size and job.deepspeed.zero_stage > 0
        self.model, self.num_parameters, self.num_frozen = self.build_model()
        self.engine, self.precision = build_engine(self.model, self.cfg, job.deepspeed, world_size=world_size,
                                                   on_gpu=self.on_gpu, load_universal=self.load_universal)
        self.batcher = build_batcher(job.data, job.objective, rank=rank, world_size=world_size, seed=self.cfg.seed)
        self.state = ckpt.TrainState(wandb_run_id=job.wandb_run_id, config_sha256=job.config_sha256,
                                     world_size=world_size)
        self.peak = device_peak_flops(on_gpu=self.on_gpu, precision=self.precision, configured=self.cfg.peak_flops)
        self.samples = ValidationSamples.load(job.data, job.objective, seed=self.cfg.seed,
                                              count=max(self.cfg.val_samples, self.cfg.val_metric_samples))
        if checkpoint:
            self.restore(checkpoint)

    # --- setup ---------------------------------------------------------------

    def build_model(self) -> tuple[Seq2SeqModel, int, int]:
        """The model (a package's weights when fine-tuning), frozen parts applied; identical on every rank."""
        ckpt.seed_everything(self.cfg.seed)  # identical initial weights on every rank
        model = build_model(self.job.model)  # the job's config: a fine-tune's own dropout
        if self.job.pretrained:
            model.load_state_dict(load_package(self.job.pretrained).state_dict())
        num_parameters = model.num_parameters()  # before ZeRO-3 partitions the weights
        num_frozen = freeze_parameters(model, self.cfg.freeze)  # before the optimizer sees them
        ckpt.seed_everything(self.cfg.seed + 1000 * self.rank)  # distinct dropout per rank
        return model.train(), num_parameters, num_frozen

    def restore(self, folder: str) -> None:
        """Continue from a checkpoint folder (a Ray Train restart or `resume=true`).

        On another world size with ZeRO >= 1, rank 0 first converts the
        checkpoint to DeepSpeed's universal format (under <run.dir>/universal),
        which every rank then loads with its new partitioning.
        """
        universal = self.universal_copy(folder) if self.load_universal else None
        state, data_states = ckpt.load(self.engine, folder, rank=self.rank, universal=universal)
        same_world = state.world_size == self.world_size
        self.batcher.load_state_dict(data_states[self.rank] if same_world else data_states)
        self.state = ckpt.TrainState(**{**state.__dict__, "world_size": self.world_size})
        if not same_world:
            ckpt.seed_everything(self.cfg.seed + 1000 * self.rank + self.state.step)

    def universal_copy(self, folder: str) -> Path:
        name = f"universal/{Path(folder).name}"
        out = self.run_folder.local / name
        self.sink.convert_universal(folder, name)
        dist.barrier()
        if not (out / "latest").is_file():
            self.run_folder.pull(name)  # converted on another node: read it from the remote run folder
        return out

    def record_placement(self) -> None:
        """`<run.dir>/workers.json`: the Ray node, host and pid of every rank (written by rank 0)."""
        import ray

        me = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
              "hostname": socket.gethostname(), "pid": os.getpid()}
        ranks = [me]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, me)
        self.sink.workers(ranks)

    # --- the loop --------------------------------------------------------------

    def run(self) -> None:
        self.record_placement()
        self.sink.open(step=self.state.step, summary={
            "parameters": self.num_parameters, "world_size": self.world_size, "precision": self.precision,
            "peak_flops": self.peak, "frozen_parameters": self.num_frozen})
        try:
            self.train_to_max_steps()
        except Exception as err:  # rank 0 alerts; Ray Train then restarts the group or gives up
            self.sink.failed(err)
            raise
        self.sink.close()

    def train_to_max_steps(self) -> None:
        batches = self.batches()
        timer, window = StepTimer(), Window()
        start_step, t_start = self.state.step, time.perf_counter()
        while self.state.step < self.cfg.max_steps and not self.state.stopped_early:
            loss, tokens = self.train_step(batches, timer)
            self.state.step += 1
            window.add(loss, tokens)
            self.after_step(timer, window, start_step, t_start)
            self.sink.step_done()
        if self.validation_at(self.state.step) is None:  # an early stop has just validated this step
            self.validate_and_log()
        if self.state.step > start_step:  # a restore at max_steps re-saving step_N: Ray Train would delete it
            self.save_checkpoint(final=True)

    def train_step(self, batches: Iterator[Batch], timer: StepTimer) -> tuple[float, int]:
        """One optimizer step: `grad_accum_steps` micro-batches, then DeepSpeed's step."""
        total_loss, total_tokens, micro = 0.0, 0, 0
        while micro < self.cfg.grad_accum_steps:
            batch = next(batches).to(self.device)
            timer.data_ready()
            loss = self.chaos_nan(self.engine(batch.src, batch.src_lengths, batch.tgt_in, labels=batch.tgt_out,
                                              label_smoothing=self.cfg.label_smoothing))
            if not all_finite(loss):  # the same answer on every rank: all skip it, DeepSpeed never sees it
                self.skip_bad_batch()
                continue
            micro += 1
            self.engine.backward(loss)
            if self.job.deepspeed.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                self.grad_norm = total_grad_norm(self.model)  # DeepSpeed records it only under ZeRO
            self.engine.step()
            tokens = batch.num_tokens
            total_loss, total_tokens = total_loss + loss.item() * tokens, total_tokens + tokens
            timer.step_done(src_tokens=int(batch.src_lengths.sum()), tgt_tokens=tokens, samples=len(batch),
                            flops=self.train_flops(batch))
        return total_loss / max(total_tokens, 1), total_tokens

    def skip_bad_batch(self) -> None:
        """Count a batch whose loss is non-finite on some rank (skipped before its backward, so no gradient
        and no update); one more than `trainer.max_bad_steps` aborts the run."""
        self.bad_steps += 1
        console(f"step {self.state.step + 1}: non-finite loss on some rank, batch skipped "
                f"({self.bad_steps}/{self.cfg.max_bad_steps} tolerated)")
        if self.bad_steps > self.cfg.max_bad_steps:
            raise FloatingPointError(f"trainer.max_bad_steps: {self.bad_steps} batches with a non-finite loss "
                                     f"(latest at step {self.state.step + 1}) exceed trainer.max_bad_steps="
                                     f"{self.cfg.max_bad_steps}; lower trainer.lr or check the data")

    def chaos_nan(self, loss: torch.Tensor) -> torch.Tensor:
        """`chaos.nan_at_step`: this rank's loss becomes NaN once, at that step."""
        chaos = self.job.chaos
        if self.nan_fired or self.state.step + 1 != chaos.nan_at_step or self.rank != chaos.nan_rank:
            return loss
        self.nan_fired = True
        console(f"chaos: NaN loss on rank {self.rank} at step {chaos.nan_at_step}")
        return loss * float("nan")

    def train_flops(self, batch: Batch) -> float:
        counts = self.model.flops(batch.src.size(1), batch.tgt_in.size(1))
        return counts.training(int(batch.src_lengths.sum()), batch.num_tokens)

    def batches(self) -> Iterator[Batch]:
        """This rank's batches forever, epoch after epoch; records what was consumed."""
        loader = data_loader(self.batcher, num_workers=self.job.data.num_workers, pin_memory=self.on_gpu)
        epoch = self.batcher.stream.epoch
        while True:
            self.batcher.set_epoch(epoch)
            self.consumed = Progress()
            for batch in loader:
                self.consumed.update(batch.indices)
                self.dropped += batch.num_dropped
                self.truncated += batch.num_truncated
                self.bad_samples += batch.num_bad_samples
                self.unreadable.update(batch.bad_shards)
                yield batch
            epoch += 1

    def after_step(self, timer: StepTimer, window: "Window", start_step: int, t_start: float) -> None:
        step, improved = self.state.step, False
        if step % self.cfg.log_every == 0:
            self.log_train(timer, window, start_step, t_start)
        if self.cfg.val_every and step % self.cfg.val_every == 0 and step < self.cfg.max_steps:
            improved = self.validate_and_log()
        finishing = step >= self.cfg.max_steps or self.state.stopped_early  # the final checkpoint follows
        if (step % self.cfg.checkpoint_every == 0 or improved) and not finishing:
            self.save_checkpoint(final=False)  # an improvement is kept as a checkpoint: the package may be it
        self.maybe_fail()

    # --- logging, validation -----------------------------------------------------

    def log_train(self, timer: StepTimer, window: "Window", start_step: int, t_start: float) -> None:
        loss, tokens = all_reduce_mean(window.loss_sum, window.tokens)
        rates = timer.summary(world_size=self.world_size, peak_flops=self.peak)
        self.state.tokens_seen += int(tokens)
        window.reset()
        if not self.sink.active:
            return
        metrics = {
            "loss": loss, "ppl": math.exp(min(loss, 50.0)), "lr": self.engine.get_lr()[0],
            "grad_norm": float(self.grad_norm if self.job.deepspeed.zero_stage == 0
                               else self.engine.get_global_grad_norm() or 0.0), **rates,
            "epoch": self.batcher.stream.epoch, "memory_mb": rss_mb(),
            **({"gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20} if self.on_gpu else {}),
            "skipped_shards": len(self.unreadable.union(self.batcher.stream.bad_shards)),
            "bad_samples": self.bad_samples,
            "dropped_samples": self.dropped, "truncated_samples": self.truncated, "bad_steps": self.bad_steps,
        }
        self.sink.log(self.state.step, metrics,
                      line=progress_line(self.state.step, self.cfg.max_steps, metrics, start_step, t_start))

    def validate_and_log(self) -> bool:
        """Validation on every rank; rank 0 logs it; Ray Train (and Ray Tune above it) receives it.
        True when it improved `trainer.best_metric` (the same answer on every rank: the metrics are reduced)."""
        import ray.train

        metrics = self.validate()
        if not metrics:
            return False
        shown, scored = self.decode_samples()
        metrics.update(scored)
        self.validated = (self.state.step, dict(metrics))
        improved = observe(self.state, self.cfg, metrics)
        if self.state.best_value is not None:
            metrics[f"best_{self.cfg.best_metric}"] = self.state.best_value
        ray.train.report({"step": self.state.step, **metrics})
        line = " ".join(f"{k} {v:.4f}" if k.endswith("val_loss") else f"{k} {v:.2f}" for k, v in metrics.items())
        if self.state.stopped_early:
            line += f"; no better {self.cfg.best_metric} in {self.cfg.patience} validations (trainer.patience): stop"
        self.sink.log(self.state.step, metrics, line=f"step {self.state.step}: {line}")
        self.sink.samples(self.state.step, shown)
        return improved

    def validation_at(self, step: int) -> dict[str, float] | None:
        """The metrics of the validation made at `step`, if the last one was."""
        return self.validated[1] if self.validated and self.validated[0] == step else None

    def decode_samples(self) -> tuple[list[SampleRow], dict[str, float]]:
        """Greedy outputs of the fixed validation sources (every rank, the same ones) and, with
        `trainer.val_metric_samples`, their BLEU and chrF."""
        if self.samples is None:
            return [], {}
        rows = self.samples.decode(self.model, zero_stage=self.job.deepspeed.zero_stage, model_cfg=self.job.model)
        scored = rows[: self.cfg.val_metric_samples]
        return rows[: self.cfg.val_samples], scores(scored) if scored else {}

    def validate(self) -> dict[str, float]:
        """Token-weighted loss on the `valid` split (this rank's share), reduced over ranks."""
        try:
            batcher = build_batcher(self.job.data, self.job.objective, rank=self.rank,
                                    world_size=self.world_size, seed=self.cfg.seed, split="valid")
        except (ValueError, FileNotFoundError):
            return {}  # no validation split prepared
        batches = list(itertools.islice(batcher, self.cfg.val_batches))
        loss_sum, tokens = 0.0, 0
        self.engine.eval()
        with torch.no_grad():
            for batch in batches[: equal_count(len(batches))]:  # ZeRO-3: every forward is a collective
                batch = batch.to(self.device)
                loss = self.engine(batch.src, batch.src_lengths, batch.tgt_in, labels=batch.tgt_out)
                loss_sum += loss.item() * batch.num_tokens
                tokens += batch.num_tokens
        self.engine.train()
        loss, _ = all_reduce_mean(loss_sum, tokens)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # --- checkpoints and chaos -----------------------------------------------------

    def save_checkpoint(self, *, final: bool) -> None:
        """Every rank saves its part; Ray Train merges them into one checkpoint folder."""
        import ray.train
        from ray.train import Checkpoint

        if not all_finite(*(getattr(p, "ds_tensor", p) for p in self.model.parameters())):  # ZeRO-3: own shard
            raise FloatingPointError(f"trainer: non-finite weights at step {self.state.step}; no checkpoint written")
        self.state.rng = ckpt.capture_rng()
        self.state.data = self.batcher.state_dict(consumed=self.consumed)
        with tempfile.TemporaryDirectory(prefix="seqfoundry-ckpt-") as folder:
            tag = ckpt.save(self.engine, folder, self.state, rank=self.rank)
            metrics = {"step": self.state.step, "tag": tag, "final": final,
                       RANK_KEY: checkpoint_rank(self.cfg, self.validation_at(self.state.step), self.state.step)}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=tag)
        self.sink.checkpoint_saved(step=self.state.step, tag=tag)

    def maybe_fail(self) -> None:
        """`chaos.fail_at_step`: SIGKILL this worker once (a marker file remembers it fired)."""
        chaos = self.job.chaos
        if not chaos.fail_at_step or self.state.step != chaos.fail_at_step or self.rank != chaos.fail_rank:
            return
        marker = self.run_folder.local / ".chaos_fired"
        if marker.exists():
            return
        marker.write_text(f"killed rank {self.rank} after step {self.state.step}\n")
        console(f"chaos: killing rank {self.rank} (pid {os.getpid()}) after step {self.state.step}")
        os.kill(os.getpid(), signal.SIGKILL)


RANK0_FILES = ("metrics.jsonl", "workers.json", "wandb")
"""What rank 0 writes into the run folder (pushed at every checkpoint when run.dir is remote, so that the
offline W&B runs of a machine that dies are in the bucket too)."""

class RunSink:
    """Rank 0's side effects, in one place: the tracker (metrics.jsonl + W&B), the run folder's own
    files (pulled on resume, pushed at every checkpoint when run.dir is remote), workers.json, the
    universal-checkpoint conversion and the on-checkpoint hook.  Other ranks hold a `NullSink`."""

    active = True

    def __init__(self, job: WorkerJob, folder: RunFolder):
        self.job, self.folder = job, folder
        self.tracker = None
        self.watchdog: StallWatchdog | None = None

    def open(self, *, step: int, summary: dict[str, Any]) -> None:
        self.folder.pull(*RANK0_FILES)  # a resume on another machine continues the run's own files
        self.tracker = self.job.make_tracker(resume_from_step=step)
        self.tracker.summary(summary)
        if self.job.trainer.stall_alert_s:
            self.watchdog = StallWatchdog(self.job.trainer.stall_alert_s, self.stalled).start()

    def log(self, step: int, metrics: dict[str, Any], *, line: str) -> None:
        self.tracker.log(step, metrics)
        console(line)
        bad = {k: v for k, v in metrics.items() if k in ("loss", "val_loss") and not math.isfinite(v)}
        if bad:  # detection only: skipping or aborting bad steps is the trainer's (trainer.max_bad_steps)
            self.tracker.alert("non-finite loss", f"{self.run_name()} step {step}: "
                               + ", ".join(f"{k}={v}" for k, v in bad.items()))

    def samples(self, step: int, rows: list[SampleRow]) -> None:
        """The validation samples: a W&B table (source, reference, output, step) and two on the console."""
        if not rows:
            return
        self.tracker.table(step, "val_samples", ["source", "reference", "output", "step"],
                           [[r.source, r.reference, r.output, step] for r in rows])
        for r in rows[:2]:
            console(f"step {step} sample: {r.source[:80]!r} -> {r.output[:80]!r} (reference {r.reference[:80]!r})")

    def step_done(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    def stalled(self, seconds: float) -> None:
        self.tracker.alert("training stalled", f"{self.run_name()}: no optimizer step completed for "
                           f"{seconds:.0f}s (trainer.stall_alert_s={self.job.trainer.stall_alert_s:g})")

    def failed(self, err: BaseException) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        text = " ".join(f"{type(err).__name__}: {err}".split())[:500]
        self.tracker.alert("run failed", f"{self.run_name()}: {text}", level="ERROR")

    def run_name(self) -> str:
        return self.job.run_dir.rstrip("/").rsplit("/", 1)[-1]

    def workers(self, ranks: list[dict]) -> None:
        (self.folder.local / "workers.json").write_text(json.dumps(ranks, indent=2) + "\n")
        self.folder.push("workers.json")

    def convert_universal(self, checkpoint: str, name: str) -> None:
        ckpt.to_universal(checkpoint, self.folder.local / name)
        self.folder.push(name)  # ranks on other nodes read it from the remote run folder

    def checkpoint_saved(self, *, step: int, tag: str) -> None:
        self.tracker.commit()  # the history up to this checkpoint survives a kill (metrics.jsonl already does)
        self.folder.push(*RANK0_FILES)
        if self.job.on_checkpoint is not None:
            self.job.on_checkpoint(step=step, path=f"{self.job.checkpoint_root}/{tag}")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.tracker.finish()
        self.folder.push(*RANK0_FILES)


class NullSink:
    """What ranks other than 0 hold instead of a RunSink: every side effect is rank 0's."""

    active = False

    def open(self, *, step: int, summary: dict[str, Any]) -> None: ...
    def log(self, step: int, metrics: dict[str, Any], *, line: str) -> None: ...
    def samples(self, step: int, rows: list[SampleRow]) -> None: ...
    def step_done(self) -> None: ...
    def failed(self, err: BaseException) -> None: ...
    def workers(self, ranks: list[dict]) -> None: ...
    def convert_universal(self, checkpoint: str, name: str) -> None: ...
    def checkpoint_saved(self, *, step: int, tag: str) -> None: ...
    def close(self) -> None: ...


FROZEN_PREFIXES = {
    "none": (),
    "embeddings": ("embed.", "enc_pos.", "dec_pos."),
    "encoder": ("encoder.", "enc_norm.", "enc_pos."),
}
"""`trainer.freeze` -> parameter-name prefixes (Transformer and RNN models share these module names)."""


def freeze_parameters(model: torch.nn.Module, what: str) -> int:
    """`requires_grad_(False)` on the parameters `trainer.freeze` names; returns how many values it froze."""
    frozen = 0
    for name, param in model.named_parameters():
        if name.startswith(FROZEN_PREFIXES[what]):
            param.requires_grad_(False)
            frozen += param.numel()
    if what != "none" and not frozen:
        raise ValueError(f"trainer.freeze: {what!r} matches no parameter of a {model.config.arch} model")
    return frozen


@dataclass
class Window:
    """Token-weighted loss since the last log line."""

    loss_sum: float = 0.0
    tokens: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum += loss * tokens
        self.tokens += tokens

    def reset(self) -> None:
        self.loss_sum, self.tokens = 0.0, 0


def equal_count(count: int) -> int:
    """The smallest `count` over ranks: token-budget batching gives ranks unequal validation batch counts,
    and under ZeRO-3 a rank that runs one forward more than the others waits forever."""
    t = torch.tensor([count], dtype=torch.long)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether these tensors are finite on every rank (one all-reduced flag; ZeRO-3's empty placeholders count
    as finite, their shards are checked by the rank that owns them)."""
    bad = any(t.numel() and not bool(torch.isfinite(t.detach()).all()) for t in tensors)
    t = torch.tensor([float(bad)])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return not t.item()


def all_reduce_mean(weighted_sum: float, weight: float) -> tuple[float, float]:
    """(sum over ranks of weighted_sum) / (sum of weight), and the total weight."""
    t = torch.tensor([weighted_sum, float(weight)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    total, count = t.tolist()
    return total / max(count, 1.0), count


def total_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of all gradients (already all-reduced across ranks at the boundary)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


def console(line: str) -> None:
    """One line on the worker's stdout (Ray streams it to the driver once; Ray Train's
    patched `print` would log it a second time)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def progress_line(step: int, max_steps: int, m: dict[str, float], start_step: int, t_start: float) -> str:
    elapsed = time.perf_counter() - t_start
    left = elapsed / max(step - start_step, 1) * (max_steps - step)
    return (f"step {step}/{max_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"tok/s {m['tokens_per_s']:,.0f} mfu {m['mfu']:.1%} eta {left:,.0f}s")
