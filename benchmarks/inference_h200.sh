#!/usr/bin/env bash
# Inference benchmark on one H200 (the main pass about 7 min; 20-25 with the tests and all passes):
# Llama-3 1.8B, Mamba-2 1.3B, the 1.5B Mamba-2/attention hybrid and the telescoping-cache Llama
# 1.8B; contexts 1k..128k; batches 1, 8, 64 and the largest that fits. Prints the table and writes
# inference_bench.{json,md} and two PNGs into $OUT (default bench_out). Before it, the CUDA tests of
# the decode kernels (skip with RUN_TESTS=0); after it, shorter batch-1 passes with fused decode
# steps: Llama's element-wise work torch.compile'd (skip with COMPILE_PASS=0, into $OUT/compiled/),
# the Triton GEMV kernels with norms/SwiGLU/residuals fused in (skip with TRITON_PASS=0, into
# $OUT/triton/; the same pass times the other three families' GEMV paths at 1k, into
# $OUT/triton_families/), and each Llama block as one persistent Triton kernel (skip with
# PERSISTENT_PASS=0, into $OUT/persistent/; under a time limit, a safety net for its grid barriers;
# measured slower than the Triton pass, docs/benchmarks.md).
#
# From the project root, after `bash ../shared/device/stage.sh` has filled .device/ (ibm-fms,
# mamba-ssm wheels and the selective_scan_cuda stub):
#   OUT=DIR bash benchmarks/inference_h200.sh [extra python -m avengers.bench flags for the main pass]
# --smoke runs the same command on CPU with the tiny variants (seconds), to check the wiring.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${1:-}" == "--smoke" ]]; then
  shift
  exec python3 -m avengers.bench --device cpu --contexts 128,256 --batch_sizes 1,2 --steps 2 --warmup 1 \
    --bandwidth_gbs 20 --out "${OUT:-bench_out}" "$@"
fi
if [[ -d .device/wheels ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
  export PYTHONPATH=$PWD/.device/stub:/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
rc=0
if [[ "${RUN_TESTS:-1}" == "1" ]]; then  # the kernel and graph tests first (about half a minute)
  python3 -m pytest -q -p no:cacheprovider tests/test_inference_triton.py tests/test_inference_gpu.py \
    tests/test_triton_gemv.py tests/test_triton_block.py || rc=$?
fi
python3 -m avengers.bench --device cuda --dtype bf16 \
  --variants llama3_1.8b,mamba2_1.3b,mamba_1.5b,tele128_llama3_1.8b \
  --contexts 1k,4k,16k,32k,64k,128k --batch_sizes 1,8,64 --steps 20 --warmup 3 \
  --deadline_s 270 --out "${OUT:-bench_out}" "$@" || rc=$?
if [[ "${COMPILE_PASS:-1}" == "1" ]]; then
  python3 -m avengers.bench --device cuda --dtype bf16 --variants llama3_1.8b --contexts 1k,32k,128k \
    --batch_sizes 1 --no_max_batch --steps 20 --warmup 3 --compile --deadline_s 150 \
    --out "${OUT:-bench_out}/compiled" || rc=$?
fi
if [[ "${TRITON_PASS:-1}" == "1" ]]; then
  python3 -m avengers.bench --device cuda --dtype bf16 --variants llama3_1.8b --contexts 1k,32k,128k \
    --batch_sizes 1 --no_max_batch --steps 20 --warmup 3 --fused_decode triton --deadline_s 150 \
    --out "${OUT:-bench_out}/triton" || rc=$?
  # the other families' batch-1 GEMV paths (docs/inference.md's per-family table), at 1k
  python3 -m avengers.bench --device cuda --dtype bf16 --variants mamba2_1.3b,mamba_1.5b,tele128_llama3_1.8b \
    --contexts 1k --batch_sizes 1 --no_max_batch --steps 20 --warmup 3 --fused_decode triton --deadline_s 450 \
    --out "${OUT:-bench_out}/triton_families" || rc=$?
fi
if [[ "${PERSISTENT_PASS:-1}" == "1" ]]; then
  timeout 240 python3 -m avengers.bench --device cuda --dtype bf16 --variants llama3_1.8b --contexts 1k,32k,128k \
    --batch_sizes 1 --no_max_batch --steps 20 --warmup 3 --fused_decode persistent --deadline_s 150 \
    --out "${OUT:-bench_out}/persistent" || rc=$?
fi
exit $rc
