#!/usr/bin/env bash
# One GPU run, offline, in under 8 minutes on an H100/H200: build the CUDA extension, run every
# gpu-marked test (the tree ops' CUDA kernels against their references, the compiled Triton kernels,
# the WISCA CUDA kernel, and the engine end to end on CUDA: every strategy and draft, greedy output equal
# to generate(do_sample=False), seeded sampling), then every do_bench microbenchmark as one table (also
# written to $OUT/gpu_table.md when $OUT is set); with 2+ GPUs, a tensor-parallel target over 2 of them
# (benchmarks/gpu/tensor_parallel.py under torchrun: lossless on every rank, the agreement's cost).
# Usage (on a CUDA machine, repository root): bash benchmarks/gpu/run.sh
# Needs torch (CUDA), triton, transformers, pytest; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # compile the Triton kernels: the interpreter is for CPU-only machines
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== build (C2T_FAST_CUDA=1)"
C2T_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
"$PY" -c "import c2t_fast, wisca_fast, torch; assert c2t_fast.ops.cuda_kernels_compiled() and wisca_fast.ops.cuda_kernels_compiled(); print('CUDA kernels:', torch.cuda.get_device_name())"
echo "== gpu tests"
# The files that hold gpu tests, whole (their device-generic tests then run the compiled Triton kernels);
# other files import packages a GPU box may lack (scipy, hypothesis, gguf).
gpu_files=$(grep -l "mark.gpu\|devices()" tests/test_*.py | tr '\n' ' ')
"$PY" -c "import triton, os; assert not os.environ.get('TRITON_INTERPRET'); print('triton', triton.__version__, '(compiled)')"
set +e
timeout 360 "$PY" -m pytest -q $gpu_files -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -25
status=${PIPESTATUS[0]}
set -e
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
  echo "== multi-GPU: a tensor-parallel target over 2 GPUs (NCCL)"
  set +e
  timeout 180 "$PY" -m torch.distributed.run --nproc-per-node 2 benchmarks/gpu/tensor_parallel.py 2>&1 | tee "$out/gpu_tp.log" | tail -12
  tp=${PIPESTATUS[0]}
  set -e
  [ "$tp" -eq 0 ] || status=$tp
else
  echo "== multi-GPU: skipped ($ngpu GPU; needs 2)"
fi
echo "== microbenchmarks (do_bench medians)"
"$PY" benchmarks/gpu/microbench.py | tee "$out/gpu_table.md"
echo "== batched speculation against stock batched generate (B = 1, 4, 8; the shipped SmolLM2 and head)"
set +e
SPEC_BENCH="${SPEC_BENCH:-$PWD/shared/data/spec_bench}"
[ -d "$SPEC_BENCH" ] || SPEC_BENCH="$PWD/../shared/data/spec_bench"
SPEC_BENCH="$SPEC_BENCH" timeout 150 "$PY" benchmarks/batch_throughput.py --batches 1,4,8 --prompts 8 --tokens 64 \
  --out "$out/batch_throughput" 2>&1 | grep -v "Loading weights" | tail -8
set -e
exit "$status"
