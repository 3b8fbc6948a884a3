#!/usr/bin/env bash
# The loopback fleet (root): builds EdgePrompt, starts a 3-master Redis Cluster (with replicas), 2 cloud
# replicas, a site cache (nginx), a router (HAProxy) and 3 edges in network namespaces joined by a
# shaped link, tests compute-once, takeover, the site cache and faults under load, and tears it all
# down (`edgeprompt fleet test`, docs/deployment.md). Progress on stderr; the last stdout line is one
# JSON object with the figures. Extra arguments go to `edgeprompt fleet test` (e.g. --link fiber,
# --requests 120, --work DIR to keep the logs and configurations).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/fleet/test.sh: needs root (network namespaces)" >&2
  exit 2
fi
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)..." >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
bash scripts/fetch-model.sh >&2
cargo build --release -q -p edgeprompt >&2
exec target/release/edgeprompt fleet test "$@"
