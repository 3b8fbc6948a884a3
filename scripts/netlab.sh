#!/usr/bin/env bash
# The emulated cloud–edge link (needs root): `bash scripts/netlab.sh up 5g_urban`,
# `bash scripts/netlab.sh up 50,40,0` (MBIT,RTT_MS,LOSS_PCT), `bash scripts/netlab.sh measure`,
# `bash scripts/netlab.sh down`. Extra arguments go to `edgeprompt netlab SUBCOMMAND`.
set -euo pipefail
cd "$(dirname "$0")/.."
sub="${1:-}"
[ -n "$sub" ] || { echo "usage: $0 up PROFILE|MBIT,RTT_MS,LOSS_PCT [args] | down [args] | measure [args]" >&2; exit 2; }
shift
run=(cargo run --release -q -p edgeprompt -- netlab)
case "$sub" in
  up)
    what="${1:?up needs a profile name or MBIT,RTT_MS,LOSS_PCT}"
    shift
    if [[ "$what" == *,* ]]; then
      exec "${run[@]}" up --link "$what" "$@"
    else
      exec "${run[@]}" up --profile "$what" "$@"
    fi
    ;;
  down|measure) exec "${run[@]}" "$sub" "$@" ;;
  *) echo "unknown subcommand '$sub' (up, down, measure)" >&2; exit 2 ;;
esac
