#!/usr/bin/env bash
# The GPU run of the fast-attention benchmark, in one command (a lent GPU has minutes, not hours):
#   1. flash vs xla vs Hugging Face DeBERTa: xsmall encoder, bf16, forward+backward, L = 512 / 2048 (batch 8)
#      and 8192 (batch 1);
#   2. the full RTD step (generator + discriminator + both optimizers) of the base model, bf16, L = 512,
#      batch 32, real 128k vocabulary: its achieved fraction of a measured bf16 matmul (MFU);
#   3. flash against xla on the GPU at L = 2048 in float32 (values and all gradients; exercises the
#      backward's far-tile shortcut);
#   4. where the time goes (benchmarks/profile_step.py): the base RTD step (section 2's shape) and the
#      xsmall encoder at L = 2048 with the XLA and the flash attention;
#   5. the attention core alone: flash (fused backward), flash_blocked and xla at L = 2048 and 8192.
# Usage: bash benchmarks/gpu_run.sh OUT_DIR        (DRY_RUN=1: tiny lengths on the CPU, to check the script)
# Every section writes its markdown table into OUT_DIR as it goes, so a run cut short keeps what it had.
set -u
mkdir -p "${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}"
out=$(cd "$1" && pwd)  # absolute: the script moves to the repository root next
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python=${PYTHON:-python3}
if [[ ${DRY_RUN:-0} == 1 ]]; then
  lengths=64,128 rtd_length=64 rtd_batch=2 size=xsmall matmul=512 steps="--steps 1 --warmup 0" check="--dry_run" check_length=96
  long_length=64 long_batch=1 vocab=1000 profile_impls=xla
else
  lengths=512,2048,8192 rtd_length=512 rtd_batch=32 size=base matmul=8192 steps="--steps 5 --warmup 1" check="" check_length=2048
  long_length=2048 long_batch=8 vocab=128100 profile_impls="xla flash"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
fi

"$python" benchmarks/bench.py --sizes xsmall --lengths "$lengths" --long-from 8192 --modes fwdbwd \
    --rows ours,ours_flash,hf_deberta --dtype bfloat16 --matmul-size "$matmul" $steps --child-timeout 150 \
    --json "$out/encoder.json" | tee "$out/encoder.md"
"$python" benchmarks/bench.py --sizes "$size" --lengths "$rtd_length" --modes fwdbwd --rows rtd \
    --batch "$rtd_batch" --vocab 128100 --dtype bfloat16 --matmul-size "$matmul" $steps --child-timeout 180 \
    --json "$out/rtd.json" | tee "$out/rtd.md"
"$python" benchmarks/flash_gpu_check.py $check --sections check --check_lengths "$check_length" --check_dtypes float32 \
    --budget_s 120 --out "$out/flash_check.md"
"$python" benchmarks/profile_step.py --step rtd --size "$size" --length "$rtd_length" --batch "$rtd_batch" \
    --vocab "$vocab" --dtype bfloat16 --steps 3 --top 25 | tee "$out/profile_rtd.md"
for impl in $profile_impls; do
  "$python" benchmarks/profile_step.py --size xsmall --length "$long_length" --batch "$long_batch" --dtype bfloat16 \
      --impl "$impl" --steps 3 --top 25 | tee "$out/profile_long_$impl.md"
done
"$python" benchmarks/flash_gpu_check.py $check --sections core --budget_s 200 --out "$out/flash_core.md"
