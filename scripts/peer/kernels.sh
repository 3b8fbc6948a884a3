#!/usr/bin/env bash
# Kernel comparison, side by side in one run: llama.cpp's llama-bench against one or more edgeprompt
# binaries (e.g. a baseline commit and the tree), on several GGUF files, interleaved round by round.
# See scripts/peer/README.md.
#
#   scripts/peer/kernels.sh [--reps 3] [--threads 2] [--out FILE] [--models "A.gguf B.gguf"]
#                           [--ep "name=BIN ..."] [--batch 1,32]
#
#   --models   GGUF files (default: the Q4_1 model and its re-quantizations from requantize.sh)
#   --ep       edgeprompt binaries as name=path (default: tree=<repo>/target/release/edgeprompt)
#   --batch    decode batch sizes for edgeprompt's bench micro (llama-bench decodes at batch 1)
#
# Points: prefill 512 (llama-bench -p 512, bench micro --prefill 512) and decode at batch 1 after a
# short context (llama-bench -n 64; bench micro --context 16), plus edgeprompt's batched decode steps.
# Every figure is the median over rounds; the machine is waited on until idle before each command.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EDGEPROMPT_HOME="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
PEER_BIN="${PEER_BIN:-$EDGEPROMPT_HOME/peer/bin}"
REPS=3
THREADS="$(nproc)"
OUT=/dev/stdout
BATCH=1,32
EPS="tree=$REPO/target/release/edgeprompt"
MODELS="$EDGEPROMPT_HOME/SmolLM2-135M-Instruct.Q4_1.gguf"
for t in Q4_0 Q8_0 Q4_K_M; do
    f="$EDGEPROMPT_HOME/requant/SmolLM2-135M-Instruct.$t.gguf"
    [ -f "$f" ] && MODELS="$MODELS $f"
done
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --ep) EPS="$2"; shift 2 ;;
        --batch) BATCH="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "kernels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
LB="$PEER_BIN/llama-bench"
[ -x "$LB" ] || { echo "kernels.sh: missing $LB: run scripts/peer/build-llama-cpp.sh" >&2; exit 1; }
RAW="$(mktemp -d)"; trap 'rm -rf "$RAW"' EXIT

idle() {  # wait (up to 10 min) until the CPUs are <15% busy over 2 s
    local a b i t w=0 busy
    while :; do
        a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat)); t=0
        for i in 1 2 3 4 5 6 7 8; do t=$(( t + b[i] - a[i] )); done
        busy=$(( t > 0 ? 100 * (t - (b[4] + b[5] - a[4] - a[5])) / t : 0 ))
        [ "$busy" -lt 15 ] || [ "$w" -ge 600 ] && break
        echo "[kernels] CPUs ${busy}% busy; waiting" >&2; sleep 10; w=$(( w + 12 ))
    done
}

for ((r = 1; r <= REPS; r++)); do
    for m in $MODELS; do
        tag="$(basename "$m" .gguf)"; tag="${tag//./_}"
        idle
        echo "[kernels] round $r: llama-bench $tag" >&2
        "$LB" -m "$m" -t "$THREADS" -p 512 -n 64 -fa 0 -r 1 -o json > "$RAW/lb.$tag.$r.json" 2> "$RAW/lb.$tag.$r.log" \
            || echo "[kernels] llama-bench failed on $tag" >&2
        for e in $EPS; do
            name="${e%%=*}"; bin="${e#*=}"
            idle
            echo "[kernels] round $r: $name $tag" >&2
            "$bin" bench micro --model "$m" --threads "$THREADS" --reps 1 --prefill 512 --batch "$BATCH" \
                --context 16 --json "$RAW/ep.$name.$tag.$r.jsonl" > "$RAW/ep.$name.$tag.$r.log" 2>&1 \
                || { echo "[kernels] $name failed on $tag: $(tail -1 "$RAW/ep.$name.$tag.$r.log")" >&2; rm -f "$RAW/ep.$name.$tag.$r.jsonl"; }
        done
    done
done

python3 - "$RAW" "$OUT" "$EPS" <<'PY'
import glob, json, os, re, statistics, sys
raw, out, eps = sys.argv[1], sys.argv[2], [e.split("=", 1)[0] for e in sys.argv[3].split()]
s = {}
# file names: lb.TAG.ROUND.json, ep.NAME.TAG.ROUND.jsonl (TAG has no dots)
def add(k, v): s.setdefault(k, []).append(float(v))
for p in glob.glob(os.path.join(raw, "lb.*.json")):
    tag = os.path.basename(p).split(".")[1]
    try:
        for t in json.load(open(p)):
            kind = "prefill" if t["n_prompt"] > 0 else "decode"
            add((tag, "llama.cpp", kind, 1), t["avg_ts"])
    except (ValueError, KeyError):
        pass
for p in glob.glob(os.path.join(raw, "ep.*.jsonl")):
    _, name, tag, _r, _ = os.path.basename(p).split(".")
    for line in open(p):
        j = json.loads(line)
        add((tag, name, j["kind"], j["batch"]), j["tok_s"])
med = {k: statistics.median(v) for k, v in s.items()}
rows = []
with open(out, "w") as f:
    for k, v in sorted(med.items()):
        f.write(json.dumps({"model": k[0], "engine": k[1], "kind": k[2], "batch": k[3], "tok_s": round(v, 1), "runs": len(s[k])}) + "\n")
tags = sorted({k[0] for k in med})
hdr = "| model | point | llama.cpp | " + " | ".join(eps) + " | " + " | ".join(f"{e}/llama.cpp" for e in eps) + " |"
print(hdr, file=sys.stderr)
print("|" + "---|" * (3 + 2 * len(eps)), file=sys.stderr)
for t in tags:
    for kind, b in [("prefill", 1), ("decode", 1)] + [("decode", int(x)) for x in sorted({k[3] for k in med if k[0] == t and k[2] == "decode" and k[3] > 1})]:
        lc = med.get((t, "llama.cpp", kind, b))
        vals = [med.get((t, e, kind, b)) for e in eps]
        cell = lambda v: f"{v:.1f}" if v is not None else "–"
        ratio = lambda v: f"{v / lc:.2f}" if v is not None and lc else "–"
        print(f"| {t} | {kind} b{b} | {cell(lc)} | " + " | ".join(cell(v) for v in vals) + " | " + " | ".join(ratio(v) for v in vals) + " |", file=sys.stderr)
PY
