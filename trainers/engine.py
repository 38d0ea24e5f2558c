"""Distribution is one step applied to a finished model: `build_engine` turns
the typed trainer slices into a DeepSpeed config and wraps the model.

The optimizer (AdamW, torch's implementation) and the learning-rate schedule
are created here and handed to `deepspeed.initialize`, so every ZeRO stage
and the CPU accelerator use the same update rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import DeepSpeedConfig, TrainerConfig
from .models import Seq2SeqModel


def resolve_precision(trainer: TrainerConfig, *, on_gpu: bool) -> str:
    """`auto` -> bf16 on a GPU that supports it, else fp32 (the CPU path stays exact)."""
    if trainer.precision != "auto":
        return trainer.precision
    if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(trainer: TrainerConfig, ds: DeepSpeedConfig, *, world_size: int,
                     precision: str, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for this job (batch triple, ZeRO, precision, clipping)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # packages come from fp32 masters
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum_steps,
        "train_batch_size": trainer.micro_batch_size * trainer.grad_accum_steps * world_size,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our logger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming a checkpoint saved on another world size
        config["checkpoint"] = {"load_universal": True}
    if ds.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # keep torch's AdamW on the CPU too
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def lr_lambda(trainer: TrainerConfig):
    """Multiplier of `trainer.lr` at each step: linear warm-up, then the chosen decay.

    `step` counts optimizer steps from 0.  Warm-up: (step + 1) / warmup_steps.
    After it, with progress = (step - warmup) / (max_steps - warmup) in [0, 1]
    and floor = min_lr_ratio: cosine floor + (1 - floor) (1 + cos(pi progress)) / 2;
    linear and polynomial floor + (1 - floor) (1 - progress) ** power (power 1
    for linear; HF's `get_polynomial_decay_schedule_with_warmup`, fairseq's
    `polynomial_decay`); inverse_sqrt sqrt(warmup / (step + 1)); constant 1.
    """
    warmup, total, floor = trainer.warmup_steps, trainer.max_steps, trainer.min_lr_ratio
    power = 1.0 if trainer.schedule == "linear" else trainer.power

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if trainer.schedule == "constant":
            return 1.0
        if trainer.schedule == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / (step + 1))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if trainer.schedule in ("linear", "polynomial"):
            return floor + (1.0 - floor) * (1.0 - progress) ** power
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, trainer: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' position tables."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": trainer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=trainer.lr, betas=tuple(trainer.betas), eps=1e-8)


def check_zero3(arch: str, ds: DeepSpeedConfig) -> None:
    """Refuse ZeRO-3 for LSTM/GRU models unless explicitly allowed (ValueError).

    ZeRO-3 partitions every parameter and gathers it in a forward pre-hook of
    the module that owns it.  `nn.LSTM`/`nn.GRU` read their weights through a
    cached list of flat weights (and cuDNN through one contiguous buffer made
    by `flatten_parameters`), which partitioning swaps out underneath them:
    on the CPU the worker process crashes in the first forward (seen with
    DeepSpeed 0.19), and the decoder's step loop would re-gather the same
    cells once per target token anyway.
    """
    if ds.zero_stage == 3 and arch in ("lstm", "gru") and not ds.allow_rnn_zero3:
        raise ValueError(
            f"deepspeed.zero_stage: ZeRO-3 is refused for model.arch={arch}: partitioned RNN weights break "
            "nn.LSTM/GRU's flat-weight cache (the worker crashes); use deepspeed.zero_stage<=2")


def build_engine(model: Seq2SeqModel, trainer: TrainerConfig, ds: DeepSpeedConfig, *,
                 world_size: int, on_gpu: bool, load_universal: bool = False):
    """Wrap a finished model with DeepSpeed: returns (engine, precision)."""
    import deepspeed  # imported here so that model code and tests never need it

    if not on_gpu:
        without_shm_comm(deepspeed)
    check_zero3(model.config.arch, ds)
    precision = resolve_precision(trainer, on_gpu=on_gpu)
    optimizer = build_optimizer(model, trainer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(trainer))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(trainer, ds, world_size=world_size, precision=precision,
                                load_universal=load_universal))
    return engine, precision


def without_shm_comm(deepspeed: Any) -> None:
    """CPU collectives stay on the process group's own backend (gloo): DeepSpeed's optional shared-memory
    all-reduce is turned off through its own switch, `deepspeed.ops.__compatible_ops__`.

    That op is C++ compiled just in time by the first engine in each new environment (minutes on two
    cores, inside the training job), behind torch's build lock file: a process killed while it builds
    (a chaos kill, a timeout, a stopped session) leaves the lock behind and every later engine on the
    machine waits on it forever (torch.utils.file_baton). Gloo is what Ray Train set up anyway.
    """
    ops = vars(deepspeed.ops)
    ops.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
