#!/usr/bin/env bash
# Run one command on every worker of a TPU VM slice, through
# `gcloud compute tpus tpu-vm ssh --worker=all`. See tpu/README.md.
set -euo pipefail

PROG=${0##*/}

# Where --setup puts the checkout on each worker, relative to the home directory.
REMOTE_REPO=lora_jax

usage() {
  cat <<EOF
Usage: $PROG --tpu NAME [options] [-- COMMAND [ARG...]]

Runs COMMAND (default: python -m lora_jax.demo) on every worker of the TPU VM
slice NAME at once, with one
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command '...'
On each worker the command runs with the venv activated, in the work directory.

Options:
  --tpu NAME            the TPU VM (slice) name; required
  --zone ZONE           its zone (default: gcloud's configured compute/zone)
  --project PROJECT     its project (default: gcloud's configured project)
  --venv DIR            the venv on the workers (default: ~/lora-jax-venv);
                        quote a leading ~ ('~/x') so that it means the
                        worker's home, not yours
  --workdir DIR         directory to run in on the workers, created if missing
                        (default: ~/$REMOTE_REPO, where --setup puts the checkout)
  --env KEY=VALUE       export KEY=VALUE on the workers; repeatable
  --setup               first copy this checkout to ~/$REMOTE_REPO on every
                        worker (gcloud ... scp --recurse --worker=all) and run
                        tpu/setup.sh there on all workers at once
  --coordinator HOST:PORT
  --num-processes N     wire jax.distributed explicitly instead of letting it
                        detect the slice (not needed on TPU VMs): each worker
                        gets LORA_JAX_COORDINATOR, LORA_JAX_NUM_PROCESSES and
                        LORA_JAX_PROCESS_ID, the last from \$TPU_WORKER_ID, else
                        the worker number in the TPU VM metadata
                        (agent-worker-number), else the -w-N hostname suffix
  --dry-run             print the commands, prefixed with '+ ', without running them
  -h, --help            show this help

Examples:
  $PROG --tpu my-tpu --zone us-central2-b --setup
  $PROG --tpu my-tpu --zone us-central2-b -- lora-jax train --config configs/x.yaml
EOF
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# A path for the worker's shell: printf %q, but a leading ~ stays unquoted so
# that it expands to the worker's home directory.
remote_path() {
  local p=$1
  if [[ $p == \~ ]]; then
    printf '%s' "$p"
  elif [[ $p == \~/* ]]; then
    printf '%s/%q' \~ "${p#\~/}"
  else
    printf '%q' "$p"
  fi
}

TPU_NAME=
ZONE=
PROJECT=
VENV=\~/lora-jax-venv
WORKDIR=\~/$REMOTE_REPO
ENVS=()
SETUP=0
COORDINATOR=
NUM_PROCESSES=
DRY_RUN=0
CMD=(python -m lora_jax.demo)

while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --setup) SETUP=1 ;;
    --)
      shift
      (($#)) || die_usage "no command after --"
      CMD=("$@")
      break ;;
    --tpu|--zone|--project|--venv|--workdir|--env|--coordinator|--num-processes|\
    --tpu=*|--zone=*|--project=*|--venv=*|--workdir=*|--env=*|--coordinator=*|--num-processes=*)
      if [[ $1 == *=* ]]; then
        opt=${1%%=*} value=${1#*=}
      else
        (($# >= 2)) || die_usage "$1 needs a value"
        opt=$1 value=$2
        shift
      fi
      [[ -n $value ]] || die_usage "$opt needs a non-empty value"
      case $opt in
        --tpu) TPU_NAME=$value ;;
        --zone) ZONE=$value ;;
        --project) PROJECT=$value ;;
        --venv) VENV=$value ;;
        --workdir) WORKDIR=$value ;;
        --env)
          [[ $value =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env $value: expected KEY=VALUE"
          ENVS+=("$value") ;;
        --coordinator)
          [[ $value =~ ^[^[:space:]]+:[0-9]+$ ]] || die_usage "--coordinator $value: expected HOST:PORT"
          COORDINATOR=$value ;;
        --num-processes)
          [[ $value =~ ^[1-9][0-9]*$ ]] || die_usage "--num-processes $value: expected a positive integer"
          NUM_PROCESSES=$value ;;
      esac ;;
    -*) die_usage "unknown option: $1" ;;
    *) die_usage "unexpected argument: $1 (put the command after --)" ;;
  esac
  shift
done

[[ -n $TPU_NAME ]] || die_usage "--tpu NAME is required"
if [[ -n $COORDINATOR && -z $NUM_PROCESSES ]] || [[ -z $COORDINATOR && -n $NUM_PROCESSES ]]; then
  die_usage "--coordinator and --num-processes go together"
fi
if ! ((DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
fi

script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir == "${BASH_SOURCE[0]}" ]] && script_dir=.
REPO_DIR=$(cd "$script_dir/.." && pwd)

WHERE=()
[[ -n $ZONE ]] && WHERE+=(--zone "$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project "$PROJECT")

# Run a shell command line on every worker of the slice.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$1"
}

join() {
  local sep=$1 out=$2 part
  shift 2
  for part in "$@"; do out+="$sep$part"; done
  printf '%s' "$out"
}

VENV_R=$(remote_path "$VENV")
WORKDIR_R=$(remote_path "$WORKDIR")

if ((SETUP)); then
  # The checkout's top-level entries, less hidden ones (.git, .venv, ...) and
  # build output; copied into ~/lora_jax, so re-running overwrites in place.
  sources=()
  for entry in "$REPO_DIR"/*; do
    case ${entry##*/} in
      build|dist|venv|__pycache__|*.egg-info) ;;
      *) sources+=("$entry") ;;
    esac
  done
  ((${#sources[@]})) || die "nothing to copy in $REPO_DIR"
  ssh_all "mkdir -p ~/$REMOTE_REPO"
  run gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" "$TPU_NAME:$REMOTE_REPO" \
    "${WHERE[@]}" --worker=all
  ssh_all "bash ~/$REMOTE_REPO/tpu/setup.sh --venv $VENV_R --install-python"
fi

steps=()
for kv in "${ENVS[@]}"; do
  steps+=("export ${kv%%=*}=$(printf '%q' "${kv#*=}")")
done
if [[ -n $COORDINATOR ]]; then
  steps+=("export LORA_JAX_COORDINATOR=$(printf '%q' "$COORDINATOR") LORA_JAX_NUM_PROCESSES=$NUM_PROCESSES")
  # One command line serves every worker, so each worker finds its own id.
  IFS= read -r -d '' process_id <<'EOF' || true
LORA_JAX_PROCESS_ID=${TPU_WORKER_ID:-}
if [ -z "$LORA_JAX_PROCESS_ID" ]; then LORA_JAX_PROCESS_ID=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || true); fi
if [ -z "$LORA_JAX_PROCESS_ID" ]; then h=$(hostname) && case $h in *-w-[0-9]*) LORA_JAX_PROCESS_ID=${h##*-w-} ;; esac; fi
case $LORA_JAX_PROCESS_ID in ""|*[!0-9]*) echo "launch.sh: no process id on $(hostname): no TPU_WORKER_ID, metadata agent-worker-number or -w-N hostname suffix" >&2; exit 1 ;; esac
if [ "$LORA_JAX_PROCESS_ID" -ge "$LORA_JAX_NUM_PROCESSES" ]; then echo "launch.sh: process id $LORA_JAX_PROCESS_ID on $(hostname) is not below --num-processes $LORA_JAX_NUM_PROCESSES" >&2; exit 1; fi
export LORA_JAX_PROCESS_ID
EOF
  process_id=${process_id%$'\n'}
  sep=' && '  # quoted below: in a bash 5.2 replacement a bare & is the match
  steps+=("${process_id//$'\n'/"$sep"}")
fi
steps+=("source $VENV_R/bin/activate" "mkdir -p $WORKDIR_R" "cd $WORKDIR_R")
printf -v command_line '%q ' "${CMD[@]}"
steps+=("${command_line% }")

ssh_all "$(join ' && ' "${steps[@]}")"
