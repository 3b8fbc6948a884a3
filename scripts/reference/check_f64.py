#!/usr/bin/env python3
"""Optional cross-check of fixtures/smollm2/greedy.json against a plain float64
numpy forward pass (weights dequantized with gguf-py, no activation
quantization, no f16 KV cache).

llama.cpp's CPU path quantizes activations to Q8 before every Q4_1/Q8_0
matmul and keeps K/V in f16; this script shows how far that moves the logits
for this model (it is a lot: see README.md). Needs `gguf` (pip install gguf,
or PYTHONPATH=<llama-cpp-python sdist>/vendor/llama.cpp/gguf-py plus pyyaml).

  .venv/bin/python scripts/reference/check_f64.py [--model PATH] [--fixture FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r: GGUFReader, key: str):
    f = r.fields[key]
    return f.parts[f.data[0]][0].item()


class Model:
    def __init__(self, path: Path):
        r = GGUFReader(str(path))
        assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "llama"
        self.n_layer = int(field(r, "llama.block_count"))
        self.n_embd = int(field(r, "llama.embedding_length"))
        self.n_head = int(field(r, "llama.attention.head_count"))
        self.n_head_kv = int(field(r, "llama.attention.head_count_kv"))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.base = float(field(r, "llama.rope.freq_base"))
        self.hd = self.n_embd // self.n_head
        self.w = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.w[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if len(t.shape) > 1 else a.reshape(-1)
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):  # llama.cpp LLAMA_ROPE_TYPE_NORM: adjacent pairs
        inv = self.base ** (-np.arange(0, self.hd, 2) / self.hd)
        ang = pos[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def logits(self, toks: list[int]) -> np.ndarray:
        T, H, KV, HD, w = len(toks), self.n_head, self.n_head_kv, self.hd, self.w
        pos = np.arange(T, dtype=np.float64)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        x = w["token_embd.weight"][toks]
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rms(x, w[p + "attn_norm.weight"])
            q = self.rope((h @ w[p + "attn_q.weight"].T).reshape(T, H, HD), pos)
            k = self.rope((h @ w[p + "attn_k.weight"].T).reshape(T, KV, HD), pos)
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, KV, HD)
            o = np.empty((T, H, HD))
            for hh in range(H):
                kv = hh // (H // KV)
                s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(HD) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                o[:, hh, :] = (s / s.sum(-1, keepdims=True)) @ v[:, kv, :]
            x = x + o.reshape(T, -1) @ w[p + "attn_output.weight"].T
            h = self.rms(x, w[p + "ffn_norm.weight"])
            g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
        return self.rms(x, w["output_norm.weight"]) @ self.out.T


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    home = Path(os.environ.get("EDGEPROMPT_HOME", Path.home() / ".cache" / "edgeprompt"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=home / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--fixture", type=Path, default=Path("fixtures/smollm2/greedy.json"))
    args = ap.parse_args()
    m = Model(args.model)
    g = json.loads(args.fixture.read_text(encoding="utf-8"))
    for ci, c in enumerate(g["cases"]):
        n = len(c["prompt_tokens"])
        lp = log_softmax(m.logits(c["prompt_tokens"] + c["tokens"][:-1]))
        agree, first, worst = 0, None, 0.0
        for k, top in enumerate(c["top_logprobs"]):
            row = lp[n - 1 + k]
            if int(np.argmax(row)) == c["tokens"][k]:
                agree += 1
            elif first is None:
                first = k
            worst = max(worst, max(abs(row[i] - v) for i, v in top))
        print(
            f"case {ci:2d}: teacher-forced argmax agrees {agree}/{len(c['tokens'])}, "
            f"first disagreement at step {first}, max |dlogprob| on llama.cpp top-5 {worst:.3f}"
        )


if __name__ == "__main__":
    main()
