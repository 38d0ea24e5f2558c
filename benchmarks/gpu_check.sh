#!/usr/bin/env bash
# GPU check (NVIDIA), under 10 minutes on one H100/H200-class GPU; exits non-zero when any check fails:
#   1. tests/gpu (pytest -m gpu): bf16 under ZeRO-2 and ZeRO-3 with one worker per GPU and NCCL,
#      kill-and-resume on the GPU, CUDA greedy decoding = the CPU's tokens, a non-zero MFU peak (~4 min);
#   2. throughput: a short bf16 pretraining of the `base` Transformer (~61M parameters) on the built-in
#      corpus, one worker per GPU, then tokens/s and MFU (analytic FLOPs over the data-sheet bf16 peak)
#      from metrics.jsonl, which must be non-zero (~3 min);
#   3. decode: benchmarks/decode_engines.py, short (~1 min).
# Usage:
#   bash benchmarks/gpu_check.sh [steps] [workers]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
STEPS=${1:-200}
WORKERS=${2:-1}
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
FAILED=()
if [ ! -x .venv/bin/seqfoundry ]; then
  $PY -m venv .venv
  # the CUDA build of torch (PyPI's default wheel on Linux), then the project
  .venv/bin/pip install -q torch && .venv/bin/pip install -q -e '.[test]' || exit 1
fi
SF=.venv/bin/seqfoundry
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
.venv/bin/python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, gpus {torch.cuda.device_count()}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== 1. tests/gpu"
DS_ACCELERATOR=cuda timeout 300 .venv/bin/python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -n 0 \
  > "$OUT/gpu_tests.log" 2>&1
rc=$?; tail -5 "$OUT/gpu_tests.log"
# every test must have run (a skip on a GPU machine means CUDA was not seen: a failure here)
if [ $rc -ne 0 ] || grep -q "skipped" "$OUT/gpu_tests.log"; then FAILED+=("tests/gpu (rc $rc)"); fi

echo "== 2. throughput"
export DS_ACCELERATOR=cuda
if $SF prepare data.dir="$OUT/data" > "$OUT/prepare.log" 2>&1 && \
   timeout 240 $SF pretrain model=transformer trainer=gpu data.dir="$OUT/data" run.dir="$OUT/run" \
     trainer.num_workers="$WORKERS" trainer.max_steps="$STEPS" trainer.log_every=20 \
     trainer.checkpoint_every=100000 trainer.warmup_steps=50 trainer.precision=bf16 \
     data.batch.max_tokens=16384 trainer.micro_batch_size=256 data.num_workers=4 \
     tracking.mode=disabled > "$OUT/pretrain.log" 2>&1; then
  .venv/bin/python - "$OUT/run/metrics.jsonl" <<'PY' || FAILED+=("throughput figures")
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][1:]  # skip warm-up window
tok = sum(r["tokens_per_s"] for r in rows) / len(rows)
mfu = sum(r["mfu"] for r in rows) / len(rows)
print(f"base transformer bf16: {tok:,.0f} target tokens/s, MFU {mfu:.1%} "
      f"(steps {rows[0]['step']}..{rows[-1]['step']}, loss {rows[-1]['loss']:.3f}, "
      f"memory {rows[-1]['memory_mb']:.0f} MB host)")
assert tok > 0 and mfu > 0, "zero throughput or MFU"
PY
else
  tail -30 "$OUT/pretrain.log" "$OUT/prepare.log"; FAILED+=("throughput run")
fi

echo "== 3. decode"
(cd benchmarks && timeout 120 ../.venv/bin/python decode_engines.py --threads 4 --iters 2 --warmup 1) \
  || FAILED+=("decode benchmark")

if [ ${#FAILED[@]} -ne 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]} (logs in $OUT)"; exit 1
fi
echo "gpu_check: all checks passed (logs in $OUT)"
