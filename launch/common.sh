# shellcheck shell=bash
# Shared by the launchers (sourced): usage errors and shell quoting of printed commands.
# The sourcing script defines PROG and usage().

die_usage() {
  echo "$PROG: $*" >&2
  usage >&2
  exit 2
}

# Shell-quotes one word so that printed commands can be pasted back into a shell.
SQ="'\\''"
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *\'* ]]; then
    printf "'%s'" "$1"
  elif [[ ! $1 =~ [\"\$\`\\!] ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/$SQ}"
  fi
}

join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
