"""Trainer pieces without Ray: config checks, the DeepSpeed config, the LR
schedule, model packages, MFU accounting."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file

from trainers.config import DeepSpeedConfig, TrainerConfig
from trainers.engine import check_zero3, deepspeed_config, lr_lambda
from trainers.models import ModelConfig, build_model
from trainers.package import (Lineage, PackageError, check_compatible, load_package, read_lineage,
                              write_package)
from trainers.throughput import StepTimer, measure_matmul_peak

TINY = ModelConfig(vocab_size=40, d_model=16, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, ffn_dim=32)


@pytest.mark.parametrize("kwargs, key", [
    (dict(global_batch_size=10, micro_batch_size=4, grad_accum_steps=2, num_workers=1), "trainer.global_batch_size"),
    (dict(schedule="step"), "trainer.schedule"),
    (dict(precision="fp8"), "trainer.precision"),
    (dict(max_steps=0), "trainer.max_steps"),
    (dict(lr=0.0), "trainer.lr"),
])
def test_trainer_config_names_the_bad_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        TrainerConfig(**kwargs)


def test_batch_triple_is_consistent_when_given():
    cfg = TrainerConfig(micro_batch_size=4, grad_accum_steps=2, num_workers=3, global_batch_size=24)
    ds = deepspeed_config(cfg, DeepSpeedConfig(zero_stage=2), world_size=3, precision="fp32")
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 3
    assert ds["zero_optimization"]["stage"] == 2 and "bf16" not in ds and "fp16" not in ds


def test_deepspeed_config_precision_offload_and_universal_load():
    cfg = TrainerConfig()
    ds = deepspeed_config(cfg, DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
                          world_size=2, precision="bf16", load_universal=True)
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["checkpoint"] == {"load_universal": True}
    assert deepspeed_config(cfg, DeepSpeedConfig(), world_size=1, precision="fp16")["fp16"]["enabled"]


@pytest.mark.parametrize("kwargs, key", [
    (dict(zero_stage=4), "deepspeed.zero_stage"),
    (dict(zero_stage=0, offload_optimizer=True), "deepspeed.offload_optimizer"),
    (dict(zero_stage=2, offload_params=True), "deepspeed.offload_params"),
])
def test_deepspeed_config_names_the_bad_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DeepSpeedConfig(**kwargs)


def test_zero3_is_refused_for_rnns_only():
    check_zero3("transformer", DeepSpeedConfig(zero_stage=3))
    check_zero3("lstm", DeepSpeedConfig(zero_stage=2))
    check_zero3("gru", DeepSpeedConfig(zero_stage=3, allow_rnn_zero3=True))
    with pytest.raises(ValueError, match="ZeRO-3 is refused for model.arch=lstm"):
        check_zero3("lstm", DeepSpeedConfig(zero_stage=3))


def test_schedules_warm_up_then_decay():
    cos = lr_lambda(TrainerConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1)
    assert cos(55) == pytest.approx(0.1 + 0.9 * 0.5)
    inv = lr_lambda(TrainerConfig(max_steps=100, warmup_steps=16, schedule="inverse_sqrt"))
    assert inv(15) == pytest.approx(1.0) and inv(63) == pytest.approx(math.sqrt(16 / 64))
    const = lr_lambda(TrainerConfig(max_steps=100, warmup_steps=0, schedule="constant"))
    assert const(0) == const(99) == 1.0


def test_package_round_trip_is_fp32_and_keeps_lineage(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY).to(torch.bfloat16)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"model": {}}')
    write_package(tmp_path / "pkg", model, tokenizer=tokenizer, lineage=Lineage(wandb_run_id="abc", step=7))
    stored = load_file(tmp_path / "pkg" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in stored.values())
    loaded = load_package(tmp_path / "pkg")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.float())
    assert read_lineage(tmp_path / "pkg").wandb_run_id == "abc"
    assert json.loads((tmp_path / "pkg" / "model_config.json").read_text())["vocab_size"] == 40
    assert not (tmp_path / "pkg.tmp").exists()


def test_loading_a_package_never_unpickles(tmp_path):
    model = build_model(TINY)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    write_package(tmp_path / "pkg", model, tokenizer=tokenizer, lineage=Lineage())

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("a pickle was executed",))

    (tmp_path / "pkg" / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(PackageError, match="model.safetensors"):
        load_package(tmp_path / "pkg")


def test_package_compatibility_checks_vocab_and_tokenizer(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"a": 1}')
    write_package(tmp_path / "pkg", build_model(TINY), tokenizer=tok, lineage=Lineage())
    check_compatible(tmp_path / "pkg", tokenizer_json=tok, vocab_size=40)
    with pytest.raises(PackageError, match="vocab_size 40 != data tokenizer's 41"):
        check_compatible(tmp_path / "pkg", tokenizer_json=tok, vocab_size=41)
    other = tmp_path / "other.json"
    other.write_text('{"a": 2}')
    with pytest.raises(PackageError, match="differs from the data's tokenizer"):
        check_compatible(tmp_path / "pkg", tokenizer_json=other, vocab_size=40)
    with pytest.raises(PackageError, match="not found"):
        load_package(tmp_path / "missing")


def test_step_timer_mfu_is_flops_over_peak():
    timer = StepTimer()
    timer.data_ready()
    timer.step_done(src_tokens=100, tgt_tokens=50, samples=4, flops=1e9)
    out = timer.summary(world_size=2, peak_flops=1e12)
    wall = out["data_wait_s"] + out["compute_s"]
    assert out["tokens_per_s"] == pytest.approx(50 * 2 / wall)
    assert out["mfu"] == pytest.approx(1e9 / wall / 1e12)
    assert measure_matmul_peak(size=128, iters=2) > 1e6


def test_cpu_engines_never_build_deepspeeds_shared_memory_all_reduce():
    """DeepSpeed would JIT-compile its shm all-reduce behind a lock file that a killed build leaves behind
    (every later engine then waits forever); build_engine turns it off on the CPU by DeepSpeed's own switch."""
    import importlib

    import deepspeed

    from trainers.engine import without_shm_comm

    without_shm_comm(deepspeed)
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
