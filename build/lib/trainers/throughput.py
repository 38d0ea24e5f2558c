"""Throughput and MFU accounting: analytic model FLOPs over the device's peak.

On NVIDIA GPUs the peak is a configured number (dense bf16 tensor-core
FLOP/s from the data sheet, looked up by device name unless given); on the
CPU it is measured: the float32 matrix-multiply rate of this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# Dense (no sparsity) peak FLOP/s per GPU, by precision, from NVIDIA's data sheets.
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
}


def measure_matmul_peak(*, size: int = 1024, iters: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on the CPU with this process's threads (best of `iters`)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def device_peak_flops(*, on_gpu: bool, precision: str, configured: float = 0.0) -> float:
    """Peak FLOP/s of this worker's device: configured > GPU table > measured CPU matmul."""
    if configured > 0:
        return configured
    if on_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name:
                return peaks.get(precision, peaks["fp32"])
        return 0.0  # unknown GPU: MFU is reported as 0 unless trainer.peak_flops is set
    return measure_matmul_peak()


@dataclass
class StepTimer:
    """Splits each step's wall time into waiting on data and computing."""

    data_s: float = 0.0
    compute_s: float = 0.0
    tokens: int = 0
    target_tokens: int = 0
    source_tokens: int = 0
    samples: int = 0
    flops: float = 0.0
    _t: float = field(default_factory=time.perf_counter)

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self._t
        self._t = now

    def step_done(self, *, src_tokens: int, tgt_tokens: int, samples: int, flops: float) -> None:
        now = time.perf_counter()
        self.compute_s += now - self._t
        self._t = now
        self.source_tokens += src_tokens
        self.target_tokens += tgt_tokens
        self.tokens += src_tokens + tgt_tokens
        self.samples += samples
        self.flops += flops

    def summary(self, *, world_size: int, peak_flops: float) -> dict[str, float]:
        """Rates over the window since the last summary, then reset it."""
        wall = max(self.data_s + self.compute_s, 1e-9)
        out = {
            "tokens_per_s": self.target_tokens * world_size / wall,
            "all_tokens_per_s": self.tokens * world_size / wall,
            "samples_per_s": self.samples * world_size / wall,
            "data_wait_s": self.data_s,
            "compute_s": self.compute_s,
            "data_wait_frac": self.data_s / wall,
            "mfu": (self.flops / wall) / peak_flops if peak_flops > 0 else 0.0,
        }
        self.data_s = self.compute_s = self.flops = 0.0
        self.tokens = self.target_tokens = self.source_tokens = self.samples = 0
        self._t = time.perf_counter()
        return out
