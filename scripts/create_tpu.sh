#!/usr/bin/env bash
# Creates the TPU VM (a single host or a multi-host slice).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [flags]

Creates the TPU VM \$TPU_NAME:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE
      --version=RUNTIME_VERSION [--spot] [--project=PROJECT]
Then install grpo_jax on it with setup_tpu.sh and start training with train_tpu.sh.

$COMMON_FLAGS_HELP

Examples:
  $(basename "$0") --zone us-west4-a --accelerator-type v5litepod-8 --spot
  ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base $(basename "$0")
USAGE
}

parse_flags "$@"
require_gcloud

create_flags=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
if [[ "$SPOT" == 1 ]]; then
  create_flags+=(--spot)
fi
tpu_vm create "${create_flags[@]}"
