"""What does the orchestration cost?  `seqfoundry pretrain` (Ray Train, one
worker, DeepSpeed ZeRO 0, the streaming data pipeline with BART noising)
against a bare PyTorch loop over the same model, the same batches (held in
memory) and the same AdamW, in the same run.

    python benchmarks/trainer_overhead.py [--steps 120] [--threads 2]

Both sides use `--threads` torch threads.  The pretrain side's rate is its
steady state: target tokens over wall time of the logged windows after the
first (start-up, DeepSpeed init and the first batches excluded; the table
also shows the whole run's wall time).  Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline import build_batcher, prepare  # noqa: E402
from orchestrator.config import compose_config, to_typed  # noqa: E402
from trainers.engine import build_optimizer, lr_lambda  # noqa: E402
from trainers.models import build_model  # noqa: E402
from trainers.throughput import measure_matmul_peak  # noqa: E402

MODEL = ["model.d_model=256", "model.num_encoder_layers=3", "model.num_decoder_layers=3", "model.num_heads=4",
         "model.ffn_dim=1024", "model.dropout=0.1"]


def overrides(data: Path, run: Path, steps: int, threads: int) -> list[str]:
    return ["experiment=tiny", f"data.dir={data}", "data.vocab_size=8000", "model.vocab_size=8000",
            "data.max_documents=0", "data.shard_samples=2000", "data.batch.max_tokens=4096",
            "data.batch.pool_size=1000", *MODEL, f"run.dir={run}", f"trainer.max_steps={steps}",
            "trainer.num_workers=1", f"trainer.cpus_per_worker={threads}", "deepspeed.zero_stage=0",
            "trainer.log_every=10", "trainer.checkpoint_every=100000", "trainer.warmup_steps=10",
            "trainer.micro_batch_size=256", "data.num_workers=1", "tracking.mode=disabled"]


def pretrain_rate(data: Path, run: Path, steps: int, threads: int) -> tuple[float, float, float]:
    """(steady tokens/s, mean MFU, whole-run seconds) of a real `seqfoundry pretrain`."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "pretrain", *overrides(data, run, steps, threads)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][1:]  # drop the warm-up window
    seconds = sum(r["data_wait_s"] + r["compute_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * (r["data_wait_s"] + r["compute_s"]) for r in rows)
    mfu = sum(r["mfu"] for r in rows) / len(rows)
    return tokens / seconds, mfu, wall


def bare_rate(data: Path, job, steps: int, threads: int) -> tuple[float, float]:
    """(tokens/s, MFU) of a plain loop over the same batches, pre-loaded in memory."""
    torch.set_num_threads(threads)
    batcher = build_batcher(job.data, job.objective, rank=0, world_size=1, seed=job.trainer.seed)
    batches = []
    while len(batches) < steps:
        batcher.set_epoch(len(batches))
        batches += list(batcher)
    batches = batches[:steps]
    torch.manual_seed(0)
    model = build_model(job.model).train()
    opt = build_optimizer(model, job.trainer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.trainer))
    skip = 10
    tokens, flops, t0 = 0, 0.0, 0.0
    for i, b in enumerate(batches):
        if i == skip:
            t0 = time.perf_counter()
        loss = model(b.src, b.src_lengths, b.tgt_in, labels=b.tgt_out)  # the same fused loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.trainer.grad_clip)
        opt.step()
        sched.step()
        if i >= skip:
            tokens += b.num_tokens
            flops += model.flops(b.src.size(1), b.tgt_in.size(1)).training(int(b.src_lengths.sum()), b.num_tokens)
    seconds = time.perf_counter() - t0
    return tokens / seconds, flops / seconds / measure_matmul_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a data worker takes another core)")
    parser.add_argument("--data", type=Path, default=None, help="prepared built-in corpus (made if missing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        job = to_typed(compose_config(overrides(data, Path(tmp) / "run", args.steps, args.threads)))
        if not (data / "manifest.json").is_file():
            prepare(job.data, progress=False, use_ray=False)
        ours, our_mfu, wall = pretrain_rate(data, Path(tmp) / "run", args.steps, args.threads)
        bare, bare_mfu = bare_rate(data, job, args.steps, args.threads)
    print(f"transformer d256 3+3 vocab 8000, BART noising, {args.steps} steps, {args.threads} threads")
    print(f"{'loop':<44}{'target tok/s':>14}{'MFU':>8}")
    print(f"{'seqfoundry pretrain (Ray, DeepSpeed ZeRO-0)':<44}{ours:>14,.0f}{our_mfu:>8.1%}")
    print(f"{'bare PyTorch loop, batches in memory':<44}{bare:>14,.0f}{bare_mfu:>8.1%}")
    print(f"ratio pretrain / bare: {ours / bare:.3f}  (target >= 0.95); whole pretrain command: {wall:.0f}s")


if __name__ == "__main__":
    main()
