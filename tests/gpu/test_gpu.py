"""Checks that need an NVIDIA GPU (marked `gpu`: tests/conftest.py skips them without CUDA).

Real Ray Train x DeepSpeed runs with one worker per GPU, NCCL and bf16; a kill-and-resume on the GPU; CUDA
greedy decoding against the CPU's tokens on a tiny trained model; a non-zero MFU for the GPU in use.
`benchmarks/gpu_check.sh` runs them (with the throughput and decode benchmarks) in under 10 minutes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ray = pytest.importorskip("ray")


def gpus() -> int:
    return torch.cuda.device_count()


@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray cluster that sees this machine's GPUs (one worker per GPU)."""
    ray.shutdown()  # not the CPU cluster that conftest's local_ray shares between modules
    ray.init(address="local", num_cpus=max(2 * gpus(), 2), num_gpus=gpus(), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, gpu_ray) -> Path:
    from tests.helpers.data import prepare_tiny

    return prepare_tiny(tmp_path_factory.mktemp("data") / "tiny")


def pretrain(data: Path, run: Path, *extra: str) -> int:
    from orchestrator.cli import main

    return main(["pretrain", "experiment=tiny", "trainer=gpu", f"data.dir={data}", f"run.dir={run}",
                 f"trainer.num_workers={gpus()}", "trainer.precision=bf16", "trainer.max_steps=6",
                 "trainer.log_every=1", "trainer.checkpoint_every=3", "trainer.warmup_steps=1",
                 "trainer.max_failures=1", "data.num_workers=0", "tracking.mode=disabled", *extra])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_training_under_zero_with_one_worker_per_gpu(zero, tiny_data, tmp_path):
    run = tmp_path / "run"
    assert pretrain(tiny_data, run, f"deepspeed.zero_stage={zero}") == 0
    train = [r for r in rows(run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in train)
    assert all(r["gpu_memory_mb"] > 0 for r in train)  # the model really ran on the GPU
    assert all(r["mfu"] > 0 for r in train[1:])  # the GPU's bf16 peak is known (trainers.throughput)
    workers = json.loads((run / "workers.json").read_text())
    assert len(workers) == gpus()
    assert (run / "model" / "model.safetensors").is_file()


def test_kill_and_resume_on_the_gpu(tiny_data, tmp_path):
    """A worker SIGKILLed after step 4: Ray Train restarts the group from step_3 and the run finishes."""
    run = tmp_path / "run"
    assert pretrain(tiny_data, run, "deepspeed.zero_stage=2", "chaos.fail_at_step=4") == 0
    assert (run / ".chaos_fired").is_file()
    train = [r for r in rows(run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))  # the lines after step 3 were redone once
    assert (run / "model" / "model.safetensors").is_file()


def test_cuda_greedy_decoding_gives_the_cpu_tokens(tmp_path_factory):
    from tests.helpers.copy_task import copy_package, split_batch
    from trainers.decoding import DecodingConfig, decode
    from trainers.package import load_package

    root = tmp_path_factory.mktemp("copy")
    package = copy_package(root, steps=200)
    batch = split_batch(root / "data", "valid")
    cfg = DecodingConfig(strategy="greedy", max_len_a=1.0, max_len_b=4)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls as the CPU computes them (no TF32 rounding)
    torch.backends.cudnn.allow_tf32 = False
    model = load_package(package)
    cpu = [h[0].tokens for h in decode(model, batch.src, batch.src_lengths, cfg)]
    gpu_model = model.cuda()
    cuda = [h[0].tokens for h in decode(gpu_model, batch.src.cuda(), batch.src_lengths.cuda(), cfg)]
    assert cuda == cpu


def test_mfu_peak_is_known_for_this_gpu():
    from trainers.throughput import device_peak_flops

    peak = device_peak_flops(on_gpu=True, precision="bf16")
    assert peak > 0, f"{torch.cuda.get_device_name()}: no data-sheet peak in trainers.throughput.GPU_PEAK_FLOPS"
