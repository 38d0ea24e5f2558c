#!/usr/bin/env bash
# GPU check (NVIDIA): a short bf16 pretraining of the `base` Transformer (~61M
# parameters) on the built-in corpus, one worker per GPU, then tokens/s and
# MFU (analytic FLOPs over the data-sheet bf16 peak) from metrics.jsonl.
# Fits in 10 minutes on one H100/H200-class GPU. Usage:
#   bash benchmarks/gpu_check.sh [steps] [workers]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
WORKERS=${2:-1}
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
if [ ! -x .venv/bin/seqfoundry ]; then
  $PY -m venv .venv
  # the CUDA build of torch (PyPI's default wheel on Linux), then the project
  .venv/bin/pip install -q torch && .venv/bin/pip install -q -e .
fi
SF=.venv/bin/seqfoundry
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
.venv/bin/python - <<'PY'
import torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, gpus {torch.cuda.device_count()}, "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
PY
export DS_ACCELERATOR=cuda
$SF prepare data.dir="$OUT/data" > "$OUT/prepare.log" 2>&1
timeout 540 $SF pretrain model=transformer trainer=gpu data.dir="$OUT/data" run.dir="$OUT/run" \
  trainer.num_workers="$WORKERS" trainer.max_steps="$STEPS" trainer.log_every=20 \
  trainer.checkpoint_every=100000 trainer.warmup_steps=50 trainer.precision=bf16 \
  data.batch.max_tokens=16384 trainer.micro_batch_size=256 data.num_workers=4 \
  tracking.mode=disabled > "$OUT/pretrain.log" 2>&1 || { tail -30 "$OUT/pretrain.log"; exit 1; }
.venv/bin/python - "$OUT/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][1:]  # skip warm-up window
tok = sum(r["tokens_per_s"] for r in rows) / len(rows)
mfu = sum(r["mfu"] for r in rows) / len(rows)
print(f"base transformer bf16: {tok:,.0f} target tokens/s, MFU {mfu:.1%} "
      f"(steps {rows[0]['step']}..{rows[-1]['step']}, loss {rows[-1]['loss']:.3f}, "
      f"memory {rows[-1]['memory_mb']:.0f} MB host)")
PY
