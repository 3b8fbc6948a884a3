//! The KV identity: what a block of KV was computed by, as an explicit, versioned byte encoding.
//!
//! Two processes may share KV (a prefix cache hit, KV sent cloud → edge) only if it would be
//! bit-identical had they computed it themselves. That holds when they agree on the
//! [`ContentIdentity`] — the model's shape and numerics-relevant configuration, every weight byte,
//! the tokenizer, and the kernels' numerics version — and on the KV's representation (dtype, block
//! size, codec), which [`cache_root`] adds on top. [`ContentIdentity::of`] is the one function every
//! caller uses to obtain it.
//!
//! ## Encoding (`edgeprompt/content-identity/v1`)
//!
//! All integers little-endian and fixed width; `str` is a u32 byte length then UTF-8 bytes; floats are
//! their IEEE-754 bits (f32, 4 bytes):
//!
//! ```text
//! b"edgeprompt/content-identity/v1"
//! str(arch)
//! u32 n_layer, u32 n_embd, u32 n_ff, u32 n_head, u32 n_head_kv, u32 head_dim, u32 n_vocab
//! u8 rope kind (0 = norm: adjacent pairs, 1 = neox: half-split pairs), u32 rope_dims,
//! f32 rope_base, f32 rope_freq_scale
//! f32 rms_eps
//! u8 biases (bit 0 Q, bit 1 K, bit 2 V, bit 3 output projection; any layer)
//! u8 f32_activations (0/1)
//! u32 numerics_version, str(backend)
//! [32] tokenizer digest   (ep_model::tokenizer::Tokenizer::digest)
//! [32] weights digest     (ep_model::Model::weights_digest: BLAKE3 over every tensor byte)
//! ```
//!
//! [`ContentIdentity::digest`] is BLAKE3 of that encoding; [`ContentIdentity::to_hex`] prints it as
//! `epci1-<64 hex digits>`. `scripts/reference/make_identity_fixture.py` is an independent
//! implementation (`fixtures/kv/identity.json`, checked by `crates/kv/tests/identity.rs`).
//!
//! ## Cache roots
//!
//! [`cache_root`] is `BlockHash::root(b"edgeprompt/cache-root/v1" || digest[32] || u8 dtype ||
//! u32 block_tokens || u8 codec)` with dtype 0 f32, 1 f16, 2 bf16 and codec 0 = exact (raw values in
//! the dtype). Every prefix cache roots its chains there, so KV of another dtype, block size or a lossy
//! codec can never satisfy an exact lookup.

use ep_model::tokenizer::Tokenizer;
use ep_model::Model;

use crate::{BlockHash, KvDtype};

/// Version of the kernels' numerics: **bump it whenever a kernel change alters any KV bit** (a
/// different summation order, rounding, `exp` polynomial, RoPE form, quantisation of activations…).
/// KV computed under another version is never reused.
pub const NUMERICS_VERSION: u32 = 1;

/// The kernels' family the numerics version counts within.
pub const NUMERICS_BACKEND: &str = "cpu-ggml";

/// Domain and version tag of [`ContentIdentity::encode`].
pub const IDENTITY_DOMAIN: &[u8] = b"edgeprompt/content-identity/v1";

/// Prefix of [`ContentIdentity::to_hex`].
pub const IDENTITY_HEX_TAG: &str = "epci1-";

/// Domain of [`cache_root`]'s fingerprint.
pub const CACHE_ROOT_DOMAIN: &[u8] = b"edgeprompt/cache-root/v1";

/// Codec of exact KV: raw values in the stored dtype.
pub const CODEC_RAW: u8 = 0;

/// Everything that determines a model's KV bits for a given token sequence (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct ContentIdentity {
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_ff: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_vocab: u32,
    /// RoPE on half-split pairs (neox) rather than adjacent pairs (norm).
    pub rope_neox: bool,
    pub rope_dims: u32,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
    pub rms_eps: f32,
    /// Projection biases present: bit 0 Q, bit 1 K, bit 2 V, bit 3 output.
    pub biases: u8,
    /// The activation path: f32 activations (Hugging Face weights) or ggml's quantised ones.
    pub f32_activations: bool,
    pub numerics_version: u32,
    pub backend: String,
    pub tokenizer: [u8; 32],
    pub weights: [u8; 32],
}

/// A KV dtype's code in identities and on the wire: 0 f32, 1 f16, 2 bf16.
pub fn dtype_code(d: KvDtype) -> u8 {
    match d {
        KvDtype::F32 => 0,
        KvDtype::F16 => 1,
        KvDtype::Bf16 => 2,
    }
}

/// The dtype of a code of [`dtype_code`].
pub fn dtype_from_code(c: u8) -> Option<KvDtype> {
    match c {
        0 => Some(KvDtype::F32),
        1 => Some(KvDtype::F16),
        2 => Some(KvDtype::Bf16),
        _ => None,
    }
}

fn u32_of(v: usize) -> u32 {
    // Model shapes are validated far below u32::MAX; saturate rather than wrap if one were not.
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl ContentIdentity {
    /// The identity of `model` with tokenizer `tok`, for this build's numerics. Hashes every weight
    /// byte (tens of milliseconds for a 100 MB model; see docs/performance.md).
    pub fn of(model: &Model, tok: &Tokenizer) -> ContentIdentity {
        let c = &model.cfg;
        let facts = model.identity_facts();
        ContentIdentity {
            arch: c.arch.clone(),
            n_layer: u32_of(c.n_layer),
            n_embd: u32_of(c.n_embd),
            n_ff: u32_of(c.n_ff),
            n_head: u32_of(c.n_head),
            n_head_kv: u32_of(c.n_head_kv),
            head_dim: u32_of(c.head_dim),
            n_vocab: u32_of(c.n_vocab),
            rope_neox: c.rope_neox,
            rope_dims: u32_of(c.rope_dims),
            rope_base: c.rope_base,
            rope_freq_scale: c.rope_freq_scale,
            rms_eps: c.rms_eps,
            biases: facts.biases,
            f32_activations: facts.f32_activations,
            numerics_version: NUMERICS_VERSION,
            backend: NUMERICS_BACKEND.to_string(),
            tokenizer: tok.digest(),
            weights: model.weights_digest(),
        }
    }

    /// The versioned byte encoding (module docs).
    pub fn encode(&self) -> Vec<u8> {
        fn str(o: &mut Vec<u8>, s: &str) {
            o.extend_from_slice(&(s.len() as u32).to_le_bytes());
            o.extend_from_slice(s.as_bytes());
        }
        let mut o = Vec::with_capacity(160 + self.arch.len() + self.backend.len());
        o.extend_from_slice(IDENTITY_DOMAIN);
        str(&mut o, &self.arch);
        for v in [
            self.n_layer,
            self.n_embd,
            self.n_ff,
            self.n_head,
            self.n_head_kv,
            self.head_dim,
            self.n_vocab,
        ] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o.push(u8::from(self.rope_neox));
        o.extend_from_slice(&self.rope_dims.to_le_bytes());
        o.extend_from_slice(&self.rope_base.to_le_bytes());
        o.extend_from_slice(&self.rope_freq_scale.to_le_bytes());
        o.extend_from_slice(&self.rms_eps.to_le_bytes());
        o.push(self.biases);
        o.push(u8::from(self.f32_activations));
        o.extend_from_slice(&self.numerics_version.to_le_bytes());
        str(&mut o, &self.backend);
        o.extend_from_slice(&self.tokenizer);
        o.extend_from_slice(&self.weights);
        o
    }

    /// BLAKE3 of [`ContentIdentity::encode`].
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.encode()).as_bytes()
    }

    /// `epci1-` followed by the digest in lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(IDENTITY_HEX_TAG.len() + 64);
        s.push_str(IDENTITY_HEX_TAG);
        for b in self.digest() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The prefix-cache root of KV of this identity in `dtype`, `block_tokens` per block, `codec`.
    pub fn cache_root(&self, dtype: KvDtype, block_tokens: usize, codec: u8) -> BlockHash {
        cache_root(&self.digest(), dtype, block_tokens, codec)
    }
}

/// The root every prefix cache chains its block hashes from: the identity's digest, the KV dtype, the
/// block size and the codec (module docs). `identity` is [`ContentIdentity::digest`].
pub fn cache_root(
    identity: &[u8; 32],
    dtype: KvDtype,
    block_tokens: usize,
    codec: u8,
) -> BlockHash {
    let mut fp = Vec::with_capacity(CACHE_ROOT_DOMAIN.len() + 32 + 6);
    fp.extend_from_slice(CACHE_ROOT_DOMAIN);
    fp.extend_from_slice(identity);
    fp.push(dtype_code(dtype));
    fp.extend_from_slice(&u32_of(block_tokens).to_le_bytes());
    fp.push(codec);
    BlockHash::root(&fp)
}

/// Lowercase hex of bytes (identities and digests in messages and fixtures).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
