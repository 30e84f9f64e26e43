#!/usr/bin/env bash
# Starts `python -m grpo_jax.train` on every worker of the TPU VM, in the background.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BUCKET=${BUCKET:-}
WORKDIR=${WORKDIR:-}
TRAIN_ENV=()

usage() {
  cat <<USAGE
Usage: $(basename "$0") [flags] [-- TRAIN_ARGS...]

Starts training on every worker of \$TPU_NAME (gcloud ... ssh --worker=all) with the same
command line:
  cd REMOTE_DIR && nohup VENV_DIR/bin/python -m grpo_jax.train --workdir=WORKDIR TRAIN_ARGS...
Everything after '--' is passed to grpo_jax.train unchanged (quoted for the remote shell), e.g.
  $(basename "$0") --bucket my-bucket -- --config=configs/gsm8k.py --config.learning_rate=1e-6

Multi-host slices (e.g. v4-32, v5litepod-16) run one JAX process per host, and every host must
run the same command at the same time: that is why this always uses --worker=all. Their
checkpoints must go to storage all hosts share, so use --bucket (or a gs:// --workdir) there;
the TPU VM's service account needs write access to the bucket.

Spot and preemptible slices: on preemption every worker's trainer gets SIGTERM, writes a
checkpoint within --config.preemption_grace_seconds (default 25) and exits with 143. Once
the slice is back (or recreated and set up again), rerun this same command: training
resumes from the newest complete checkpoint in WORKDIR, on the trajectory it was on. A
recreated slice has fresh disks, so on spot slices use --bucket (a gs:// workdir).

Training runs in the background (nohup), so this returns once it has started. Each worker
appends its output to LOG_DIR/train.log and writes the process id to LOG_DIR/train.pid;
follow it with status_tpu.sh. A worker where training is still running refuses to start
another.

Flags (environment variable in brackets):
  --bucket BUCKET        GCS bucket (name, no gs://); the default workdir becomes
                         gs://BUCKET/grpo_jax/TPU_NAME [BUCKET]
  --workdir DIR          workdir passed to grpo_jax.train [WORKDIR] (default:
                         gs://BUCKET/grpo_jax/TPU_NAME with a bucket, else output, which is
                         REMOTE_DIR/output on each worker); a --workdir after '--' wins
  --env NAME=VALUE       environment variable for the training process (repeatable),
                         e.g. --env HF_TOKEN=... --env TF_CPP_MIN_LOG_LEVEL=3
  --remote-dir DIR       grpo_jax source on each worker [REMOTE_DIR] (default: grpo_jax)
  --venv DIR             venv on each worker [VENV_DIR] (default: grpo_jax_venv)
  --log-dir DIR          log directory on each worker [LOG_DIR] (default: grpo_jax_logs)
  Relative worker paths are under the worker's home directory.

$COMMON_FLAGS_HELP
USAGE
}

SCRIPT_VALUE_FLAGS="--bucket:BUCKET --workdir:WORKDIR --remote-dir:REMOTE_DIR --venv:VENV_DIR
  --log-dir:LOG_DIR"
SCRIPT_LIST_FLAGS="--env:TRAIN_ENV"
ALLOW_PASSTHROUGH=1
parse_flags "$@"
require_gcloud

BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
if [[ -z "$WORKDIR" ]]; then
  if [[ -n "$BUCKET" ]]; then
    WORKDIR="gs://$BUCKET/grpo_jax/$TPU_NAME"
  else
    WORKDIR=output
  fi
fi
for assignment in ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"}; do
  [[ "$assignment" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants NAME=VALUE, got '$assignment'"
done

log_dir=$(remote_path "$LOG_DIR")
log_file="$log_dir/train.log"
pid_file="$log_dir/train.pid"
# Quoted word by word; the venv's python is quoted on its own so that "$HOME" expands there.
train_command="$(quote_words env PYTHONUNBUFFERED=1 ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"})"
train_command+=" $(remote_path "$VENV_DIR")/bin/python"
train_command+=" $(quote_words -m grpo_jax.train "--workdir=$WORKDIR" \
  ${PASSTHROUGH_ARGS[@]+"${PASSTHROUGH_ARGS[@]}"})"
# A pid file from an earlier run only counts while that pid is still a grpo_jax.train process.
running="[ -f $pid_file ] && grep -qa grpo_jax.train \"/proc/\$(cat $pid_file)/cmdline\" 2>/dev/null"

remote_script=$(join_steps \
  "set -eu" \
  "mkdir -p $log_dir" \
  "if $running; then echo \"\$(hostname): training is already running (pid \$(cat $pid_file)); stop it first with: kill \$(cat $pid_file)\" >&2; exit 1; fi" \
  "cd $(remote_path "$REMOTE_DIR")" \
  "set -- $train_command" \
  "echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): \$*\" >> $log_file" \
  "nohup \"\$@\" >> $log_file 2>&1 < /dev/null &" \
  "echo \$! > $pid_file" \
  "echo \"\$(hostname): training started (pid \$!), log:\" $(shell_quote "$(display_path "$LOG_DIR/train.log")")")

ssh_all_workers "$remote_script"
