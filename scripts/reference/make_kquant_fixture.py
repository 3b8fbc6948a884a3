#!/usr/bin/env python3
"""K-quant dequantisation fixture from the PyPI `gguf` package's own dequantisers.

For each of Q4_K, Q5_K and Q6_K this builds NBLOCKS blocks of raw bytes (random, with a few crafted
ones: zero, negative, subnormal, huge and infinite super-block scales, and all-ones / all-zero scale
bytes), dequantises them with `gguf.quants.dequantize` (gguf-py's numpy code, written independently
of ggml's C and of EdgePrompt) and writes, into --out (default fixtures/kquant):

  <name>.bin   for name in q4_K, q5_K, q6_K: the NBLOCKS raw blocks (NBLOCKS * block bytes), followed
               by the NBLOCKS * 256 dequantised values as little-endian f32.

`crates/kernels/tests/kquant_matmul.rs` reads these files and requires `dequantize_row` to give the
same f32 bits (NaN compared as NaN). The inputs come from numpy's PCG64 with a fixed seed, so a rerun
writes byte-identical files.

Usage (repo venv with numpy and `gguf`, see scripts/reference/README.md):

  .venv/bin/python scripts/reference/make_kquant_fixture.py [--out fixtures/kquant]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

NBLOCKS = 32
SEED = 0x4B5155414E54  # "KQUANT"

# name, type, block bytes, byte offsets of the f16 super-block scales, byte range of the sub-block
# scales
TYPES = [
    ("q4_K", T.Q4_K, 144, (0, 2), (4, 16)),
    ("q5_K", T.Q5_K, 176, (0, 2), (4, 16)),
    ("q6_K", T.Q6_K, 210, (208,), (192, 208)),
]

# Crafted f16 scales for the first blocks: 0, -0, negative, smallest subnormal, largest subnormal,
# largest finite, +inf, -inf.
SPECIAL_F16 = [0x0000, 0x8000, 0xB800, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0xFC00]


def blocks_for(rng: np.random.Generator, nbytes: int, scale_offsets, sub_scales) -> np.ndarray:
    raw = rng.integers(0, 256, size=(NBLOCKS, nbytes), dtype=np.uint8)
    # Most blocks: finite normal f16 scales of moderate size (exponent 2^-10 .. 2^1), either sign.
    for b in range(NBLOCKS):
        for o in scale_offsets:
            sign = int(rng.integers(0, 2)) << 15
            exp = int(rng.integers(5, 17)) << 10
            man = int(rng.integers(0, 1024))
            raw[b, o : o + 2] = np.frombuffer(np.uint16(sign | exp | man).tobytes(), np.uint8)
    # Crafted blocks.
    for b, h in enumerate(SPECIAL_F16):
        o = scale_offsets[b % len(scale_offsets)]
        raw[b, o : o + 2] = np.frombuffer(np.uint16(h).tobytes(), np.uint8)
    lo, hi = sub_scales
    raw[len(SPECIAL_F16), lo:hi] = 0xFF
    raw[len(SPECIAL_F16) + 1, lo:hi] = 0x00
    raw[len(SPECIAL_F16) + 2, :] = 0xFF  # every quant and scale at its maximum (NaN scales)
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("fixtures/kquant"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(SEED))
    for name, qtype, nbytes, scale_offsets, sub_scales in TYPES:
        raw = blocks_for(rng, nbytes, scale_offsets, sub_scales)
        with np.errstate(all="ignore"):
            y = dequantize(raw.reshape(-1), qtype)
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        assert y.size == NBLOCKS * 256, (name, y.size)
        data = raw.tobytes() + y.astype("<f4").tobytes()
        path = args.out / f"{name}.bin"
        path.write_bytes(data)
        print(f"{path}: {NBLOCKS} blocks, {len(data)} bytes")


if __name__ == "__main__":
    main()
