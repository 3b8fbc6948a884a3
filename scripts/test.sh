#!/usr/bin/env bash
# The project's test command: fetches the default model (idempotent), then runs every test in release
# mode (one build; the end-to-end tests run the built binary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
# The cloud's Redis store tests start their own redis-server.
command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
cargo test --release --workspace "$@"
