#!/usr/bin/env bash
# Shows the TPU VM and, for every worker, whether training runs and the end of its log.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TAIL_LINES=${TAIL_LINES:-50}
FOLLOW=${FOLLOW:-0}

usage() {
  cat <<USAGE
Usage: $(basename "$0") [flags]

Shows the state of \$TPU_NAME and of training on it:
  gcloud compute tpus tpu-vm describe NAME --zone=ZONE [--project=PROJECT]
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...
On every worker it says whether grpo_jax.train is running (LOG_DIR/train.pid) and prints the
last lines of LOG_DIR/train.log (from train_tpu.sh), each line prefixed with [hostname].

Flags (environment variable in brackets):
  -n, --lines N        how many log lines per worker (tail -n N) [TAIL_LINES] (default: 50)
  -f, --follow         keep printing new log lines until Ctrl-C (tail -F) [FOLLOW=1]
  --log-dir DIR        log directory on each worker [LOG_DIR] (default: grpo_jax_logs,
                       under the worker's home directory)

$COMMON_FLAGS_HELP
USAGE
}

# -n and -f are short for --lines and --follow.
args=()
for arg in "$@"; do
  case "$arg" in
    -n) args+=(--lines) ;;
    -f) args+=(--follow) ;;
    *) args+=("$arg") ;;
  esac
done
SCRIPT_VALUE_FLAGS="--lines:TAIL_LINES --log-dir:LOG_DIR"
SCRIPT_SWITCH_FLAGS="--follow:FOLLOW"
parse_flags ${args[@]+"${args[@]}"}
[[ "$TAIL_LINES" =~ ^[0-9]+$ ]] || usage_error "--lines wants a number, got '$TAIL_LINES'"
[[ "$FOLLOW" == 0 || "$FOLLOW" == 1 ]] || usage_error "FOLLOW must be 0 or 1, got '$FOLLOW'"
require_gcloud

log_dir=$(remote_path "$LOG_DIR")
log_file="$log_dir/train.log"
pid_file="$log_dir/train.pid"
# $host is set on the worker; sed -u passes each line on at once while following.
# shellcheck disable=SC2016
prefix_command='sed "s/^/[$host] /"'
tail_command="tail -n $TAIL_LINES"
if [[ "$FOLLOW" == 1 ]]; then
  tail_command+=" -F"
  prefix_command=${prefix_command/sed/sed -u}
fi

# shellcheck disable=SC2016  # $host and $(...) expand on the worker
remote_script=$(join_steps \
  "set -eu" \
  'host=$(hostname)' \
  "if [ -f $pid_file ] && grep -qa grpo_jax.train \"/proc/\$(cat $pid_file)/cmdline\" 2>/dev/null; then state=\"running (pid \$(cat $pid_file))\"; else state=\"not running\"; fi" \
  "echo \"[\$host] training: \$state\"" \
  "if [ -f $log_file ]; then $tail_command $log_file | $prefix_command; else echo \"[\$host] no log yet at\" $(shell_quote "$(display_path "$LOG_DIR/train.log")"); fi")

tpu_vm describe
ssh_all_workers "$remote_script"
