#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench, llama-server and llama-quantize (CPU only) from the
# llama.cpp vendored inside the llama-cpp-python==0.3.36 sdist, for peer
# benchmarking (see scripts/peer/README.md).
#
#   scripts/peer/build-llama-cpp.sh          # idempotent; skips if built
#   FORCE=1 scripts/peer/build-llama-cpp.sh  # rebuild
#
# Environment knobs:
#   EDGEPROMPT_HOME       default ~/.cache/edgeprompt; everything goes to $EDGEPROMPT_HOME/peer
#   LLAMA_CPP_PYTHON_SRC  local llama_cpp_python-0.3.36.tar.gz (sha256-checked) or an
#                         already unpacked llama_cpp_python-0.3.36/ directory; skips the download
#   JOBS                  compile jobs (default: nproc)
#   CMAKE                 cmake binary (default: PATH, then <repo>/.venv/bin/cmake, else a
#                         private venv with `pip install cmake ninja`)
#   FORCE=1               rebuild even if the binaries exist
#
# Outputs: $EDGEPROMPT_HOME/peer/bin/{llama-bench,llama-batched-bench,llama-server,llama-quantize} (statically
# linked against libllama/libggml, so they can be moved around).
# Takes ~15-20 min on 2 cores.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EDGEPROMPT_HOME="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
PEER="$EDGEPROMPT_HOME/peer"
BIN="$PEER/bin"
VERSION=0.3.36
NAME="llama_cpp_python-$VERSION"
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
JOBS="${JOBS:-$(nproc)}"
TARGETS=(llama-bench llama-batched-bench llama-server llama-quantize)

log() { echo "[build-llama-cpp] $*" >&2; }

missing=0
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || missing=1; done
if [ -z "${FORCE:-}" ] && [ "$missing" = 0 ]; then
    log "already built: ${TARGETS[*]} in $BIN (FORCE=1 to rebuild)"
    exit 0
fi
mkdir -p "$PEER" "$BIN"

check_sha() {
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    if [ "$got" != "$SHA256" ]; then
        log "sha256 mismatch for $1: got $got, want $SHA256"
        return 1
    fi
}

# ---- 1. source -------------------------------------------------------------
SRC_ROOT=""
if [ -n "${LLAMA_CPP_PYTHON_SRC:-}" ] && [ -d "$LLAMA_CPP_PYTHON_SRC" ]; then
    SRC_ROOT="$(cd "$LLAMA_CPP_PYTHON_SRC" && pwd)"
    log "using unpacked source $SRC_ROOT"
elif [ -f "$PEER/src/$NAME/vendor/llama.cpp/CMakeLists.txt" ]; then
    SRC_ROOT="$PEER/src/$NAME"
    log "using previously unpacked source $SRC_ROOT"
else
    TARBALL="$PEER/$NAME.tar.gz"
    if [ -n "${LLAMA_CPP_PYTHON_SRC:-}" ]; then
        TARBALL="$LLAMA_CPP_PYTHON_SRC"
        [ -f "$TARBALL" ] || { log "LLAMA_CPP_PYTHON_SRC=$TARBALL not found"; exit 1; }
    elif [ ! -f "$TARBALL" ] || ! check_sha "$TARBALL" 2>/dev/null; then
        # The simple index gives the files.pythonhosted.org URL of the sdist.
        log "looking up $NAME.tar.gz on https://pypi.org/simple/llama-cpp-python/"
        URL="$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ \
              | grep -o "href=\"[^\"]*$NAME\.tar\.gz[^\"]*\"" | head -1 \
              | sed -e 's/^href="//' -e 's/"$//' -e 's/#.*//' -e 's/&amp;/\&/g')"
        [ -n "$URL" ] || { log "sdist URL not found in the PyPI simple index"; exit 1; }
        case "$URL" in http*) ;; *) URL="https://pypi.org/simple/llama-cpp-python/$URL" ;; esac
        log "downloading $URL"
        curl -fL --retry 3 -o "$TARBALL.part" "$URL"
        mv "$TARBALL.part" "$TARBALL"
    fi
    check_sha "$TARBALL"
    log "unpacking $TARBALL"
    rm -rf "$PEER/src/$NAME"
    mkdir -p "$PEER/src"
    tar -xzf "$TARBALL" -C "$PEER/src"
    SRC_ROOT="$PEER/src/$NAME"
fi
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
[ -f "$LLAMA_SRC/CMakeLists.txt" ] || { log "no vendored llama.cpp at $LLAMA_SRC"; exit 1; }
# The tools live under tools/ in recent llama.cpp (examples/ in old ones).
for t in llama-bench batched-bench server quantize; do
    if [ ! -d "$LLAMA_SRC/tools/$t" ] && [ ! -d "$LLAMA_SRC/examples/$t" ]; then
        log "cannot find $t under $LLAMA_SRC/{tools,examples}"; exit 1
    fi
done

# ---- 2. cmake / ninja ------------------------------------------------------
if [ -z "${CMAKE:-}" ]; then
    if command -v cmake >/dev/null 2>&1; then
        CMAKE="$(command -v cmake)"
    elif [ -x "$REPO/.venv/bin/cmake" ]; then
        CMAKE="$REPO/.venv/bin/cmake"
    else
        if [ ! -x "$PEER/venv/bin/cmake" ]; then
            log "installing cmake+ninja into $PEER/venv"
            python3 -m venv "$PEER/venv"
            "$PEER/venv/bin/pip" install --quiet cmake ninja
        fi
        CMAKE="$PEER/venv/bin/cmake"
    fi
fi
GEN=()
CMAKE_DIR="$(dirname "$CMAKE")"
if [ -x "$CMAKE_DIR/ninja" ]; then
    GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$CMAKE_DIR/ninja")
elif command -v ninja >/dev/null 2>&1; then
    GEN=(-G Ninja)
fi
log "cmake: $CMAKE ($("$CMAKE" --version | head -1)), generator: ${GEN[*]:-default}"

# ---- 3. configure + build --------------------------------------------------
BUILD="$PEER/build"
# AMX kernels SIGILL on some of these VMs even when cpuid advertises AMX.
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ -n "${FORCE:-}" ]; then rm -rf "$BUILD"; fi
START=$(date +%s)
"$CMAKE" -S "$LLAMA_SRC" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_RPC=OFF \
    -DGGML_OPENMP=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DCMAKE_C_FLAGS="$NOAMX" \
    -DCMAKE_CXX_FLAGS="$NOAMX"
"$CMAKE" --build "$BUILD" --config Release --target "${TARGETS[@]}" -j "$JOBS"
END=$(date +%s)

for t in "${TARGETS[@]}"; do
    install -m 0755 "$BUILD/bin/$t" "$BIN/$t"
done
{
    echo "source: $NAME (sha256 $SHA256) vendor/llama.cpp"
    echo "llama.cpp commit: $(sed -n 's/.*LLAMA_COMMIT = "\(.*\)";/\1/p' "$BUILD/common/build-info.cpp" 2>/dev/null | head -1)"
    echo "built: $(date -u +%FT%TZ) in $((END - START)) s with -j$JOBS"
    echo "cflags: -march=native (GGML_NATIVE=ON) $NOAMX"
} > "$BIN/BUILD_INFO"
log "built in $((END - START)) s; installed to $BIN"
