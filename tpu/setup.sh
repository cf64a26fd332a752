#!/usr/bin/env bash
# Set up lora-jax on one TPU VM worker: a venv, an up-to-date pip,
# lora-jax[tpu], then a check that JAX sees the TPU. See tpu/README.md.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG [--venv DIR] [--source SRC] [--python EXE] [--install-python] [--dry-run]

Sets up lora-jax on this machine (a TPU VM worker):
  1. creates a venv at DIR (kept as it is when it already exists),
  2. upgrades pip in it,
  3. installs lora-jax with the tpu extra from SRC,
  4. checks the install: python -c "import jax; print(jax.devices())".

Options:
  --venv DIR        where the venv lives (default: \$HOME/lora-jax-venv)
  --source SRC      a directory holding a lora-jax checkout, installed editable
                    as: pip install -e "SRC[tpu]"; or anything else pip takes,
                    e.g. 'lora-jax[tpu]==0.1.0' (default: the checkout this
                    script lives in)
  --python EXE      the Python that creates the venv (default: the first of
                    python3, python3.13, python3.12, python3.11 that is >= 3.11)
  --install-python  when no Python >= 3.11 is found, install python3.11 and
                    python3.11-venv with sudo apt-get (the Ubuntu 22.04 TPU VM
                    images ship Python 3.10)
  --dry-run         print each command, prefixed with '+ ', instead of running it
  -h, --help        show this help

Re-running is safe: an existing venv is reused, pip only upgrades.
On a multi-host slice run this on every worker at the same time (launch.sh
--setup does): the check initialises the TPU runtime, which spans all hosts.
EOF
}

note() {
  printf '%s: %s\n' "$PROG" "$1" >&2
}

# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir == "${BASH_SOURCE[0]}" ]] && script_dir=.
REPO_DIR=$(cd "$script_dir/.." && pwd)

VENV="$HOME/lora-jax-venv"
SOURCE=$REPO_DIR
PYTHON=
INSTALL_PYTHON=0
DRY_RUN=0

while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --install-python) INSTALL_PYTHON=1 ;;
    --venv|--source|--python)
      (($# >= 2)) || die_usage "$1 needs a value"
      [[ -n $2 ]] || die_usage "$1 needs a non-empty value"
      case $1 in
        --venv) VENV=$2 ;;
        --source) SOURCE=$2 ;;
        --python) PYTHON=$2 ;;
      esac
      shift ;;
    --venv=*) VENV=${1#*=}; [[ -n $VENV ]] || die_usage "--venv needs a non-empty value" ;;
    --source=*) SOURCE=${1#*=}; [[ -n $SOURCE ]] || die_usage "--source needs a non-empty value" ;;
    --python=*) PYTHON=${1#*=}; [[ -n $PYTHON ]] || die_usage "--python needs a non-empty value" ;;
    -*) die_usage "unknown option: $1" ;;
    *) die_usage "unexpected argument: $1" ;;
  esac
  shift
done

# True when the given Python is >= 3.11 (lora-jax's requires-python).
python_ok() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

VENV_PY="$VENV/bin/python"
if [[ -x $VENV_PY ]]; then
  python_ok "$VENV_PY" || die "the venv at $VENV runs Python < 3.11; remove it or pick another --venv"
  note "keeping the existing venv at $VENV"
else
  if [[ -n $PYTHON ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "--python $PYTHON: not found"
    python_ok "$PYTHON" || die "--python $PYTHON: lora-jax needs Python >= 3.11"
  elif ! PYTHON=$(find_python); then
    if ((INSTALL_PYTHON)); then
      run sudo apt-get -o DPkg::Lock::Timeout=300 update
      run sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y python3.11 python3.11-venv
      PYTHON=python3.11
    elif ((DRY_RUN)); then
      note "no Python >= 3.11 found here; showing python3.11 (see --install-python)"
      PYTHON=python3.11
    else
      die "no Python >= 3.11 found (lora-jax needs it); pass --python EXE, or --install-python to apt-get install python3.11 python3.11-venv"
    fi
  fi
  run "$PYTHON" -m venv "$VENV"
fi

# A directory is a checkout, installed editable; anything else goes to pip as is.
if [[ -d $SOURCE ]]; then
  [[ -f $SOURCE/pyproject.toml ]] || die "--source $SOURCE: a directory without pyproject.toml"
  SOURCE=$(cd "$SOURCE" && pwd)
  INSTALL=(-e "${SOURCE}[tpu]")
else
  INSTALL=("$SOURCE")
fi

run "$VENV_PY" -m pip install --upgrade pip
run "$VENV_PY" -m pip install "${INSTALL[@]}"
run "$VENV_PY" -c 'import jax; print(jax.devices())'
