"""Typed configuration slices of the distributed trainer."""

from __future__ import annotations

from dataclasses import dataclass


FREEZE = ("none", "embeddings", "encoder")
"""What `trainer.freeze` may leave untrained."""

SCHEDULES = ("cosine", "linear", "polynomial", "inverse_sqrt", "constant")
"""Learning-rate decays after the linear warm-up (`trainer.schedule`)."""

BEST_METRICS = {"val_loss": "min", "val_ppl": "min", "val_bleu": "max", "val_chrf": "max"}
"""Validation metrics `trainer.best_metric` may select checkpoints by, with the direction that is better."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps of the run (a resumed run continues up to this step)."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks), one DeepSpeed engine each."""
    cpus_per_worker: int = 1
    """CPU cores reserved per worker (also its torch thread count)."""
    use_gpu: bool = False
    """One GPU per worker; NCCL and bf16 are then chosen automatically."""
    placement_strategy: str = "PACK"
    """How Ray places the workers on nodes: `PACK` (fill a node first), `SPREAD` (across nodes when it can)
    or `STRICT_SPREAD` (each worker on its own node, or the run waits)."""
    micro_batch_size: int = 32
    """Most samples in one worker's micro-batch (the token budget may make it smaller)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Samples per optimizer step across workers; 0 = micro_batch_size x grad_accum_steps x num_workers.
    When set it must equal that product (DeepSpeed's batch triple)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to `lr`."""
    schedule: str = "cosine"
    """Decay after warm-up: `cosine`, `linear` or `polynomial` (each from lr to `min_lr_ratio` x lr at
    max_steps), `inverse_sqrt` (lr x sqrt(warmup_steps / step)) or `constant`."""
    min_lr_ratio: float = 0.1
    """End of the cosine, linear and polynomial decays, as a fraction of `lr` (0 decays to zero)."""
    power: float = 1.0
    """Exponent of the `polynomial` decay: lr_end + (lr - lr_end) x (1 - progress) ** power, where
    lr_end = min_lr_ratio x lr and progress runs from 0 after warm-up to 1 at max_steps (1.0 = `linear`)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training loss, in [0, 1): the target puts 1 - eps on the label and eps spread
    evenly over the vocabulary (as `F.cross_entropy(label_smoothing=eps)`); validation loss stays unsmoothed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    precision: str = "auto"
    """`auto` (bf16 on GPUs that support it, else fp32), `fp32`, `bf16` or `fp16`."""
    seed: int = 0
    """Seed of model init, dropout and the data order."""
    log_every: int = 10
    """Log metrics every this many steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides the latest: the newest ones, or with `best_metric` the best validated ones
    (Ray Train always keeps the latest too, for resume)."""
    best_metric: str = "val_loss"
    """Validation metric that picks the checkpoint the package is made from: `val_loss`, `val_ppl`, `val_bleu`
    or `val_chrf` (the two last need `val_metric_samples`), or `none` (the last step). A validation that
    improves it saves a checkpoint at that step, and checkpoints are kept best-first."""
    patience: int = 0
    """Stop the run after this many validations in a row without an improvement of `best_metric`
    (0 = never; needs `val_every`). The package is still the best checkpoint."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one worker's device, the denominator of `mfu`; 0 = look it up (known GPUs) or
    measure a float32 matmul (CPU)."""
    val_every: int = 0
    """Validation loss and perplexity every this many steps (0 = only at the end)."""
    val_batches: int = 20
    """Validation batches per evaluation."""
    val_samples: int = 8
    """Fixed validation sources decoded greedily at each validation: a W&B table (source, reference, output,
    step) and two of them on the console (0 = off). Every rank decodes the same sources (ZeRO-3: from a
    gathered copy of the weights), rank 0 logs them."""
    val_metric_samples: int = 0
    """Fixed validation sources decoded greedily at each validation to report `val_bleu` and `val_chrf`
    (sacreBLEU); 0 = off. A sweep ranked on val_bleu/val_chrf sets it from `sweep.metric_samples`."""
    stall_alert_s: float = 1800.0
    """Alert (console line, and wandb.alert when online) when no optimizer step completes for this many
    seconds (a watchdog thread on rank 0); 0 = off."""
    max_failures: int = 2
    """Times Ray Train restarts the worker group after a worker dies."""
    max_bad_steps: int = 10
    """Batches with a non-finite loss (NaN or inf on any rank) tolerated: each is skipped on every rank before
    its backward (no gradient, no update, counted in `bad_steps`); one more aborts the run (0 = abort at the
    first)."""
    collective_timeout_s: int = 300
    """Seconds a collective (all-reduce, barrier) may wait for a lost rank before the job fails
    (Ray Train's `TorchConfig(timeout_s=...)`; torch's default is 30 minutes)."""
    freeze: str = "none"
    """Parameters left untrained when fine-tuning: `none`, `embeddings` (the shared token embedding, which is
    also the output projection, and learned position tables) or `encoder` (every encoder layer and norm)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "num_workers", "cpus_per_worker", "micro_batch_size",
                    "grad_accum_steps", "log_every", "checkpoint_every", "keep_last"):
            _positive(key, getattr(self, key))
        if self.global_batch_size and self.global_batch_size != self.derived_global_batch():
            raise ValueError(
                f"trainer.global_batch_size: {self.global_batch_size} != micro_batch_size x grad_accum_steps "
                f"x num_workers = {self.micro_batch_size} x {self.grad_accum_steps} x {self.num_workers}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"trainer.schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.power > 0:
            raise ValueError(f"trainer.power: must be > 0, got {self.power}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"trainer.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError("trainer.placement_strategy: must be PACK, SPREAD or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        if self.val_samples < 0 or self.val_metric_samples < 0 or self.stall_alert_s < 0:
            raise ValueError("trainer.val_samples/val_metric_samples/stall_alert_s: must be >= 0, got "
                             f"{self.val_samples}, {self.val_metric_samples}, {self.stall_alert_s}")
        if self.max_bad_steps < 0 or self.collective_timeout_s < 1:
            raise ValueError("trainer.max_bad_steps/collective_timeout_s: need max_bad_steps >= 0 and "
                             f"collective_timeout_s >= 1, got {self.max_bad_steps}, {self.collective_timeout_s}")
        self.check_selection()
        if self.freeze not in FREEZE:
            raise ValueError(f"trainer.freeze: must be one of {', '.join(FREEZE)}, got {self.freeze!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"trainer.precision: must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("trainer.lr/warmup_steps/min_lr_ratio: need lr > 0, warmup_steps >= 0, "
                             f"0 <= min_lr_ratio <= 1 (got {self.lr}, {self.warmup_steps}, {self.min_lr_ratio})")

    def check_selection(self) -> None:
        if self.best_metric != "none" and self.best_metric not in BEST_METRICS:
            raise ValueError(f"trainer.best_metric: must be none or one of {', '.join(BEST_METRICS)}, "
                             f"got {self.best_metric!r}")
        if self.best_metric in ("val_bleu", "val_chrf") and not self.val_metric_samples:
            raise ValueError(f"trainer.best_metric: {self.best_metric} needs trainer.val_metric_samples > 0")
        if self.patience < 0 or self.peak_flops < 0:
            raise ValueError(f"trainer.patience/peak_flops: must be >= 0, got {self.patience}, {self.peak_flops}")
        if self.patience and (not self.val_every or self.best_metric == "none"):
            raise ValueError("trainer.patience: needs trainer.val_every > 0 and a trainer.best_metric")

    @property
    def best_mode(self) -> str:
        """`min` or `max`: which direction of `best_metric` is better."""
        return BEST_METRICS.get(self.best_metric, "min")

    def derived_global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-Offload; stage >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-Infinity; stage 3 only)."""
    allow_rnn_zero3: bool = False
    """Let LSTM/GRU models train under ZeRO-3 (refused by default, see `check_zero3`)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params: needs deepspeed.zero_stage=3")


@dataclass
class ChaosConfig:
    fail_at_step: int = 0
    """Kill one worker process with SIGKILL once, right after this step (0 = never); for resume tests."""
    fail_rank: int = 0
    """Which rank `fail_at_step` kills."""
    nan_at_step: int = 0
    """Make the loss of the first batch of this step NaN on rank `nan_rank` (0 = never); for the
    non-finite-loss tests (`trainer.max_bad_steps`)."""
    nan_rank: int = 0
    """Which rank `nan_at_step` poisons."""


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"trainer.{key}: must be >= 1, got {value}")
