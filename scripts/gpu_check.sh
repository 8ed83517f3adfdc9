#!/usr/bin/env bash
# On a CUDA machine: the kernel tests compiled for the GPU (no interpreter), the kernel benchmark,
# and how far the PPO ratio of an unchanged policy strays from 1 under fp32/bf16/fp16 for DDPO,
# RLCM and GRPO on the tiny SD3 pipeline (the flow SDE). Finishes in a few minutes.   bash scripts/gpu_check.sh [OUT_DIR]
# diffrl must be importable (pip install -e ".[dev,gpu]", or PYTHONPATH=. with the dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"
# TRITON_INTERPRET=0: the kernels compile for the GPU; the tests move their tensors with DIFFRL_TEST_DEVICE
TRITON_INTERPRET=0 DIFFRL_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  "tests/test_lcm_policy.py::test_fused_lcm_step_matches_the_reference" > "$out/kernel_tests.txt" 2>&1
tail -3 "$out/kernel_tests.txt"
for dtype in float32 bfloat16; do
  python3 scripts/bench_kernels.py --dtype "$dtype" --json "$out/bench_kernels_$dtype.json" > "$out/bench_kernels_$dtype.txt" 2>&1
  tail -12 "$out/bench_kernels_$dtype.txt"
done
lcm="${LCM_MODEL:-tiny-lcm}"
flow="configs/grpo/tiny_geneval.yaml model.pretrained=tiny-sd3-random sample.eta=0.7 sample.max_sequence_length=16"
for config in "configs/ddpo/tiny_alignment.yaml" "configs/rlcm/tiny_alignment.yaml model.pretrained=$lcm" "$flow"; do
  for precision in no bf16 fp16; do
    python3 scripts/ratio_check.py $config "model.mixed_precision=$precision" 2>/dev/null | tail -1
  done
done | tee "$out/ratios.jsonl"
