#!/usr/bin/env bash
# Installs the peer systems that benchmarks/compare.py runs beside grpo_jax, each in its own
# virtual environment so that their dependency pins never touch the project's venv.
#
#   benchmarks/setup_peers.sh [trl] [tunix]      (no argument: both)
#
# Environment:
#   BENCH_ROOT  where the venvs go (default /work): $BENCH_ROOT/bench-trl, $BENCH_ROOT/bench-tunix
#   PYTHON      the interpreter that creates them (default python3)
#
# torch is pinned to exactly 2.13.0, the version the project's own venv uses: here that spec
# resolves to the CPU build (2.13.0+cpu), while any looser torch spec pulls a multi-GiB CUDA
# build that a CPU benchmark neither needs nor wants.
set -euo pipefail

BENCH_ROOT="${BENCH_ROOT:-/work}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"

peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
  peers=(trl tunix)
fi

make_venv() {
  local dir="$1"
  if [ ! -x "$dir/bin/python" ]; then
    "$PYTHON" -m venv "$dir"
  fi
  "$dir/bin/pip" install --quiet --upgrade pip
}

for peer in "${peers[@]}"; do
  case "$peer" in
    trl)
      dir="$BENCH_ROOT/bench-trl"
      make_venv "$dir"
      "$dir/bin/pip" install "$TORCH_SPEC" trl
      "$dir/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
      ;;
    tunix)
      dir="$BENCH_ROOT/bench-tunix"
      make_venv "$dir"
      "$dir/bin/pip" install google-tunix
      "$dir/bin/python" -c "import importlib.metadata as m; print('google-tunix', m.version('google-tunix'))"
      ;;
    *)
      echo "unknown peer '$peer'; known: trl tunix" >&2
      exit 2
      ;;
  esac
done
