#!/usr/bin/env bash
# Peer benchmark: llama.cpp's llama-bench / llama-batched-bench on the same GGUF
# as EdgePrompt, CPU only, flash attention off. See scripts/peer/README.md.
#
#   scripts/peer/run.sh [--model PATH] [--threads N] [--reps 3] [--out FILE] [--compare]
#
#   --model PATH   GGUF (default: $EDGEPROMPT_HOME/SmolLM2-135M-Instruct.Q4_1.gguf)
#   --threads N    threads for both engines (default: nproc)
#   --reps N       repetitions; every number is the median of N runs (default 3)
#   --out FILE     JSON-lines records go here (default: stdout)
#   --compare      also run `edgeprompt bench micro`, interleaved with llama.cpp
#                  round by round, and print an edgeprompt/llama.cpp ratio table
#   --keep DIR     keep the raw tool outputs in DIR (default: a temp dir, removed)
#   --from DIR     don't run anything: re-parse the raw outputs kept earlier with --keep DIR
#   --idle-wait S  before each command wait up to S seconds (default 900) for the CPUs to be
#                  idle (<15% busy over 2 s); 0 = don't wait. llama.cpp's spinning thread
#                  barriers collapse (10x slower) when another process competes for the cores.
#
# Environment: EDGEPROMPT_HOME (default ~/.cache/edgeprompt), PEER_BIN (default
# $EDGEPROMPT_HOME/peer/bin), EDGEPROMPT_BIN (default <repo>/target/release/edgeprompt).
# The human-readable summary goes to stderr; records go to --out / stdout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EDGEPROMPT_HOME="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
PEER_BIN="${PEER_BIN:-$EDGEPROMPT_HOME/peer/bin}"
EP="${EDGEPROMPT_BIN:-$REPO/target/release/edgeprompt}"
MODEL="$EDGEPROMPT_HOME/SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS="$(nproc)"
REPS=3
OUT=""
COMPARE=0
KEEP=""
IDLE_WAIT=900
FROM=""
BATCH_MODES="${BATCH_MODES:-paged}"

while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --compare) COMPARE=1; shift ;;
        --keep) KEEP="$2"; shift 2 ;;
        --idle-wait) IDLE_WAIT="$2"; shift 2 ;;
        --from) FROM="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "[peer] $*" >&2; }

if [ -n "$FROM" ]; then
    [ -d "$FROM" ] || { log "--from: no directory $FROM"; exit 1; }
    RAW="$FROM"; EP_OK=0; NOISY=0
    if ls "$RAW"/ep-*.jsonl >/dev/null 2>&1; then EP_OK=1; fi
    THREADS="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["n_threads"])' \
               "$(ls "$RAW"/lb-*.json | head -1)" 2>/dev/null || echo "$THREADS")"
else
LB="$PEER_BIN/llama-bench"
BB="$PEER_BIN/llama-batched-bench"
for b in "$LB" "$BB"; do
    [ -x "$b" ] || { log "missing $b: run scripts/peer/build-llama-cpp.sh first"; exit 1; }
done
[ -f "$MODEL" ] || { log "model not found: $MODEL"; exit 1; }

if [ -n "$KEEP" ]; then
    RAW="$KEEP"; mkdir -p "$RAW"
else
    RAW="$(mktemp -d)"; trap 'rm -rf "$RAW"' EXIT
fi

# `edgeprompt bench micro` available?
EP_OK=0
if [ "$COMPARE" = 1 ]; then
    if [ -x "$EP" ] && "$EP" bench micro --help >/dev/null 2>&1; then
        EP_OK=1
    else
        log "WARNING: $EP has no working 'bench micro'; printing llama.cpp numbers alone"
    fi
fi

# In --compare mode each round runs every tool once (llama-bench -r 1) so the two
# engines see the same drift; otherwise llama-bench does its REPS itself.
if [ "$EP_OK" = 1 ]; then ROUNDS="$REPS"; LB_REPS=1; else ROUNDS=1; LB_REPS="$REPS"; fi
BB_RUNS_PER_ROUND=$(( ROUNDS == 1 ? REPS : 1 ))

run_cmd() {  # run_cmd OUTFILE cmd...   (stdout -> OUTFILE, stderr -> OUTFILE.log)
    local out="$1"; shift
    if [ "$IDLE_WAIT" -gt 0 ]; then wait_idle; fi
    log "\$ $*"
    echo "$*" >> "$RAW/commands.txt"
    "$@" > "$out" 2> "$out.log" || { log "FAILED (exit $?), see $out.log:"; tail -5 "$out.log" >&2; return 1; }
}

run_llama() {  # run_llama ROUND
    local r="$1" i
    # prompt processing 512 tok + decode 128 tok at batch 1, empty context
    run_cmd "$RAW/lb-short-r$r.json" "$LB" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -fa 0 -r "$LB_REPS" -o json || true
    # decode 128 tok at batch 1 after 1024 tokens of context (-d / --n-depth)
    run_cmd "$RAW/lb-depth-r$r.json" "$LB" -m "$MODEL" -t "$THREADS" -p 0 -n 128 -d 1024 -fa 0 -r "$LB_REPS" -o json || true
    for ((i = 1; i <= BB_RUNS_PER_ROUND; i++)); do
        # 1024-token shared prompt, then 64 decode steps for 1/8/32 sequences
        run_cmd "$RAW/bb-nokvu-r$r-$i.jsonl" "$BB" -m "$MODEL" -t "$THREADS" -c 40960 -b 2048 -ub 512 \
            -npp 1024 -ntg 64 -npl 1,8,32 -pps -fa off --output-format jsonl || true
        run_cmd "$RAW/bb-kvu-r$r-$i.jsonl" "$BB" -m "$MODEL" -t "$THREADS" -c 40960 -b 2048 -ub 512 \
            -npp 1024 -ntg 64 -npl 1,8,32 -pps -kvu -fa off --output-format jsonl || true
    done
}

run_edgeprompt() {  # run_edgeprompt ROUND
    local r="$1"
    run_cmd "$RAW/ep-r$r.stdout" "$EP" bench micro --model "$MODEL" --threads "$THREADS" --reps 1 \
        --json "$RAW/ep-r$r.jsonl" || { log "edgeprompt bench micro failed in round $r"; rm -f "$RAW/ep-r$r.jsonl"; }
    # the engine's paged mode on llama-batched-bench's workload: 1024 shared tokens, 64 generated
    if "$EP" bench batch --help >/dev/null 2>&1; then
        run_cmd "$RAW/epb-r$r.stdout" "$EP" bench batch --model "$MODEL" --threads "$THREADS" --reps 1 \
            --modes "$BATCH_MODES" --prefix-tokens 1024 --batch 1,8,32 --groups 1 --gen 64 \
            --json "$RAW/epb-r$r.jsonl" || { log "edgeprompt bench batch failed in round $r"; rm -f "$RAW/epb-r$r.jsonl"; }
    fi
}

cpu_busy_pct() {  # percent of all CPU time spent busy over 2 s
    local a b
    a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat))
    local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

wait_idle() {
    local waited=0 busy
    busy=$(cpu_busy_pct)
    while [ "$busy" -ge 15 ] && [ "$waited" -lt "$IDLE_WAIT" ]; do
        log "CPUs ${busy}% busy with other work; waiting for idle (${waited}/${IDLE_WAIT}s)"
        sleep 28; waited=$(( waited + 30 )); busy=$(cpu_busy_pct)
    done
    if [ "$busy" -ge 15 ]; then
        log "WARNING: measuring while CPUs are ${busy}% busy: llama.cpp numbers will be far too low"
        NOISY=1
    fi
}

NOISY=0
START=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    run_llama "$r"
    if [ "$EP_OK" = 1 ]; then run_edgeprompt "$r"; fi
done
log "done in $(( $(date +%s) - START )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
[ "$NOISY" = 1 ] && log "WARNING: some rounds ran on a busy machine"
fi  # not --from

PEER_THREADS="$THREADS" PEER_COMPARE="$EP_OK" python3 - "$RAW" "${OUT:-/dev/stdout}" <<'PY'
import glob, json, os, statistics, sys

raw, out = sys.argv[1], sys.argv[2]
threads = int(os.environ["PEER_THREADS"])
compare = os.environ.get("PEER_COMPARE") == "1"
samples = {}  # key -> list of tok/s

def add(key, vals):
    samples.setdefault(key, []).extend(float(v) for v in vals)

def json_lines(path):
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    pass

# llama-bench -o json: an array of tests with n_prompt, n_gen, n_depth, samples_ts
for path in sorted(glob.glob(os.path.join(raw, "lb-*.json"))):
    try:
        tests = json.load(open(path))
    except ValueError:
        print(f"[peer] cannot parse {path}", file=sys.stderr)
        continue
    for t in tests:
        vals = t.get("samples_ts") or [t["avg_ts"]]
        if t["n_prompt"] > 0 and t["n_gen"] == 0:
            add(("llama.cpp", "llama-bench", "prefill", 1, t["n_depth"], t["n_prompt"], None), vals)
        elif t["n_gen"] > 0 and t["n_prompt"] == 0:
            add(("llama.cpp", "llama-bench", "decode", 1, t["n_depth"], t["n_gen"], None), vals)

# llama-batched-bench --output-format jsonl: one line per (pp, tg, pl)
for path in sorted(glob.glob(os.path.join(raw, "bb-*.jsonl"))):
    kvu = "-kvu-" in os.path.basename(path)
    for j in json_lines(path):
        if "speed_tg" not in j:
            continue
        pl, pp, tg = j["pl"], j["pp"], j["tg"]
        add(("llama.cpp", "llama-batched-bench", "decode", pl, pp, tg, kvu), [j["speed_tg"]])
        if pl == 1:  # S_PP of the shared prompt is the same run for every pl; keep one
            add(("llama.cpp", "llama-batched-bench", "prefill", 1, 0, pp, kvu), [j["speed_pp"]])

# edgeprompt bench batch --json: mode, prefix_tokens, batch, gen_tokens, decode_tok_s, decode_runs
for path in sorted(glob.glob(os.path.join(raw, "epb-*.jsonl"))):
    for j in json_lines(path):
        add(("edgeprompt", "bench batch " + j["mode"], "decode", j["batch"], j["prefix_tokens"],
             j["gen_tokens"], None), j.get("decode_runs") or [j["decode_tok_s"]])

# edgeprompt bench micro --json: engine, kind, batch, context, tokens, tok_s, runs
for path in sorted(glob.glob(os.path.join(raw, "ep-*.jsonl"))):
    for j in json_lines(path):
        add(("edgeprompt", "bench micro", j["kind"], j["batch"], j["context"], j.get("tokens"), None),
            j.get("runs") or [j["tok_s"]])

recs = []
for key, vals in samples.items():
    engine, tool, kind, batch, context, tokens, kvu = key
    rec = {"engine": engine, "tool": tool, "kind": kind, "batch": batch, "context": context,
           "tokens": tokens, "tok_s": round(statistics.median(vals), 2), "best": round(max(vals), 2),
           "runs": [round(v, 2) for v in vals], "threads": threads}
    if kvu is not None:
        rec["kvu"] = kvu
    recs.append(rec)
recs.sort(key=lambda r: (r["engine"] != "llama.cpp", r["kind"] != "prefill", r["tool"],
                         r.get("kvu", False), r["context"], r["batch"]))
with open(out, "w") as f:
    for r in recs:
        f.write(json.dumps(r) + "\n")

def bucket(r):
    # llama-bench's tg128 starts from an empty KV and edgeprompt's "short" decode from 16 tokens:
    # treat any context <= 128 as "short".  Prefill is keyed by its prompt length.
    if r["kind"] == "prefill":
        return ("prefill", r["batch"], f"pp{r['tokens']}")
    return ("decode", r["batch"], "short" if r["context"] <= 128 else str(r["context"]))

err = sys.stderr
print("\nllama.cpp (tok/s, median and best of the runs; decode = aggregate over the batch)", file=err)
print(f"{'tool':<20} {'kind':<8} {'batch':>5} {'ctx':>6} {'tok':>5} {'kvu':>5} {'median':>8} {'best':>8}", file=err)
for r in recs:
    if r["engine"] != "llama.cpp":
        continue
    kv = "" if "kvu" not in r else ("yes" if r["kvu"] else "no")
    print(f"{r['tool']:<20} {r['kind']:<8} {r['batch']:>5} {r['context']:>6} {r['tokens']:>5} {kv:>5} {r['tok_s']:>8.1f} {r['best']:>8.1f}", file=err)

if compare:
    ep = {bucket(r): r for r in recs if r["tool"] == "bench micro"}
    print("\nedgeprompt / llama.cpp (ratio > 1 means edgeprompt is faster; medians, and best-of-runs)", file=err)
    print(f"{'kind':<8} {'batch':>5} {'ctx':>6} {'llama.cpp tool':<26} {'llama.cpp':>10} {'edgeprompt':>11} {'ratio':>7} {'best ratio':>11}", file=err)
    matched = 0
    for r in recs:
        if r["engine"] != "llama.cpp" or bucket(r) not in ep:
            continue
        e = ep[bucket(r)]
        tool = r["tool"] + ("" if "kvu" not in r else (" -kvu" if r["kvu"] else " no-kvu"))
        print(f"{r['kind']:<8} {r['batch']:>5} {bucket(r)[2]:>6} {tool:<26} {r['tok_s']:>10.1f} {e['tok_s']:>11.1f} {e['tok_s'] / r['tok_s']:>7.2f} {e['best'] / r['best']:>11.2f}", file=err)
        matched += 1
    if not matched:
        print("(no matching keys)", file=err)
    # The engine (continuous batching, paged KV with the shared prompt's blocks stored once) against
    # llama-batched-bench on the same workload: -pps with and without -kvu.
    eb = [r for r in recs if r["tool"].startswith("bench batch")]
    if eb:
        print("\nedgeprompt engine (bench batch) / llama-batched-bench -pps, 1024 shared tokens, decode tok/s", file=err)
        print(f"{'mode':<8} {'batch':>5} {'edgeprompt':>11} {'no-kvu':>8} {'ratio':>6} {'best':>6} {'-kvu':>8} {'ratio':>6} {'best':>6}", file=err)
        for e in sorted(eb, key=lambda r: (r["tool"], r["batch"])):
            row = f"{e['tool'][12:]:<8} {e['batch']:>5} {e['tok_s']:>11.1f}"
            for kvu in (False, True):
                m = [r for r in recs if r["tool"] == "llama-batched-bench" and r["kind"] == "decode"
                     and r["batch"] == e["batch"] and r["context"] == e["context"] and r.get("kvu") == kvu]
                if m:
                    row += f" {m[0]['tok_s']:>8.1f} {e['tok_s'] / m[0]['tok_s']:>6.2f} {e['best'] / m[0]['best']:>6.2f}"
                else:
                    row += f" {'-':>8} {'-':>6} {'-':>6}"
            print(row, file=err)
PY
