#!/usr/bin/env bash
# Helpers shared by setup.sh and launch.sh (sourced; they set PROG and DRY_RUN).

die_usage() {
  printf '%s: %s (see --help)\n' "$PROG" "$1" >&2
  exit 2
}

die() {
  printf '%s: %s\n' "$PROG" "$1" >&2
  exit 1
}

# Print one argument as shell input: bare when that is safe, else single-quoted.
quote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

show() {
  local arg
  printf '+'
  for arg in "$@"; do
    printf ' '
    quote "$arg"
  done
  printf '\n'
}

# Run a command, or with --dry-run only print it.
run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    printf '%s\n' "$(show "$@")" >&2
    "$@"
  fi
}
