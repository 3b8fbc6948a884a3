#!/usr/bin/env bash
# Re-quantizes the default model with llama.cpp's own `llama-quantize --allow-requantize` into the
# formats users most often download, for the kernel benchmarks and the greedy fixtures of
# scripts/reference/make_requant_fixtures.py. See scripts/peer/README.md.
#
#   scripts/peer/requantize.sh [TYPE ...]      (default: Q4_0 Q8_0 Q4_K_M)
#
# Writes $EDGEPROMPT_HOME/requant/SmolLM2-135M-Instruct.<TYPE>.gguf (skips files already there)
# and prints each file's sha256. Needs llama-quantize from scripts/peer/build-llama-cpp.sh.
# llama-quantize is deterministic (no importance matrix), so the same source file gives the same
# bytes on every machine; the fixtures record the sha256 they were made from.
set -euo pipefail

EDGEPROMPT_HOME="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
PEER_BIN="${PEER_BIN:-$EDGEPROMPT_HOME/peer/bin}"
SRC="${MODEL:-$EDGEPROMPT_HOME/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="$EDGEPROMPT_HOME/requant"
QUANTIZE="$PEER_BIN/llama-quantize"

if [ ! -x "$QUANTIZE" ]; then
    echo "requantize: $QUANTIZE not found; run scripts/peer/build-llama-cpp.sh first" >&2
    exit 1
fi
if [ ! -f "$SRC" ]; then
    echo "requantize: $SRC not found; run scripts/fetch-model.sh first" >&2
    exit 1
fi
[ $# -gt 0 ] || set -- Q4_0 Q8_0 Q4_K_M
mkdir -p "$OUT"
for t in "$@"; do
    dst="$OUT/SmolLM2-135M-Instruct.$t.gguf"
    if [ ! -f "$dst" ]; then
        tmp="$dst.tmp.$$"
        "$QUANTIZE" --allow-requantize "$SRC" "$tmp" "$t" "$(nproc)" > "$OUT/$t.log" 2>&1 || {
            echo "requantize: llama-quantize $t failed, see $OUT/$t.log" >&2
            rm -f "$tmp"
            exit 1
        }
        mv "$tmp" "$dst"
    fi
    echo "$t $(sha256sum "$dst" | cut -d' ' -f1) $dst"
done
