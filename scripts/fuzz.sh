#!/usr/bin/env bash
# Fuzzes every target under fuzz/ (cargo fuzz, libFuzzer with AddressSanitizer) for SECS seconds each
# (default 600), JOBS at a time (default 2), starting from the committed corpus and the seeds; then
# merges what each run found into a minimal corpus (cargo fuzz cmin) and prints one JSON line per target:
# executions, edges covered, features, corpus files, crashes. Crashing inputs stay in
# fuzz/artifacts/<target>/; copy each to fuzz/regressions/<target>/ once fixed.
#
#   bash scripts/fuzz.sh [SECS] [TARGET...]
#
# cargo-fuzz comes from crates.io (installed if missing); on a stable toolchain RUSTC_BOOTSTRAP=1 lets
# it use the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
shift || true
JOBS=${JOBS:-2}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The seeds, with the main workspace's own build (RUSTC_BOOTSTRAP would make cargo rebuild it).
cargo run --release -q -p ep-fuzzcases --bin fuzz-seeds -- fuzz/corpus
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
(cd fuzz && cargo fuzz build --debug-assertions)
logs=target/fuzz-logs
mkdir -p "$logs"
export SECS logs
run_one() {
  local t=$1
  (cd fuzz && cargo fuzz run --debug-assertions "$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/") >"$logs/$t.log" 2>&1 || true
}
export -f run_one
mkdir -p $(printf 'fuzz/artifacts/%s ' "${targets[@]}")
# FUZZ_SUMMARY_ONLY=1: no fuzzing, only the minimising and the figures of the last runs' logs.
if [ -z "${FUZZ_SUMMARY_ONLY:-}" ]; then
  printf '%s\n' "${targets[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'
fi
for t in "${targets[@]}"; do
  # Minimise: keep the inputs that reach every feature any of them reached.
  (cd fuzz && cargo fuzz cmin --debug-assertions "$t" "corpus/$t" >"../$logs/$t.cmin.log" 2>&1) || true
  # What is committed stays small: beyond CAP_BYTES (default 2 MiB) a target's largest inputs go
  # (never the seeds); the GGUF target's inputs are whole tiny models of ~80 KB each.
  cap=${CAP_BYTES:-2097152}
  while [ "$(du -sb "fuzz/corpus/$t" | cut -f1)" -gt "$cap" ]; do
    big=$(find "fuzz/corpus/$t" -type f ! -name 'seed-*' -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
    [ -n "$big" ] || break
    rm -f "$big"
  done
  log="$logs/$t.log"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l)
  files=$(find "fuzz/corpus/$t" -type f | wc -l)
  bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
  printf '{"target":"%s","seconds":%s,"executions":%s,"coverage_edges":%s,"features":%s,"corpus_files":%s,"corpus_bytes":%s,"crashes":%s}\n' \
    "$t" "$SECS" "${execs:-0}" "${cov:-0}" "${ft:-0}" "$files" "$bytes" "$crashes"
done
