#!/usr/bin/env python3
"""Writes fixtures/kv/hashes.json: reference values of EdgePrompt's KV block hashes.

This is an independent implementation (Python 3 standard library only) of the byte encoding that
`crates/kv/src/tree.rs` hashes, so that a Rust test (`crates/kv/tests/hash_fixture.rs`) can check the
hashes are stable across processes, machines and languages.

Encoding (all integers little-endian; the digest is SHA-256 truncated to its first 16 bytes):

    DOMAIN = b"edgeprompt/kv-block/v1"
    root(fingerprint)         = H(DOMAIN || b"/root" || u64(len(fingerprint)) || fingerprint)
    chain(parent, tokens, s)  = H(DOMAIN || parent(16 bytes) || u64(len(tokens)) || u32(t) for t in tokens
                                  || (b"\\x00"                         if s is None
                                      else b"\\x01" || u64(len(s)) || s))
    block_hashes(root, tokens, bt, public_len, salt):
        block i covers tokens[i*bt:(i+1)*bt] (full blocks only); it is chained with `salt` when
        (i+1)*bt > public_len (it holds a position >= public_len), else with no salt.

Usage: python3 scripts/reference/make_kv_hash_fixture.py [--out fixtures/kv/hashes.json]
"""

import argparse
import hashlib
import json
import os
import struct

DOMAIN = b"edgeprompt/kv-block/v1"


def _h16(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


def root(fingerprint: bytes) -> bytes:
    return _h16(DOMAIN + b"/root" + struct.pack("<Q", len(fingerprint)) + fingerprint)


def chain(parent: bytes, tokens, salt):
    assert len(parent) == 16
    buf = bytearray(DOMAIN)
    buf += parent
    buf += struct.pack("<Q", len(tokens))
    for t in tokens:
        buf += struct.pack("<I", t)
    if salt is None:
        buf += b"\x00"
    else:
        buf += b"\x01" + struct.pack("<Q", len(salt)) + salt
    return _h16(bytes(buf))


def block_hashes(root_h: bytes, tokens, block_tokens: int, public_len: int, salt):
    out = []
    prev = root_h
    for i in range(len(tokens) // block_tokens):
        blk = tokens[i * block_tokens:(i + 1) * block_tokens]
        s = salt if (i + 1) * block_tokens > public_len else None
        prev = chain(prev, blk, s)
        out.append(prev)
    return out


def lcg_tokens(n: int, seed: int):
    """Deterministic pseudo-random u32 tokens (covers the full u32 range, incl. high bits)."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    out = []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        out.append(x >> 32)
    return out


def salt_json(s):
    return None if s is None else s.hex()


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "fixtures", "kv", "hashes.json")))
    args = ap.parse_args()

    fp_model = hashlib.sha256(b"SmolLM2-135M-Instruct.Q4_1/f16/bt16").digest()

    roots = [
        {"name": "empty_fingerprint", "fingerprint": b""},
        {"name": "short_fingerprint", "fingerprint": b"model"},
        {"name": "digest_fingerprint", "fingerprint": fp_model},
        {"name": "long_fingerprint", "fingerprint": bytes(range(256)) * 3},
    ]

    parent_model = root(fp_model)
    chains = [
        {"name": "empty_tokens_no_salt", "parent": root(b""), "tokens": [], "salt": None},
        {"name": "empty_tokens_empty_salt", "parent": root(b""), "tokens": [], "salt": b""},
        {"name": "one_token_no_salt", "parent": parent_model, "tokens": [1], "salt": None},
        {"name": "one_token_empty_salt", "parent": parent_model, "tokens": [1], "salt": b""},
        {"name": "one_token_salt", "parent": parent_model, "tokens": [1], "salt": b"tenant-a"},
        {"name": "block16_no_salt", "parent": parent_model, "tokens": list(range(16)), "salt": None},
        {"name": "block16_salt", "parent": parent_model, "tokens": list(range(16)), "salt": b"tenant-b"},
        {"name": "max_tokens", "parent": bytes([0xFF] * 16),
         "tokens": [0xFFFFFFFF, 0, 0x80000000, 0x12345678], "salt": bytes([0, 1, 2, 255])},
        {"name": "long_tokens_long_salt", "parent": parent_model, "tokens": lcg_tokens(1000, 7),
         "salt": bytes(range(256)) * 2},
        {"name": "zero_parent", "parent": bytes(16), "tokens": [42, 43], "salt": None},
    ]

    toks50 = lcg_tokens(50, 11)  # 3 full blocks of 16 + 2 tokens that are never hashed
    seq = [
        {"name": "no_salt", "tokens": toks50, "public_len": 0, "salt": None},
        {"name": "salt_all_private", "tokens": toks50, "public_len": 0, "salt": b"tenant-a"},
        {"name": "salt_public_16", "tokens": toks50, "public_len": 16, "salt": b"tenant-a"},
        {"name": "salt_public_17", "tokens": toks50, "public_len": 17, "salt": b"tenant-a"},
        {"name": "salt_public_32_empty_salt", "tokens": toks50, "public_len": 32, "salt": b""},
        {"name": "salt_public_all", "tokens": toks50, "public_len": 50, "salt": b"tenant-a"},
        {"name": "salt_public_beyond", "tokens": toks50, "public_len": 1000, "salt": b"tenant-b"},
        {"name": "short_no_full_block", "tokens": list(range(15)), "public_len": 0, "salt": b"x"},
        {"name": "empty", "tokens": [], "public_len": 0, "salt": None},
        {"name": "long_160", "tokens": lcg_tokens(160, 3), "public_len": 70, "salt": b"tenant-c"},
    ]

    out = {
        "description": "EdgePrompt KV block hashes (crates/kv/src/tree.rs), generated by "
        "scripts/reference/make_kv_hash_fixture.py. Bytes are lowercase hex; salt null = no salt.",
        "domain": DOMAIN.decode(),
        "roots": [
            {"name": r["name"], "fingerprint": r["fingerprint"].hex(), "hash": root(r["fingerprint"]).hex()}
            for r in roots
        ],
        "chains": [
            {
                "name": c["name"],
                "parent": c["parent"].hex(),
                "tokens": c["tokens"],
                "salt": salt_json(c["salt"]),
                "hash": chain(c["parent"], c["tokens"], c["salt"]).hex(),
            }
            for c in chains
        ],
        "block_hashes": [
            {
                "name": s["name"],
                "fingerprint": fp_model.hex(),
                "block_tokens": 16,
                "tokens": s["tokens"],
                "public_len": s["public_len"],
                "salt": salt_json(s["salt"]),
                "hashes": [h.hex() for h in block_hashes(parent_model, s["tokens"], 16, s["public_len"], s["salt"])],
            }
            for s in seq
        ],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(out['roots'])} roots, {len(out['chains'])} chains, "
          f"{len(out['block_hashes'])} block_hashes cases")


if __name__ == "__main__":
    main()
