#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (none on the development VMs).
#
#   bash benchmarks/gpu_check.sh [BUDGET_SECONDS]    (default 480: leaves room for a rerun)
#
# Installs jax[cuda12] next to grpo_jax in a fresh venv, runs the fast tests on the GPU,
# then benchmarks/gpu_step.py (small, long, big-vocab and a Qwen2.5-0.5B-shaped random
# model, 8 prompts x G=8, bf16 and f32). Paste the table into benchmarks/README.md with the
# date and the GPU model. Each part stops at its share of the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-480}
venv=${GPU_VENV:-/tmp/grpo-gpu-venv}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e ".[test]" "jax[cuda12]"
fi
export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
"$venv/bin/python" -c "import jax; print(jax.devices())"
timeout $((budget / 3)) "$venv/bin/python" -m pytest -x -q -p no:cacheprovider \
  tests/test_grpo_math.py tests/test_sampling.py tests/test_optimised_step.py tests/test_fsdp.py \
  || echo "fast tests: failed or out of time (rc $?)"
timeout $((2 * budget / 3)) "$venv/bin/python" benchmarks/gpu_step.py --steps 3 \
  || echo "gpu_step: failed or out of time (rc $?)"
