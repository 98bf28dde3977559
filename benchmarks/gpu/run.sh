#!/usr/bin/env bash
# One GPU run: build the CUDA extension, run the gpu-marked tests, run every do_bench
# microbenchmark and print one table (also written to $OUT/gpu_table.md when $OUT is set).
# Usage (on a CUDA machine, repository root): bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== build (C2T_FAST_CUDA=1)"
C2T_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
"$PY" -c "import c2t_fast, wisca_fast, torch; assert c2t_fast.ops.cuda_kernels_compiled() and wisca_fast.ops.cuda_kernels_compiled(); print('CUDA kernels:', torch.cuda.get_device_name())"
echo "== gpu tests"
"$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15
echo "== microbenchmarks (do_bench medians)"
"$PY" benchmarks/gpu/microbench.py | tee "$out/gpu_table.md"
