#!/usr/bin/env bash
# On a CUDA machine: install diffrl, run the kernel tests on CUDA (no interpreter) and the kernel
# benchmark. Finishes in a few minutes.   bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
python3 -m pip install -q -e ".[dev,gpu]" 2>&1 | tail -2 || python3 -m pip install -q -e ".[dev]"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
# TRITON_INTERPRET=0: the kernels compile for the GPU; the tests move their tensors with DIFFRL_TEST_DEVICE
TRITON_INTERPRET=0 DIFFRL_TEST_DEVICE=cuda python3 -m pytest -q tests/test_kernels.py 2>&1 | tee "$out/kernel_tests.txt"
for dtype in float32 bfloat16; do
  python3 scripts/bench_kernels.py --dtype "$dtype" --json "$out/bench_kernels_$dtype.json" | tee "$out/bench_kernels_$dtype.txt"
done
