#!/usr/bin/env python3
"""Greedy fixtures for re-quantizations of the default model, from llama.cpp's own `llama-server`.

For each TYPE (default Q4_0 Q8_0 Q4_K_M) this reads $EDGEPROMPT_HOME/requant/SmolLM2-135M-Instruct.<TYPE>.gguf
(made by scripts/peer/requantize.sh with llama.cpp's `llama-quantize --allow-requantize`), starts the
peer `llama-server` (scripts/peer/build-llama-cpp.sh: the llama.cpp of llama-cpp-python 0.3.36) with
weight repacking disabled (`--no-repack`), 2 threads, flash attention off, and for every prompt of
fixtures/smollm2/greedy.json records:

  tokens, top_logprobs   greedy continuation where each step evaluates prompt + generated tokens as
                         one batch with the prompt cache off (llama.cpp's prompt path), top-5 log-probs
  incremental_tokens     llama.cpp's own incremental decode of the same prompt, for information

into fixtures/smollm2/requant/<TYPE>.json with the GGUF's sha256. Which llama.cpp kernels these
come from: with repacking off, Q4_K, Q5_K and Q6_K weights run ggml's `vec_dot` (the order
EdgePrompt reproduces); Q4_0, Q5_0 and Q8_0 run llamafile's tinyBLAS, which cannot be switched off
at run time and sums in another order, so those continuations may part at near-ties (the test's
tolerance). Only the Python standard library is used.

Usage:
  scripts/peer/requantize.sh && python3 scripts/reference/make_requant_fixtures.py [TYPE ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("EDGEPROMPT_HOME", Path.home() / ".cache/edgeprompt"))
PEER = Path(os.environ.get("PEER_BIN", HOME / "peer/bin"))
N_PREDICT = 32
TOP = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def complete(port: int, tokens: list[int], n: int) -> dict:
    return post(
        port,
        {
            "prompt": tokens,
            "n_predict": n,
            "samplers": ["top_k"],
            "top_k": 1,
            "temperature": 0,
            "n_probs": TOP,
            "cache_prompt": False,
            "return_tokens": True,
        },
    )


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def one_type(ty: str, cases: list[dict]) -> None:
    model = HOME / f"requant/SmolLM2-135M-Instruct.{ty}.gguf"
    if not model.exists():
        sys.exit(f"{model}: not found (run scripts/peer/requantize.sh {ty})")
    port = free_port()
    server = subprocess.Popen(
        [str(PEER / "llama-server"), "-m", str(model), "-t", "2", "-c", "2048", "-fa", "off",
         "--no-repack", "--no-warmup", "-np", "1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        out = []
        for c in cases:
            prompt = c["prompt_tokens"]
            toks, tops = [], []
            for _ in range(N_PREDICT):
                r = complete(port, prompt + toks, 1)
                p = r["completion_probabilities"][0]
                toks.append(r["tokens"][0])
                tops.append([[t["id"], t["logprob"]] for t in p["top_logprobs"]])
            inc = complete(port, prompt, N_PREDICT)["tokens"]
            out.append({"prompt": c["prompt"], "prompt_tokens": prompt, "tokens": toks,
                        "top_logprobs": tops, "incremental_tokens": inc})
            print(f"{ty}: case {len(out)}/{len(cases)}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    fixture = {
        "generator": {"llama_server": "llama.cpp of llama-cpp-python 0.3.36",
                      "flags": "-t 2 -c 2048 -fa off --no-repack -np 1",
                      "script": "scripts/reference/make_requant_fixtures.py"},
        "model": model.name,
        "model_sha256": sha256(model),
        "quantized_by": "llama-quantize --allow-requantize (scripts/peer/requantize.sh)",
        "n_predict": N_PREDICT,
        "evaluation": "each step evaluates prompt + generated tokens as one batch, prompt cache off",
        "cases": out,
    }
    dst = REPO / f"fixtures/smollm2/requant/{ty}.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {dst}", file=sys.stderr)


def main() -> None:
    types = sys.argv[1:] or ["Q4_0", "Q8_0", "Q4_K_M"]
    cases = json.loads((REPO / "fixtures/smollm2/greedy.json").read_text())["cases"]
    for ty in types:
        one_type(ty, cases)


if __name__ == "__main__":
    main()
