#!/usr/bin/env bash
# Deletes the TPU VM, without asking (its disks and anything not in a bucket go with it).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [flags]

Deletes the TPU VM \$TPU_NAME without a confirmation prompt:
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE [--project=PROJECT] --quiet
Everything on the workers' disks is lost: keep checkpoints in a bucket (train_tpu.sh --bucket).

$COMMON_FLAGS_HELP
USAGE
}

parse_flags "$@"
require_gcloud

tpu_vm delete --quiet
