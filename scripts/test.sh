#!/usr/bin/env bash
# The project's test command: fetches the default model (idempotent), then runs every test in release
# mode (one build; the end-to-end tests run the built binary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
cargo test --release --workspace "$@"
