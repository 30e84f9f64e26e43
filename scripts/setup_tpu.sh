#!/usr/bin/env bash
# Installs grpo_jax on every worker of the TPU VM: source, Python venv, jax[tpu], the package.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SOURCE_DIR=${SOURCE_DIR:-$REPO_ROOT}
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-main}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}

usage() {
  cat <<USAGE
Usage: $(basename "$0") [flags]

Installs grpo_jax on every worker of \$TPU_NAME (gcloud ... --worker=all), so a multi-host
slice gets the same code and packages on each host. Run it again after changing the code.

  1. The source: by default the local checkout (SOURCE_DIR) is packed into a tarball (without
     .git, virtual environments, output/, build/ and caches), copied to every worker with
     'gcloud compute tpus tpu-vm scp --worker=all' and unpacked into REMOTE_DIR, replacing
     what was there (but its output/, train_tpu.sh's default workdir, is kept). With
     --repo-url, each worker instead clones REPO_URL at BRANCH.
  2. Python: TPU VM images ship Python 3.10 while JAX needs 3.11+, so uv
     (https://docs.astral.sh/uv/, installed into ~/.local/bin if missing) makes a venv at
     VENV_DIR with Python PYTHON_VERSION; an existing venv is kept.
  3. pip install of JAX_SPEC ("jax[tpu]": jax + libtpu) and of grpo_jax (editable) into it.

Flags (environment variable in brackets):
  --source DIR            local grpo_jax checkout to copy [SOURCE_DIR] (default: $REPO_ROOT)
  --repo-url URL          clone this git URL on the workers instead of copying [REPO_URL]
  --branch BRANCH         branch or tag for --repo-url [BRANCH] (default: main)
  --remote-dir DIR        source directory on each worker [REMOTE_DIR] (default: grpo_jax)
  --venv DIR              venv on each worker [VENV_DIR] (default: grpo_jax_venv)
  --python VERSION        Python version of the venv [PYTHON_VERSION] (default: 3.12)
  --jax SPEC              JAX requirement [JAX_SPEC] (default: jax[tpu])
  Relative worker paths are under the worker's home directory.

$COMMON_FLAGS_HELP
USAGE
}

SCRIPT_VALUE_FLAGS="--source:SOURCE_DIR --repo-url:REPO_URL --branch:BRANCH --remote-dir:REMOTE_DIR
  --venv:VENV_DIR --python:PYTHON_VERSION --jax:JAX_SPEC"
parse_flags "$@"
require_gcloud

# REMOTE_DIR is deleted and replaced on every worker: refuse a directory that holds other things
# (the home directory, /, /home/USER, /tmp) or a path climbing out with "..".
target=${REMOTE_DIR#"~/"}
while [[ "$target" == */ && "$target" != / ]]; do target=${target%/}; done
case "$target" in
  /home/*/* | /root/* | /tmp/*) ;;
  "" | . | "~" | / | /home | /home/* | /root | /tmp | .. | ../* | */.. | */../*)
    usage_error "REMOTE_DIR=$REMOTE_DIR would replace a directory that holds other things;" \
      "name a directory of its own, e.g. grpo_jax"
    ;;
esac

remote_dir=$(remote_path "$REMOTE_DIR")
staging_dir=$(remote_path "$REMOTE_DIR.new")
venv_python="$(remote_path "$VENV_DIR")/bin/python"
tarball_name=grpo_jax_src.tar.gz

# shellcheck disable=SC2016  # $HOME and $PATH expand on the worker
steps=(
  "set -eu"
  'export PATH="$HOME/.local/bin:$PATH"'
  "if ! command -v uv >/dev/null 2>&1; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi"
  "uv --version"
  "rm -rf $staging_dir"
)
if [[ -n "$REPO_URL" ]]; then
  steps+=("git clone --depth 1 --branch $(shell_quote "$BRANCH") $(shell_quote "$REPO_URL") $staging_dir")
else
  [[ -f "$SOURCE_DIR/pyproject.toml" && -d "$SOURCE_DIR/grpo_jax" ]] \
    || die "SOURCE_DIR=$SOURCE_DIR is not a grpo_jax checkout (no pyproject.toml and grpo_jax/)"
  steps+=(
    "mkdir -p $staging_dir"
    "tar -xzf $(remote_path "$tarball_name") -C $staging_dir"
    "rm -f $(remote_path "$tarball_name")"
  )
fi
# output/ (train_tpu.sh's default workdir: checkpoints, metrics) moves into the new tree.
steps+=(
  "if [ -d $remote_dir/output ]; then rm -rf $staging_dir/output; mv $remote_dir/output $staging_dir/output; fi"
  "rm -rf $remote_dir"
  "mv $staging_dir $remote_dir"
  "if [ ! -x $venv_python ]; then uv venv --seed --python $(shell_quote "$PYTHON_VERSION") $(remote_path "$VENV_DIR"); fi"
  "uv pip install --python $venv_python $(shell_quote "$JAX_SPEC") -e $remote_dir"
  "$venv_python -c 'import jax, grpo_jax; print(\"grpo_jax installed, jax\", jax.__version__)'"
)
remote_script=$(join_steps "${steps[@]}")

if [[ -z "$REPO_URL" ]]; then
  tmp_dir=$(mktemp -d)
  trap 'rm -rf "$tmp_dir"' EXIT
  tarball="$tmp_dir/$tarball_name"
  # COPYFILE_DISABLE keeps macOS tar from adding ._* resource-fork files.
  run env COPYFILE_DISABLE=1 tar -czf "$tarball" -C "$SOURCE_DIR" \
    --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./output \
    --exclude=./build --exclude=./dist --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.pytest_cache --exclude='*.egg-info' .
  location_flags
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$tarball_name" --worker=all \
    "${LOCATION_FLAGS[@]}"
fi
ssh_all_workers "$remote_script"
