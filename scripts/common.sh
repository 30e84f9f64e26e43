# shellcheck shell=bash
# Shared settings, flag parsing and the `run` helper for the TPU VM scripts.
#
# Sourced by create_tpu.sh, setup_tpu.sh, train_tpu.sh, status_tpu.sh and delete_tpu.sh;
# not meant to be run on its own. Every setting has an environment variable and most a flag;
# a flag wins over the environment, the environment over the default.
#
# Written for bash 3.2 too (the macOS system bash): no associative arrays, no namerefs, and
# arrays that may be empty are expanded as ${a[@]+"${a[@]}"}.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "common.sh is sourced by the other scripts in $(dirname "$0")/, not run directly" >&2
  exit 2
fi

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(cd "$SCRIPTS_DIR/.." && pwd)

# ---- Settings (environment variable, else default) ------------------------------------------
TPU_NAME=${TPU_NAME:-grpo-jax}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
DRY_RUN=${DRY_RUN:-0}
# Where things live on each worker: relative paths (and "~/...") are under the worker's home
# directory. Set them as relative paths or quoted ('~/x'): an unquoted ~ expands to *your* home.
REMOTE_DIR=${REMOTE_DIR:-grpo_jax}
VENV_DIR=${VENV_DIR:-grpo_jax_venv}
LOG_DIR=${LOG_DIR:-grpo_jax_logs}

# shellcheck disable=SC2034
COMMON_FLAGS_HELP="Common flags (each also read from the environment variable in brackets):
  --name NAME               TPU VM name [TPU_NAME] (default: grpo-jax)
  --zone ZONE               zone [ZONE] (default: us-west4-a)
  --project PROJECT         GCP project; omitted: gcloud's configured project [PROJECT]
  --accelerator-type TYPE   e.g. v5litepod-8, v4-32 [ACCELERATOR_TYPE] (default: v5litepod-8)
  --runtime-version VER     TPU VM image [RUNTIME_VERSION] (default: v2-alpha-tpuv5-lite)
  --spot                    create a Spot TPU [SPOT=1] (default: 0)
  --dry-run                 print the commands (prefixed '+ ') instead of running them [DRY_RUN=1]
  -h, --help                show this help
  Flags take '--flag VALUE' or '--flag=VALUE'. A flag wins over its environment variable.
  Accelerator types are offered in some zones only (gcloud compute tpus accelerator-types
  list --zone=Z): v4 in us-central2-b (runtime tpu-ubuntu2204-base), v5litepod in e.g.
  us-west4-a or us-central1-a (runtime v2-alpha-tpuv5-lite)."

# ---- Errors ---------------------------------------------------------------------------------
die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

# Needs the calling script's `usage` function.
usage_error() {
  {
    echo "$(basename "$0"): error: $*"
    echo
    usage
  } >&2
  exit 2
}

# ---- Quoting and running commands -----------------------------------------------------------
# One word, quoted for a POSIX shell: left bare when it holds only safe characters, else in
# single quotes (with ' written as '\'').
shell_quote() {
  local word=$1 sq="'" escaped_sq="'\\''"
  if [[ -n "$word" && "$word" != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$sq/$escaped_sq}"
  fi
}

# All words, each quoted, joined by single spaces: a command line a shell reads back as "$@".
quote_words() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command; with DRY_RUN=1 prints it on stdout as "+ <quoted command>" instead.
# When it really runs, the same line goes to stderr first, so logs show what ran.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

# A path on a worker, quoted for the worker's shell. Absolute paths stay as they are; relative
# ones and "~/x" become "$HOME"/x, so they mean the same after a `cd` and $HOME expands there.
remote_path() {
  local path=$1
  path=${path#"~/"}
  # shellcheck disable=SC2016  # $HOME must expand on the worker, not here
  case "$path" in
    /*) shell_quote "$path" ;;
    "~" | "" | .) printf '"$HOME"' ;;
    *) printf '"$HOME"/%s' "$(shell_quote "$path")" ;;
  esac
}

# How a worker path reads in messages: relative ones as ~/path.
display_path() {
  local path=${1#"~/"}
  # shellcheck disable=SC2088  # shown to people, not expanded
  case "$path" in
    /*) printf '%s' "$path" ;;
    *) printf '~/%s' "$path" ;;
  esac
}

# Joins shell statements into one line for `gcloud ... ssh --command`: "; " between them,
# just " " after one that ends in "&" (a background job; "&;" is a syntax error).
join_steps() {
  local step out=""
  for step in "$@"; do
    out+="$step"
    if [[ "$step" == *"&" ]]; then out+=" "; else out+="; "; fi
  done
  out=${out%"; "}
  printf '%s' "${out% }"
}

# ---- gcloud -------------------------------------------------------------------------------
# The location flags every tpu-vm command takes.
location_flags() {
  LOCATION_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION_FLAGS+=("--project=$PROJECT")
  fi
}

# gcloud compute tpus tpu-vm VERB TPU_NAME --zone=... [--project=...] [ARGS...]
tpu_vm() {
  local verb=$1
  shift
  location_flags
  run gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" "${LOCATION_FLAGS[@]}" "$@"
}

# Runs a shell command line on every worker of the slice, all at once.
ssh_all_workers() {
  tpu_vm ssh --worker=all "--command=$1"
}

require_gcloud() {
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)" \
        "or use --dry-run to print the commands"
  fi
}

# ---- Flag parsing ---------------------------------------------------------------------------
# Flags every script takes: "FLAG:VARIABLE" for flags with a value, then switches set to 1.
COMMON_VALUE_FLAGS="--name:TPU_NAME --zone:ZONE --project:PROJECT
  --accelerator-type:ACCELERATOR_TYPE --runtime-version:RUNTIME_VERSION"
COMMON_SWITCH_FLAGS="--spot:SPOT --dry-run:DRY_RUN"

# Looks FLAG up in a "FLAG:VARIABLE ..." table; prints the variable name.
_flag_variable() {
  local flag=$1 entry
  for entry in $2; do
    if [[ "${entry%%:*}" == "$flag" ]]; then
      printf '%s' "${entry#*:}"
      return 0
    fi
  done
  return 1
}

# parse_flags "$@"
#   The calling script may set, before calling:
#     SCRIPT_VALUE_FLAGS   its own "FLAG:VARIABLE" flags that take a value
#     SCRIPT_SWITCH_FLAGS  its own "FLAG:VARIABLE" flags without a value; they set VARIABLE=1
#     SCRIPT_LIST_FLAGS    "FLAG:ARRAY" flags that may repeat; each value is appended to ARRAY
#     ALLOW_PASSTHROUGH=1  accept "--" and collect what follows in PASSTHROUGH_ARGS
#   and must define `usage`. Unknown flags and stray arguments are usage errors (exit 2).
parse_flags() {
  local arg flag value var has_value
  PASSTHROUGH_ARGS=()
  while (($#)); do
    arg=$1
    shift
    case "$arg" in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        [[ "${ALLOW_PASSTHROUGH:-0}" == 1 ]] || usage_error "unexpected '--'"
        # shellcheck disable=SC2034
        PASSTHROUGH_ARGS=("$@")
        break
        ;;
    esac
    flag=$arg
    has_value=0
    value=""
    if [[ "$arg" == --*=* ]]; then
      flag=${arg%%=*}
      value=${arg#*=}
      has_value=1
    fi
    if var=$(_flag_variable "$flag" "$COMMON_SWITCH_FLAGS ${SCRIPT_SWITCH_FLAGS:-}"); then
      ((has_value == 0)) || usage_error "$flag takes no value"
      printf -v "$var" '%s' 1
      continue
    fi
    if var=$(_flag_variable "$flag" "$COMMON_VALUE_FLAGS ${SCRIPT_VALUE_FLAGS:-} ${SCRIPT_LIST_FLAGS:-}"); then
      if ((has_value == 0)); then
        (($#)) || usage_error "$flag needs a value"
        value=$1
        shift
      fi
      if _flag_variable "$flag" "${SCRIPT_LIST_FLAGS:-}" >/dev/null; then
        eval "$var+=(\"\$value\")"
      else
        printf -v "$var" '%s' "$value"
      fi
      continue
    fi
    case "$arg" in
      -*) usage_error "unknown flag: $arg" ;;
      *) usage_error "unexpected argument: $arg" ;;
    esac
  done
  _check_settings
}

_check_settings() {
  local name
  for name in SPOT DRY_RUN; do
    case "${!name}" in
      0 | 1) ;;
      *) usage_error "$name must be 0 or 1, got '${!name}'" ;;
    esac
  done
  for name in TPU_NAME ZONE; do
    [[ -n "${!name}" ]] || usage_error "$name must not be empty"
  done
}
