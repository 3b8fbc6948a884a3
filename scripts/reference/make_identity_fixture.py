#!/usr/bin/env python3
"""Writes fixtures/kv/identity.json: reference values of EdgePrompt's KV content identity.

An independent implementation (Python 3 standard library plus the PyPI `blake3` package) of
`crates/kv/src/identity.rs` (ContentIdentity::encode / digest / to_hex, cache_root),
`Model::weights_digest` and `Tokenizer::digest` (GGUF byte-level BPE) in `crates/model`, checked by
`crates/kv/tests/identity.rs`.

Encoding of a content identity (integers little-endian, str = u32 byte length + UTF-8, floats as f32):

    b"edgeprompt/content-identity/v1" str(arch)
    u32 n_layer n_embd n_ff n_head n_head_kv head_dim n_vocab
    u8 rope_neox  u32 rope_dims  f32 rope_base  f32 rope_freq_scale  f32 rms_eps
    u8 biases (bit 0 Q, 1 K, 2 V, 3 output)  u8 f32_activations
    u32 numerics_version  str(backend)
    [32] tokenizer digest  [32] weights digest
  digest = BLAKE3(encoding); hex = "epci1-" + digest.hex()
  cache_root(digest, dtype, block_tokens, codec) = BlockHash::root(fp) with
    fp = b"edgeprompt/cache-root/v1" || digest || u8 dtype (0 f32, 1 f16, 2 bf16) || u32 block_tokens
         || u8 codec
    BlockHash::root(fp) = SHA-256(b"edgeprompt/kv-block/v1" || b"/root" || u64 len(fp) || fp)[:16]

Weights digest (BLAKE3 stream):
    b"edgeprompt/weights/v1" u32 n_layer
    mat(token_embd.weight)  (b"T" when output.weight is absent: tied, else mat(output.weight))
    vec(output_norm.weight)
    per layer i, blk.i.*: mat(attn_q) mat(attn_k) mat(attn_v) mat(attn_output) mat(ffn_gate) mat(ffn_up)
      mat(ffn_down) vec(attn_norm) vec(ffn_norm) then b"-" for each absent bias (q, k, v, o)
    mat(t) = b"M" u32 ggml_type u64 rows (dims[1]) u64 cols (dims[0]) u64 byte_len  bytes
    vec(t) = b"V" u64 n  f32 values (this script supports F32 vectors only)

Tokenizer digest (GGUF byte-level BPE; BLAKE3 stream; opt(x) = b"\\0" or b"\\1" + x):
    b"edgeprompt/tokenizer/v1" str("gpt2") str(pre)
    u32 n + str(token) each; u32 n + i32 token_type each; u32 n + str(merge) each
    14 special ids as opt(i64): bos eos eot eom unknown seperator padding mask fim_pre fim_suf fim_mid
      fim_pad fim_rep fim_sep
    opt(u8 add_bos_token) opt(u8 add_eos_token)

Setup and run (deterministic output):
    pip install blake3==1.0.11
    python3 scripts/reference/make_identity_fixture.py [--out fixtures/kv/identity.json]
    python3 scripts/reference/make_identity_fixture.py --identity-of MODEL.gguf   # cross-check the CLI
"""

import argparse
import hashlib
import json
import os
import struct

import blake3

DOMAIN = b"edgeprompt/content-identity/v1"
ROOT_DOMAIN = b"edgeprompt/cache-root/v1"
BLOCK_DOMAIN = b"edgeprompt/kv-block/v1"
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "..", "fixtures", "kv"))


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def lstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def encode(f) -> bytes:
    o = bytearray(DOMAIN)
    o += lstr(f["arch"])
    for k in ["n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "n_vocab"]:
        o += struct.pack("<I", f[k])
    o += bytes([1 if f["rope_neox"] else 0])
    o += struct.pack("<I", f["rope_dims"])
    for k in ["rope_base_bits", "rope_freq_scale_bits", "rms_eps_bits"]:
        o += struct.pack("<I", f[k])
    o += bytes([f["biases"], 1 if f["f32_activations"] else 0])
    o += struct.pack("<I", f["numerics_version"])
    o += lstr(f["backend"])
    o += bytes.fromhex(f["tokenizer"])
    o += bytes.fromhex(f["weights"])
    return bytes(o)


def block_root(fp: bytes) -> bytes:
    return hashlib.sha256(BLOCK_DOMAIN + b"/root" + struct.pack("<Q", len(fp)) + fp).digest()[:16]


def cache_root(digest: bytes, dtype: int, block_tokens: int, codec: int) -> bytes:
    fp = ROOT_DOMAIN + digest + bytes([dtype]) + struct.pack("<I", block_tokens) + bytes([codec])
    return block_root(fp)


ROOT_COMBOS = [(1, 16, 0), (0, 16, 0), (2, 16, 0), (1, 8, 0), (1, 32, 0), (1, 256, 0), (1, 16, 1), (2, 64, 3)]


def case(name, fields):
    enc = encode(fields)
    d = blake3.blake3(enc).digest()
    return {
        "name": name,
        "fields": fields,
        "encoding": enc.hex(),
        "digest": d.hex(),
        "hex": "epci1-" + d.hex(),
        "roots": [
            {"dtype": dt, "block_tokens": bt, "codec": c, "root": cache_root(d, dt, bt, c).hex()}
            for (dt, bt, c) in ROOT_COMBOS
        ],
    }


# ------------------------------------------------------------------------------------------------
# A minimal GGUF reader (v2/v3) — enough for the tiny fixture model.
# ------------------------------------------------------------------------------------------------

# ggml type id -> (elements per block, bytes per block)
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 9: (32, 36),
               12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2)}


class Buf:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, n):
        assert self.p + n <= len(self.d), "truncated GGUF"
        s = self.d[self.p:self.p + n]
        self.p += n
        return s

    def u(self, fmt):
        (v,) = struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))
        return v

    def s(self):
        return self.take(self.u("Q")).decode()


SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}


def read_value(b, ty):
    if ty in SCALARS:
        return b.u(SCALARS[ty])
    if ty == 7:
        return b.u("B") != 0
    if ty == 8:
        return b.s()
    if ty == 9:
        et, n = b.u("I"), b.u("Q")
        return [read_value(b, et) for _ in range(n)]
    raise ValueError(f"GGUF value type {ty}")


def read_gguf(path):
    data = open(path, "rb").read()
    b = Buf(data)
    assert b.take(4) == b"GGUF"
    version = b.u("I")
    assert version in (2, 3)
    n_tensors, n_kv = b.u("Q"), b.u("Q")
    meta = {}
    for _ in range(n_kv):
        k = b.s()
        meta[k] = read_value(b, b.u("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = b.s()
        dims = [b.u("Q") for _ in range(b.u("I"))]
        ty, off = b.u("I"), b.u("Q")
        n = 1
        for d in dims:
            n *= d
        per, size = GGML_BLOCKS[ty]
        tensors[name] = {"dims": dims, "type": ty, "offset": off, "size": n // per * size}
    align = meta.get("general.alignment", 32)
    start = (b.p + align - 1) // align * align
    for t in tensors.values():
        t["data"] = data[start + t["offset"]:start + t["offset"] + t["size"]]
    return meta, tensors


def weights_digest(meta, tensors):
    arch = meta["general.architecture"]
    n_layer = meta[f"{arch}.block_count"]
    h = blake3.blake3()
    h.update(b"edgeprompt/weights/v1" + struct.pack("<I", n_layer))

    def mat(name):
        t = tensors[name]
        cols, rows = t["dims"][0], t["dims"][1]
        h.update(b"M" + struct.pack("<IQQQ", t["type"], rows, cols, len(t["data"])))
        h.update(t["data"])

    def vec(name):
        t = tensors[name]
        assert t["type"] == 0, f"{name}: only F32 vectors are supported here"
        h.update(b"V" + struct.pack("<Q", len(t["data"]) // 4))
        h.update(t["data"])

    mat("token_embd.weight")
    if "output.weight" in tensors:
        mat("output.weight")
    else:
        h.update(b"T")
    vec("output_norm.weight")
    for i in range(n_layer):
        for m in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]:
            mat(f"blk.{i}.{m}.weight")
        vec(f"blk.{i}.attn_norm.weight")
        vec(f"blk.{i}.ffn_norm.weight")
        for _ in range(4):  # Llama GGUFs have no projection biases
            h.update(b"-")
    return h.digest()


def bpe_tokenizer_digest(meta):
    assert meta["tokenizer.ggml.model"] == "gpt2"
    h = blake3.blake3()
    h.update(b"edgeprompt/tokenizer/v1" + lstr("gpt2") + lstr(meta.get("tokenizer.ggml.pre", "")))

    def strs(v):
        h.update(struct.pack("<I", len(v)))
        for s in v:
            h.update(lstr(s))

    strs(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type", [])
    h.update(struct.pack("<I", len(types)))
    for t in types:
        h.update(struct.pack("<i", t))
    strs(meta["tokenizer.ggml.merges"])

    def key(*names):
        for n in names:
            if f"tokenizer.ggml.{n}" in meta:
                return meta[f"tokenizer.ggml.{n}"]
        return None

    specials = [key("bos_token_id"), key("eos_token_id"), key("eot_token_id"), key("eom_token_id"),
                key("unknown_token_id"), key("seperator_token_id"), key("padding_token_id"),
                key("mask_token_id"), key("fim_pre_token_id", "prefix_token_id"),
                key("fim_suf_token_id", "suffix_token_id"), key("fim_mid_token_id", "middle_token_id"),
                key("fim_pad_token_id"), key("fim_rep_token_id"), key("fim_sep_token_id")]
    for v in specials:
        h.update(b"\0" if v is None else b"\1" + struct.pack("<q", v))
    for k in ["add_bos_token", "add_eos_token"]:
        v = meta.get(f"tokenizer.ggml.{k}")
        h.update(b"\0" if v is None else bytes([1, 1 if v else 0]))
    return h.digest()


def gguf_identity_fields(path):
    meta, tensors = read_gguf(path)
    arch = meta["general.architecture"]
    k = lambda s, d=None: meta.get(f"{arch}.{s}", d)  # noqa: E731
    n_embd, n_head = k("embedding_length"), k("attention.head_count")
    head_dim = k("attention.key_length", n_embd // n_head)
    assert k("rope.scaling.type") in (None, "none"), "only unscaled RoPE here"
    return {
        "arch": arch,
        "n_layer": k("block_count"),
        "n_embd": n_embd,
        "n_ff": k("feed_forward_length"),
        "n_head": n_head,
        "n_head_kv": k("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "n_vocab": k("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "rope_neox": False,  # Llama GGUFs rotate adjacent pairs
        "rope_dims": k("rope.dimension_count", head_dim),
        "rope_base_bits": f32_bits(k("rope.freq_base", 10000.0)),
        "rope_freq_scale_bits": f32_bits(1.0),
        "rms_eps_bits": f32_bits(k("attention.layer_norm_rms_epsilon")),
        "biases": 0,
        "f32_activations": False,
        "numerics_version": 1,
        "backend": "cpu-ggml",
        "tokenizer": bpe_tokenizer_digest(meta).hex(),
        "weights": weights_digest(meta, tensors).hex(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "identity.json"))
    ap.add_argument("--gguf", default=os.path.join(FIXTURES, "tiny.gguf"))
    ap.add_argument("--identity-of", metavar="GGUF",
                    help="print the content identity of a Llama GGUF (byte-level BPE, F32 norms) and exit; "
                    "compare with `edgeprompt identity --model GGUF`")
    args = ap.parse_args()
    if args.identity_of:
        c = case(os.path.basename(args.identity_of), gguf_identity_fields(args.identity_of))
        print(c["hex"])
        return

    smollm = {
        "arch": "llama", "n_layer": 30, "n_embd": 576, "n_ff": 1536, "n_head": 9, "n_head_kv": 3,
        "head_dim": 64, "n_vocab": 49152, "rope_neox": False, "rope_dims": 64,
        "rope_base_bits": f32_bits(100000.0), "rope_freq_scale_bits": f32_bits(1.0),
        "rms_eps_bits": f32_bits(1e-5), "biases": 0, "f32_activations": False,
        "numerics_version": 1, "backend": "cpu-ggml",
        "tokenizer": hashlib.sha256(b"tokenizer").hexdigest(),
        "weights": hashlib.sha256(b"weights").hexdigest(),
    }
    qwen_hf = dict(smollm, arch="qwen2", rope_neox=True, rope_base_bits=f32_bits(1e6),
                   rope_freq_scale_bits=f32_bits(0.5), rms_eps_bits=f32_bits(1e-6), biases=0b0111,
                   f32_activations=True, n_vocab=151936, backend="cpu-ggml",
                   tokenizer="00" * 32, weights="ff" * 32)
    odd = dict(smollm, arch="", n_layer=0xFFFFFFFF, rope_dims=0, numerics_version=7,
               backend="gpu-\u00e9t\u00e9", biases=0b1111)
    cases = [case("smollm2_like", smollm), case("qwen2_hf_like", qwen_hf), case("edge_values", odd)]

    out = {
        "description": "EdgePrompt KV content identity (crates/kv/src/identity.rs), generated by "
        "scripts/reference/make_identity_fixture.py. Floats are given as f32 bit patterns; bytes as "
        "lowercase hex; roots: dtype 0 f32, 1 f16, 2 bf16.",
        "domain": DOMAIN.decode(),
        "cases": cases,
        "tiny_gguf": case("tiny_gguf", gguf_identity_fields(args.gguf)),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} cases + tiny_gguf ({out['tiny_gguf']['hex']})")


if __name__ == "__main__":
    main()
