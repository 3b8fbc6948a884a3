//! ggml K-quant formats (Q4_K, Q5_K, Q6_K): block layouts, dequantisation, Q8_K activation
//! quantisation and dot products with ggml's numerics.
//!
//! Everything here reproduces, bit for bit, what llama.cpp computes on x86 with its AVX2 + FMA + F16C
//! CPU backend (GCC, `-march=native`):
//!
//! - **Blocks** (256 weights, little-endian, unaligned GGUF bytes):
//!   - `block_q4_K` (144 bytes): `f16 d, f16 dmin, u8 scales[12], u8 qs[128]`. Eight 32-element
//!     sub-blocks, weight `d*sc[s] * q - dmin*m[s]` with 6-bit `sc`, `m` packed in `scales`
//!     ([`scalar::scales_mins_k4`]) and 4-bit `q` (byte `32c + l` of `qs` holds element `64c + l` in its
//!     low nibble and `64c + 32 + l` in its high nibble).
//!   - `block_q5_K` (176 bytes): `f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]`: as Q4_K plus a
//!     fifth bit, `16` if bit `s` of `qh[l]` is set for element `32s + l`.
//!   - `block_q6_K` (210 bytes): `u8 ql[128], u8 qh[64], i8 scales[16], f16 d`. Sixteen 16-element
//!     groups, weight `d * sc[g] * (q - 32)` with 6-bit `q` (see [`scalar::q6_k_quant`]).
//!   - `block_q8_K` (292 bytes, activations only): `f32 d, i8 qs[256], i16 bsums[16]` (`bsums[g]` = sum
//!     of `qs[16g..16g+16]`).
//! - **Dequantisation** follows `ggml-quants.c` `dequantize_row_q{4,5,6}_K` (ggml-base is built without
//!   FMA, so nothing is contracted): Q4_K/Q5_K `(d*sc) * q - (dmin*m)`, Q6_K `(d*sc) * q`. (Every
//!   product there is exact in f32, an 11-bit f16 mantissa times small integers, so only the final
//!   subtraction rounds, and a contracted build would give the same bits.)
//! - **Q8_K quantisation**: x86 has no SIMD `quantize_row_q8_K`; the CPU backend calls ggml-base's
//!   `quantize_row_q8_K_ref` (SSE2 only, no FMA): `max` = the first element of largest `|x|` (NaNs
//!   skipped), `iscale = -127 / max` (so `d` is *negative* when that element is positive),
//!   `q = min(127, nearest_int(iscale * x))` stored truncated to `i8`, `d = 1 / iscale`, where
//!   `nearest_int(f)` is the magic-number rounding `bits(f + 12582912) & 0x7fffff - 0x400000`
//!   (round-half-even for |f| < 2^22, defined garbage otherwise: an infinite product gives
//!   `-0x400000`, i.e. the byte 0). A block with `max == 0` gets `d = 0`, zero quants, and (unlike
//!   ggml, which leaves them untouched) zero `bsums`, which no dot product can tell apart.
//! - **Dot products** keep the accumulation of ggml's AVX2 `ggml_vec_dot_q{4,5,6}_K_q8_K`: per
//!   super-block eight i32 lanes (lane `l` gets elements `4l..4l+4` of every 32-element chunk, each
//!   chunk's products scaled by its integer sub-block scale), converted to f32 and accumulated by FMA
//!   with `d = d_a * d_w`, then ggml's `hsum_float_8`. The `dmin` terms use the activation `bsums`:
//!   Q4_K in four f32 lanes (`fma(-d_a*dmin, Σ pairs of m*bsum, acc_m)`, reduced
//!   `(m0+m2) + (m1+m3)` and added last), Q5_K in one f32 (`fma(-d_a*dmin, Σ m*bsum, summs)`: GCC
//!   contracts `summs += dmin * sum`), added last. Q6_K computes `q * q8` with unsigned `q` and
//!   subtracts `32 * (bsum[2l]*sc[2l] + bsum[2l+1]*sc[2l+1])` from lane `l` before the conversion.
//!
//! The scalar kernels ([`scalar`]) emulate that order, so the scalar and AVX2 paths agree bit for bit.
//! `tests/kquant_golden.rs` checks both against outputs of the real ggml build.

use half::f16;

use crate::simd::{self, Path};

/// Elements per K-quant super-block (and per Q8_K block).
pub const QK_K: usize = 256;

/// Bytes of one `block_q8_K`: `f32 d`, `i8 qs[256]`, `i16 bsums[16]`.
pub const Q8K_BYTES: usize = 292;

/// Offset of `bsums` in a `block_q8_K`.
const Q8K_BSUMS: usize = 4 + QK_K;

/// The K-quant weight types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KType {
    /// `GGML_TYPE_Q4_K`, 4.5 bits per weight.
    Q4K,
    /// `GGML_TYPE_Q5_K`, 5.5 bits per weight.
    Q5K,
    /// `GGML_TYPE_Q6_K`, 6.5625 bits per weight.
    Q6K,
}

/// ggml's type id of `block_q8_K` (the activation type of every K-quant dot product).
pub const GGML_ID_Q8_K: u32 = 15;

impl KType {
    /// Every K-quant type.
    pub const ALL: [KType; 3] = [KType::Q4K, KType::Q5K, KType::Q6K];

    /// Bytes per 256-element super-block: 144, 176, 210.
    pub const fn type_size(self) -> usize {
        match self {
            KType::Q4K => 144,
            KType::Q5K => 176,
            KType::Q6K => 210,
        }
    }

    /// ggml's numeric type id (as stored in GGUF): 12, 13, 14.
    pub const fn ggml_id(self) -> u32 {
        match self {
            KType::Q4K => 12,
            KType::Q5K => 13,
            KType::Q6K => 14,
        }
    }

    /// The type with ggml id `id`, if it is one of these.
    pub const fn from_ggml_id(id: u32) -> Option<KType> {
        match id {
            12 => Some(KType::Q4K),
            13 => Some(KType::Q5K),
            14 => Some(KType::Q6K),
            _ => None,
        }
    }

    /// ggml's type name: `"q4_K"`, `"q5_K"`, `"q6_K"`.
    pub const fn name(self) -> &'static str {
        match self {
            KType::Q4K => "q4_K",
            KType::Q5K => "q5_K",
            KType::Q6K => "q6_K",
        }
    }

    /// Bytes of an `n`-element row, or `None` if `n` is not a multiple of 256.
    pub const fn row_bytes(self, n: usize) -> Option<usize> {
        if n.is_multiple_of(QK_K) {
            Some(n / QK_K * self.type_size())
        } else {
            None
        }
    }
}

/// Bytes of an `n`-element Q8_K row, or `None` if `n` is not a multiple of 256.
pub const fn q8k_row_bytes(n: usize) -> Option<usize> {
    if n.is_multiple_of(QK_K) {
        Some(n / QK_K * Q8K_BYTES)
    } else {
        None
    }
}

#[inline(always)]
fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(le_u16(b, at)).to_f32()
}

#[inline(always)]
fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

// ---------------------------------------------------------------------------------------------------
// Dequantisation
// ---------------------------------------------------------------------------------------------------

/// Dequantises a row of `ty` blocks exactly as ggml's `dequantize_row_q{4,5,6}_K`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src` is not `dst.len() / 256` blocks.
pub fn dequantize_row_k(ty: KType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        dst.len() % QK_K,
        0,
        "dequantize_row_k({}): length {} is not a multiple of 256",
        ty.name(),
        dst.len()
    );
    assert_eq!(
        ty.row_bytes(dst.len()),
        Some(src.len()),
        "dequantize_row_k({}): {} source bytes for {} elements",
        ty.name(),
        src.len(),
        dst.len()
    );
    let bs = ty.type_size();
    for (b, y) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK_K)) {
        match ty {
            KType::Q4K => scalar::dequantize_block_q4_k(b, y),
            KType::Q5K => scalar::dequantize_block_q5_k(b, y),
            KType::Q6K => scalar::dequantize_block_q6_k(b, y),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Q8_K activation quantisation
// ---------------------------------------------------------------------------------------------------

fn check_q8k_args(x: &[f32], dst: &[u8]) {
    assert_eq!(
        x.len() % QK_K,
        0,
        "quantize_row_q8_k: length {} is not a multiple of 256",
        x.len()
    );
    assert_eq!(
        dst.len(),
        x.len() / QK_K * Q8K_BYTES,
        "quantize_row_q8_k: dst size"
    );
}

/// Quantises a row of f32 (a multiple of 256 elements) to `block_q8_K`s exactly as the ggml CPU
/// backend's `quantize_row_q8_K` (= `quantize_row_q8_K_ref` on x86), on kernel path `path` (both
/// give the same bytes).
///
/// # Panics
/// If `x.len()` is not a multiple of 256 or `dst` is not `x.len() / 256 * 292` bytes, or if `path`
/// is not available on this CPU.
pub fn quantize_row_q8_k_with(path: Path, x: &[f32], dst: &mut [u8]) {
    check_q8k_args(x, dst);
    match path {
        Path::Scalar => scalar::quantize_row_q8_k(x, dst),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(
                simd::avx2_available(),
                "quantize_row_q8_k: AVX2 path requested but not available"
            );
            // SAFETY: sizes checked by `check_q8k_args`, CPU support just above.
            unsafe { avx2::quantize_row_q8_k_unchecked(x, dst) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Path::Avx2 => panic!("quantize_row_q8_k: AVX2 path requested but not available"),
    }
}

/// `bsums` of a Q8_K block from its quants (wrapping i16 sums of 16 quants, as ggml stores them).
fn write_bsums(block: &mut [u8]) {
    let (head, bsums) = block.split_at_mut(Q8K_BSUMS);
    for (g, o) in bsums.chunks_exact_mut(2).enumerate() {
        let s: i32 = head[4 + 16 * g..4 + 16 * g + 16]
            .iter()
            .map(|&q| q as i8 as i32)
            .sum();
        o.copy_from_slice(&(s as i16).to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------------
// Dot products: dispatch
// ---------------------------------------------------------------------------------------------------

fn check_dot_args(ty: KType, n: usize, w: &[u8], a: &[u8]) {
    let wb = ty.row_bytes(n);
    let ab = q8k_row_bytes(n);
    assert!(
        wb == Some(w.len()) && ab == Some(a.len()),
        "vec_dot_k {}: n = {n}, weight row {} bytes (expected {wb:?}), activation row {} bytes (expected {ab:?})",
        ty.name(),
        w.len(),
        a.len()
    );
}

/// Dot product of an `n`-element weight row of `ty` with an `n`-element Q8_K activation row (from
/// [`quantize_row_q8_k_with`]) on kernel path `path` (both give the same bits). Equal, bit for bit,
/// to ggml's AVX2 `ggml_vec_dot_q{4,5,6}_K_q8_K`.
///
/// # Panics
/// If `n` is not a multiple of 256, the byte lengths do not match `n`, or `path` is not available
/// on this CPU.
pub fn vec_dot_k_with(path: Path, ty: KType, n: usize, w: &[u8], a_q8k: &[u8]) -> f32 {
    check_dot_args(ty, n, w, a_q8k);
    match path {
        Path::Scalar => scalar::vec_dot_unchecked(ty, n, w, a_q8k),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(
                simd::avx2_available(),
                "vec_dot_k: AVX2 path requested but not available"
            );
            // SAFETY: lengths checked by `check_dot_args`, CPU support just above.
            unsafe { avx2::vec_dot_unchecked(ty, n, w, a_q8k) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Path::Avx2 => panic!("vec_dot_k: AVX2 path requested but not available"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Scalar reference
// ---------------------------------------------------------------------------------------------------

/// Portable kernels, the numeric reference (no `unsafe`). They emulate the accumulation order of
/// ggml's AVX2 code, so they equal the SIMD kernels bit for bit. Block arguments are the blocks'
/// bytes (at least one block long).
#[path = "generic/kquant.rs"]
pub mod scalar;

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------------------

/// AVX2 + FMA + F16C kernels (the same arithmetic as [`scalar`], in ggml's AVX2 shape). The public
/// functions check lengths and CPU support (and panic otherwise); the `unsafe` entry points leave the
/// checks to the caller.
#[cfg(target_arch = "x86_64")]
#[path = "x86/kquant.rs"]
pub mod avx2;
