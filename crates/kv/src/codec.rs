//! KV codecs: how one frame's K and V rows are represented on the wire. Pure code, no I/O.
//!
//! Every codec turns the raw K and V rows of a token range (`n_tokens` rows each, each row
//! `kv_width = n_head_kv × head_dim` values in the stored dtype, little-endian) into a payload and
//! back. [`decode`] always returns raw rows in the stored dtype, so a receiver writes them straight
//! into its KV blocks. The codec id travels in every [`crate::wire::Frame`] and is part of the cache
//! root ([`crate::identity::cache_root`]): KV decoded from a lossy codec never satisfies an exact
//! lookup.
//!
//! | id | name | payload |
//! |---|---|---|
//! | 0 | `raw` | the K rows then the V rows, exactly as stored: `2 × n_tokens × kv_width × dtype bytes` |
//! | 1 | `int8` | zstd of the quantised body below, 8-bit codes, groups of [`GROUP`] |
//! | 2 | `int4` | zstd of the quantised body below, 4-bit codes, groups of [`GROUP`] |
//!
//! ## Quantised body (int8 / int4)
//!
//! Group-wise asymmetric quantisation as KIVI: **keys per channel** — for each channel `c` of the
//! row, the tokens are cut into groups of `k_group` consecutive tokens (the last one shorter) —
//! and **values per token** — each V row is cut into groups of `v_group` consecutive channels (the
//! last one shorter). A group with smallest value `lo` and largest `hi` stores
//!
//! - `min` = f16 of `lo` rounded towards −∞,
//! - `scale` = f16 of `(hi − min) / (2^bits − 1)` rounded towards +∞ (so `min + scale·(2^bits − 1)
//!   ≥ hi`),
//! - per value the code `q = round((x − min) / scale)` (nearest, ties away from zero) clamped to
//!   `0..=2^bits − 1`; a constant group has scale 0 and codes 0.
//!
//! A value decodes to `min + q·scale` computed in f32 and rounded (nearest-even) to the stored
//! dtype, so `|x − x̂| ≤ scale/2` plus the f32 arithmetic and the dtype's rounding of `x̂`
//! (tested in `crates/kv/tests/codec.rs`).
//!
//! The body, all little-endian, before zstd:
//!
//! ```text
//! K params   kv_width × ceil(n_tokens / k_group) × (min f16, scale f16); group (c, g) at c·ng + g
//! V params   n_tokens × ceil(kv_width / v_group) × (min f16, scale f16); group (t, g) at t·ng + g
//! K codes    channel-major: code of (token t, channel c) at c·n_tokens + t
//! V codes    token-major:   code of (token t, channel c) at t·kv_width + c
//! ```
//!
//! Codes are one byte each for int8; for int4 two per byte, the even index in the low nibble, each
//! section's last byte padded with a zero nibble. The payload is one zstd frame (level
//! [`ZSTD_LEVEL`]) that declares its content size; [`decode`] requires that size to be exactly the
//! body length implied by the codec, the layout and `n_tokens`, the frame to fill the whole payload,
//! and decompresses into a buffer of exactly that size: a hostile payload can neither make it
//! allocate more than the range's rows nor panic it.
//!
//! Group parameters are f16, so the encoder refuses (with [`CodecError::NotRepresentable`]) values
//! that are not finite or whose group range does not fit in f16 (|x| beyond 65504); f16 KV always
//! fits.

use half::{bf16, f16};

pub use crate::identity::CODEC_RAW;
use crate::wire::WireLayout;
use crate::KvDtype;

/// 8-bit group-wise quantisation (module docs).
pub const CODEC_INT8: u8 = 1;
/// 4-bit group-wise quantisation (module docs).
pub const CODEC_INT4: u8 = 2;
/// Every codec this build encodes and decodes.
pub const CODECS: &[u8] = &[CODEC_RAW, CODEC_INT8, CODEC_INT4];
/// Tokens per key group and channels per value group of the int8 and int4 codecs.
pub const GROUP: usize = 32;
/// zstd level of the lossy codecs' payloads (measured in docs/performance.md, "KV codecs").
pub const ZSTD_LEVEL: i32 = 1;

/// Errors of encoding and decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("codec {0} is not supported")]
    Unknown(u8),
    #[error("bad layout for a codec: {0}")]
    Layout(&'static str),
    #[error("{what}: {len} bytes, expected {expected}")]
    Length {
        what: &'static str,
        len: u64,
        expected: u64,
    },
    #[error("{n_tokens} tokens of {kv_width} values exceed the codec's size limit")]
    TooLarge { n_tokens: u64, kv_width: u64 },
    #[error(
        "a value ({0}) cannot be quantised: not finite, or its group's range does not fit in f16"
    )]
    NotRepresentable(String),
    #[error("bad payload: {0}")]
    Payload(String),
}

/// The name of a codec id: `raw`, `int8`, `int4`.
pub fn codec_name(codec: u8) -> Option<&'static str> {
    match codec {
        CODEC_RAW => Some("raw"),
        CODEC_INT8 => Some("int8"),
        CODEC_INT4 => Some("int4"),
        _ => None,
    }
}

/// The key under which the KV of content id `id` encoded with `codec` is stored and cached: the id
/// itself for raw, `{id}.{codec name}` otherwise.
pub fn variant_key(id: &str, codec: u8) -> String {
    match codec_name(codec) {
        Some(name) if codec != CODEC_RAW => format!("{id}.{name}"),
        _ => id.to_string(),
    }
}

/// The codec id of a name of [`codec_name`].
pub fn parse(name: &str) -> Option<u8> {
    CODECS
        .iter()
        .copied()
        .find(|&c| codec_name(c) == Some(name))
}

/// Parameters of a quantised codec. The wire codecs use [`QuantSpec::of`]; other values are for
/// measurements (larger groups) and are not wire codecs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    /// 8 or 4.
    pub bits: u8,
    /// Tokens per key group (per channel).
    pub k_group: usize,
    /// Channels per value group (per token).
    pub v_group: usize,
    /// zstd level (the encoder's choice: decoding does not depend on it).
    pub zstd_level: i32,
}

impl QuantSpec {
    /// The spec of a quantised wire codec (`None` for raw and unknown ids).
    pub fn of(codec: u8) -> Option<QuantSpec> {
        let bits = match codec {
            CODEC_INT8 => 8,
            CODEC_INT4 => 4,
            _ => return None,
        };
        Some(QuantSpec {
            bits,
            k_group: GROUP,
            v_group: GROUP,
            zstd_level: ZSTD_LEVEL,
        })
    }

    fn check(&self) -> Result<(), CodecError> {
        if !matches!(self.bits, 4 | 8) {
            return Err(CodecError::Layout("bits must be 4 or 8"));
        }
        if self.k_group == 0 || self.v_group == 0 {
            return Err(CodecError::Layout("zero group size"));
        }
        Ok(())
    }

    fn levels(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    fn code_bytes(&self, n: usize) -> Option<usize> {
        if self.bits == 8 {
            Some(n)
        } else {
            Some(n.checked_add(1)? / 2)
        }
    }

    /// Bytes of the body (before zstd) for `n_tokens` rows of `kv_width` values, `None` on
    /// overflow.
    pub fn body_len(&self, kv_width: usize, n_tokens: usize) -> Option<usize> {
        let kg = n_tokens.div_ceil(self.k_group.max(1));
        let vg = kv_width.div_ceil(self.v_group.max(1));
        let groups = kv_width
            .checked_mul(kg)?
            .checked_add(n_tokens.checked_mul(vg)?)?;
        let codes = self.code_bytes(n_tokens.checked_mul(kv_width)?)?;
        groups.checked_mul(4)?.checked_add(codes.checked_mul(2)?)
    }
}

/// Largest body (or raw payload) a codec handles: the wire's payload limit.
const MAX_BODY: u64 = crate::wire::MAX_PAYLOAD;

fn width(layout: &WireLayout) -> Result<usize, CodecError> {
    if layout.n_head_kv == 0 || layout.head_dim == 0 {
        return Err(CodecError::Layout("a zero dimension"));
    }
    usize::try_from(layout.kv_width()).map_err(|_| CodecError::Layout("row too wide"))
}

/// Bytes of the raw rows of one of K or V, checked against the size limit.
fn raw_len(layout: &WireLayout, n_tokens: usize) -> Result<usize, CodecError> {
    let w = width(layout)?;
    let too_large = || CodecError::TooLarge {
        n_tokens: n_tokens as u64,
        kv_width: w as u64,
    };
    let n = (n_tokens as u64)
        .checked_mul(layout.row_bytes())
        .ok_or_else(too_large)?;
    if n.saturating_mul(2) > MAX_BODY {
        return Err(too_large());
    }
    Ok(n as usize)
}

fn body_len(spec: &QuantSpec, layout: &WireLayout, n_tokens: usize) -> Result<usize, CodecError> {
    let w = width(layout)?;
    raw_len(layout, n_tokens)?;
    spec.body_len(w, n_tokens)
        .filter(|&b| b as u64 <= MAX_BODY)
        .ok_or(CodecError::TooLarge {
            n_tokens: n_tokens as u64,
            kv_width: w as u64,
        })
}

/// The largest payload a valid frame of `n_tokens` tokens may carry under `codec` (`None` for an
/// unknown codec or a range beyond the limits): the raw length for raw, zstd's bound of the body
/// for the quantised codecs.
pub fn max_payload_len(codec: u8, layout: &WireLayout, n_tokens: usize) -> Option<u64> {
    if codec == CODEC_RAW {
        return raw_len(layout, n_tokens).ok().map(|n| 2 * n as u64);
    }
    let spec = QuantSpec::of(codec)?;
    let b = body_len(&spec, layout, n_tokens).ok()?;
    Some(zstd::zstd_safe::compress_bound(b) as u64)
}

fn to_f32(dtype: KvDtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        KvDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        KvDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        KvDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

fn put(dtype: KvDtype, x: f32, out: &mut Vec<u8>) {
    match dtype {
        KvDtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
        KvDtype::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
        KvDtype::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
    }
}

/// The largest f16 `≤ x` (x finite and within f16's range).
fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x {
        prev_f16(h)
    } else {
        h
    }
}

/// The smallest f16 `≥ x` (x finite, ≥ 0, within f16's range).
fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x {
        next_f16(h)
    } else {
        h
    }
}

fn next_f16(h: f16) -> f16 {
    let b = h.to_bits();
    if b == 0x8000 {
        f16::from_bits(0x0001)
    } else if b & 0x8000 != 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

fn prev_f16(h: f16) -> f16 {
    let b = h.to_bits();
    if b == 0 {
        f16::from_bits(0x8001)
    } else if b & 0x8000 != 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

/// Appends the (min, scale) of one group to `params` and its codes to `codes`.
fn quantize_group(
    levels: u32,
    xs: impl Iterator<Item = f32> + Clone,
    params: &mut Vec<u8>,
    codes: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for x in xs.clone() {
        if !x.is_finite() {
            return Err(CodecError::NotRepresentable(x.to_string()));
        }
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let lim = f16::MAX.to_f32();
    if lo < -lim || hi > lim {
        return Err(CodecError::NotRepresentable(
            (if lo < -lim { lo } else { hi }).to_string(),
        ));
    }
    let min = f16_down(lo);
    let m = min.to_f32();
    let mut scale = f16_up((hi - m) / levels as f32);
    // f32 rounding may leave the top a hair short: widen until it covers hi.
    while m + scale.to_f32() * (levels as f32) < hi {
        scale = next_f16(scale);
    }
    if !scale.is_finite() {
        return Err(CodecError::NotRepresentable(hi.to_string()));
    }
    params.extend_from_slice(&min.to_le_bytes());
    params.extend_from_slice(&scale.to_le_bytes());
    let s = scale.to_f32();
    for x in xs {
        let q = if s > 0.0 {
            ((x - m) / s).round().clamp(0.0, levels as f32) as u8
        } else {
            0
        };
        codes.push(q);
    }
    Ok(())
}

fn pack(bits: u8, codes: Vec<u8>) -> Vec<u8> {
    if bits == 8 {
        return codes;
    }
    codes
        .chunks(2)
        .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
        .collect()
}

/// The quantised body (module docs) of K and V rows, before zstd.
fn quantize(
    spec: &QuantSpec,
    w: usize,
    n: usize,
    kf: &[f32],
    vf: &[f32],
) -> Result<Vec<u8>, CodecError> {
    let levels = spec.levels();
    let mut kp = Vec::new();
    let mut kc = Vec::with_capacity(n * w);
    for c in 0..w {
        for t0 in (0..n).step_by(spec.k_group) {
            let t1 = (t0 + spec.k_group).min(n);
            quantize_group(levels, (t0..t1).map(|t| kf[t * w + c]), &mut kp, &mut kc)?;
        }
    }
    let mut vp = Vec::new();
    let mut vc = Vec::with_capacity(n * w);
    for t in 0..n {
        let row = &vf[t * w..(t + 1) * w];
        for g in row.chunks(spec.v_group) {
            quantize_group(levels, g.iter().copied(), &mut vp, &mut vc)?;
        }
    }
    let mut body = kp;
    body.extend_from_slice(&vp);
    body.extend_from_slice(&pack(spec.bits, kc));
    body.extend_from_slice(&pack(spec.bits, vc));
    Ok(body)
}

/// Encodes `n_tokens` K rows and V rows (raw, in `layout.dtype`) with a wire codec (module docs).
pub fn encode(
    codec: u8,
    layout: &WireLayout,
    n_tokens: usize,
    k: &[u8],
    v: &[u8],
) -> Result<Vec<u8>, CodecError> {
    if codec == CODEC_RAW {
        check_rows(layout, n_tokens, k, v)?;
        let mut out = Vec::with_capacity(k.len() + v.len());
        out.extend_from_slice(k);
        out.extend_from_slice(v);
        return Ok(out);
    }
    let spec = QuantSpec::of(codec).ok_or(CodecError::Unknown(codec))?;
    encode_quant(&spec, layout, n_tokens, k, v)
}

fn check_rows(layout: &WireLayout, n_tokens: usize, k: &[u8], v: &[u8]) -> Result<(), CodecError> {
    let n = raw_len(layout, n_tokens)?;
    for (what, rows) in [("K rows", k), ("V rows", v)] {
        if rows.len() != n {
            return Err(CodecError::Length {
                what,
                len: rows.len() as u64,
                expected: n as u64,
            });
        }
    }
    Ok(())
}

/// [`encode`] with explicit quantisation parameters (for measurements; the wire codecs are
/// [`QuantSpec::of`]).
pub fn encode_quant(
    spec: &QuantSpec,
    layout: &WireLayout,
    n_tokens: usize,
    k: &[u8],
    v: &[u8],
) -> Result<Vec<u8>, CodecError> {
    spec.check()?;
    check_rows(layout, n_tokens, k, v)?;
    body_len(spec, layout, n_tokens)?;
    let w = width(layout)?;
    let body = quantize(
        spec,
        w,
        n_tokens,
        &to_f32(layout.dtype, k),
        &to_f32(layout.dtype, v),
    )?;
    zstd::bulk::compress(&body, spec.zstd_level).map_err(|e| CodecError::Payload(e.to_string()))
}

/// Decodes a payload of `codec` for `n_tokens` tokens into raw K rows and V rows in `layout.dtype`.
/// Never panics; allocates at most the body and the rows the range implies, and only after the
/// payload declared exactly that body.
pub fn decode(
    codec: u8,
    layout: &WireLayout,
    n_tokens: usize,
    payload: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), CodecError> {
    if codec == CODEC_RAW {
        let n = raw_len(layout, n_tokens)?;
        if payload.len() as u64 != 2 * n as u64 {
            return Err(CodecError::Length {
                what: "raw payload",
                len: payload.len() as u64,
                expected: 2 * n as u64,
            });
        }
        return Ok((payload[..n].to_vec(), payload[n..].to_vec()));
    }
    let spec = QuantSpec::of(codec).ok_or(CodecError::Unknown(codec))?;
    decode_quant(&spec, layout, n_tokens, payload)
}

/// [`decode`] with explicit quantisation parameters (the counterpart of [`encode_quant`]).
pub fn decode_quant(
    spec: &QuantSpec,
    layout: &WireLayout,
    n_tokens: usize,
    payload: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), CodecError> {
    spec.check()?;
    let w = width(layout)?;
    let blen = body_len(spec, layout, n_tokens)?;
    if payload.is_empty() {
        return Err(CodecError::Payload("empty".into()));
    }
    let bad = |s: &str| CodecError::Payload(s.to_string());
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n == blen as u64 => {}
        Ok(Some(n)) => {
            return Err(CodecError::Length {
                what: "declared body",
                len: n,
                expected: blen as u64,
            })
        }
        Ok(None) => return Err(bad("the zstd frame does not declare its size")),
        Err(_) => return Err(bad("not a zstd frame")),
    }
    match zstd::zstd_safe::find_frame_compressed_size(payload) {
        Ok(n) if n == payload.len() => {}
        Ok(_) => return Err(bad("bytes after the zstd frame")),
        Err(_) => return Err(bad("truncated or corrupt zstd frame")),
    }
    let mut body = Vec::with_capacity(blen);
    let got = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(payload, &mut body))
        .map_err(|e| CodecError::Payload(format!("zstd: {e}")))?;
    if got != blen {
        return Err(CodecError::Length {
            what: "decompressed body",
            len: got as u64,
            expected: blen as u64,
        });
    }
    Ok(dequantize(spec, layout.dtype, w, n_tokens, &body))
}

fn code_at(bits: u8, codes: &[u8], i: usize) -> u32 {
    if bits == 8 {
        u32::from(codes[i])
    } else {
        u32::from((codes[i / 2] >> (4 * (i % 2))) & 0xf)
    }
}

fn param(params: &[u8], g: usize) -> (f32, f32) {
    let p = &params[4 * g..4 * g + 4];
    (
        f16::from_le_bytes([p[0], p[1]]).to_f32(),
        f16::from_le_bytes([p[2], p[3]]).to_f32(),
    )
}

/// Raw K and V rows from a body of exactly [`QuantSpec::body_len`] bytes.
fn dequantize(
    spec: &QuantSpec,
    dtype: KvDtype,
    w: usize,
    n: usize,
    body: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let nkg = n.div_ceil(spec.k_group);
    let nvg = w.div_ceil(spec.v_group);
    let (kp, rest) = body.split_at(4 * w * nkg);
    let (vp, rest) = rest.split_at(4 * n * nvg);
    let cb = spec.code_bytes(n * w).unwrap_or(0);
    let (kc, vc) = rest.split_at(cb);
    let mut k = Vec::with_capacity(n * w * dtype.bytes());
    let mut v = Vec::with_capacity(n * w * dtype.bytes());
    for t in 0..n {
        let g = t / spec.k_group;
        for c in 0..w {
            let (m, s) = param(kp, c * nkg + g);
            let q = code_at(spec.bits, kc, c * n + t);
            put(dtype, m + q as f32 * s, &mut k);
        }
        for c in 0..w {
            let (m, s) = param(vp, t * nvg + c / spec.v_group);
            let q = code_at(spec.bits, vc, t * w + c);
            put(dtype, m + q as f32 * s, &mut v);
        }
    }
    (k, v)
}
