#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU, offline or not.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--budget SECONDS]   (default 450)
#   bash benchmarks/gpu_check.sh --cpu-smoke [--trl-python PY]       (the script itself, on a CPU)
#
# 1. Python: when `python3` (or $GPU_PYTHON) already has a JAX that sees a GPU, nothing is
#    installed: the project runs from this checkout (PYTHONPATH), and --wheels DIR adds the
#    pure-Python wheels that Python lacks (clu, ml_collections, trl, ...) into a private
#    folder with `pip --no-index`. Otherwise a venv gets `pip install -e ".[test,cuda]"`
#    (needs the network).
# 2. The fast numeric tests on the GPU.
# 3. benchmarks/gpu_side_by_side.py: grpo_jax against TRL on the same GPU at Qwen2.5-0.5B
#    64 x (32+256), 0.5B 128 x (32+1024) and 1.5B 64 x (32+1024); one table.
# Paste the output into benchmarks/README.md with the date, GPU model and JAX version.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=450 wheels="" smoke=0 trl_python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --cpu-smoke) smoke=1; shift ;;
    --trl-python) trl_python=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
started=$SECONDS
python=${GPU_PYTHON:-python3}
sees_gpu() { "$1" -c "import jax, sys; sys.exit(0 if jax.devices()[0].platform == 'gpu' else 1)" \
  >/dev/null 2>&1; }

if [ "$smoke" = 1 ]; then
  python=${GPU_PYTHON:-$(command -v python)}
  export JAX_PLATFORMS=cpu
  echo "CPU smoke run of the GPU check with $python"
elif sees_gpu "$python"; then
  echo "$python: JAX already sees a GPU; installing nothing"
  export JAX_PLATFORMS=cuda
else
  command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no NVIDIA GPU here" >&2; exit 1; }
  venv=${GPU_VENV:-/tmp/grpo-gpu-venv}
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -e ".[test,cuda]"
  fi
  python=$venv/bin/python
  export JAX_PLATFORMS=cuda
fi
if [ -n "$wheels" ]; then  # offline: the missing pure-Python wheels, never the network
  site=${GPU_SITE:-/tmp/grpo-gpu-site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false
command -v nvidia-smi >/dev/null && \
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"

if [ "$smoke" = 1 ]; then
  tests=(tests/test_attention.py::test_kernels_equal_the_float64_reference)
  side=(--quick --trl-device cpu --shapes 0.5b-256 --steps 1 --budget 600)
else
  tests=(tests/test_grpo_math.py tests/test_attention.py tests/test_sampling.py
         tests/test_optimised_step.py)
  side=(--budget $((budget - (SECONDS - started) - 100 > 60 ? budget - (SECONDS - started) - 100 : 60)))
fi
# The GPU's tests run in one process (no xdist workers sharing the GPU), not the slow ones.
timeout 100 "$python" -m pytest -x -q -p no:cacheprovider -o addopts="" -m "not slow" \
  "${tests[@]}" || echo "fast tests: failed or out of time (rc $?)"
"$python" benchmarks/gpu_side_by_side.py "${side[@]}" ${trl_python:+--trl-python "$trl_python"}
echo "gpu_check.sh: $((SECONDS - started)) s"
