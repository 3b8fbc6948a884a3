#!/usr/bin/env bash
# The project's test command: fetches the default model and sets up the end-to-end test environment
# (redis-server, a venv with the official openai client; all idempotent), then runs every test in release
# mode (one build; the end-to-end tests run the built binary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
EDGEPROMPT_E2E_PYTHON="$(bash scripts/setup-test-env.sh)"
export EDGEPROMPT_E2E_PYTHON
cargo test --release --workspace "$@"
