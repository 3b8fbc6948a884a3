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
pub mod scalar {
    use super::{f16_at, f32_at, le_u16, write_bsums, KType, Q8K_BSUMS, Q8K_BYTES, QK_K};

    /// The eight 6-bit sub-block scales and eight 6-bit mins packed in the 12 `scales` bytes of a
    /// Q4_K/Q5_K block (ggml's `get_scale_min_k4` for `j = 0..8`): `j < 4`: `sc = s[j] & 63`,
    /// `m = s[j+4] & 63`; else `sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4`,
    /// `m = (s[j+4] >> 4) | (s[j] >> 6) << 4`.
    #[inline]
    pub fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        for j in 0..4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
            sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
            m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
        }
        (sc, m)
    }

    /// The 4-bit quant of element `e` (0..256) of a Q4_K block's `qs` (or Q5_K's low bits).
    #[inline(always)]
    fn nibble_k(qs: &[u8], e: usize) -> u8 {
        let byte = qs[32 * (e / 64) + e % 32];
        if e % 64 < 32 {
            byte & 0xF
        } else {
            byte >> 4
        }
    }

    /// The 4-bit quant of element `e` of a Q4_K block.
    #[inline(always)]
    pub fn q4_k_quant(b: &[u8], e: usize) -> u8 {
        nibble_k(&b[16..144], e)
    }

    /// The 5-bit quant (0..32) of element `e` of a Q5_K block.
    #[inline(always)]
    pub fn q5_k_quant(b: &[u8], e: usize) -> u8 {
        let hi = (b[16 + e % 32] >> (e / 32)) & 1;
        nibble_k(&b[48..176], e) | (hi << 4)
    }

    /// The unsigned 6-bit quant (0..64; the weight is `q - 32`) of element `e` of a Q6_K block:
    /// element `128h + 32k + l` has its low bits in `ql[64h + 32(k%2) + l]` (low nibble for `k < 2`,
    /// high for `k >= 2`) and its high bits in bits `2k..2k+2` of `qh[32h + l]`.
    #[inline(always)]
    pub fn q6_k_quant(b: &[u8], e: usize) -> u8 {
        let (h, k, l) = (e / 128, (e / 32) % 4, e % 32);
        let lo = b[64 * h + 32 * (k % 2) + l];
        let lo = if k < 2 { lo & 0xF } else { lo >> 4 };
        let hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
        lo | (hi << 4)
    }

    /// Dequantises one Q4_K block into `y[..256]`.
    pub fn dequantize_block_q4_k(b: &[u8], y: &mut [f32]) {
        dequantize_block_scaled_min(b, y, q4_k_quant)
    }

    /// Q4_K / Q5_K dequantisation: `d·sc[s]·q − dmin·m[s]` per 32-element sub-block, `quant` giving
    /// element `e`'s unsigned quant.
    fn dequantize_block_scaled_min(b: &[u8], y: &mut [f32], quant: impl Fn(&[u8], usize) -> u8) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, m) = scales_mins_k4(&b[4..16]);
        for (s, ys) in y[..QK_K].chunks_exact_mut(32).enumerate() {
            let d1 = d * sc[s] as f32;
            let m1 = dmin * m[s] as f32;
            for (l, v) in ys.iter_mut().enumerate() {
                *v = d1 * quant(b, 32 * s + l) as f32 - m1;
            }
        }
    }

    /// Dequantises one Q5_K block into `y[..256]`.
    pub fn dequantize_block_q5_k(b: &[u8], y: &mut [f32]) {
        dequantize_block_scaled_min(b, y, q5_k_quant)
    }

    /// Dequantises one Q6_K block into `y[..256]`: `(d * sc) * (q - 32)`.
    pub fn dequantize_block_q6_k(b: &[u8], y: &mut [f32]) {
        let d = f16_at(b, 208);
        for (e, v) in y[..QK_K].iter_mut().enumerate() {
            let sc = b[192 + e / 16] as i8;
            let q = q6_k_quant(b, e) as i32 - 32;
            *v = d * sc as f32 * q as f32;
        }
    }

    /// ggml's `nearest_int`: `bits(f + 12582912) & 0x7fffff - 0x400000` (round-half-even for
    /// |f| < 2^22).
    #[inline(always)]
    pub fn nearest_int(f: f32) -> i32 {
        let v = f + 12_582_912.0;
        (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
    }

    /// Quantises one 256-element block to Q8_K (`out`: 292 bytes), as `quantize_row_q8_K_ref`.
    pub fn quantize_block_q8_k(x: &[f32], out: &mut [u8]) {
        let x = &x[..QK_K];
        let out = &mut out[..Q8K_BYTES];
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in x {
            let av = v.abs();
            if av > amax {
                amax = av;
                max = v;
            }
        }
        if amax == 0.0 {
            out.fill(0);
            return;
        }
        let iscale = -127.0 / max;
        for (o, &v) in out[4..Q8K_BSUMS].iter_mut().zip(x) {
            *o = nearest_int(iscale * v).min(127) as u8;
        }
        write_bsums(out);
        out[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }

    /// Quantises a row (a multiple of 256 elements) to Q8_K. `dst`: `x.len() / 256 * 292` bytes.
    pub fn quantize_row_q8_k(x: &[f32], dst: &mut [u8]) {
        for (xb, ob) in x.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q8K_BYTES)) {
            quantize_block_q8_k(xb, ob);
        }
    }

    #[inline(always)]
    fn bsum(a: &[u8], g: usize) -> i16 {
        le_u16(a, Q8K_BSUMS + 2 * g) as i16
    }

    /// The eight i32 lanes of `Σ_c sc[c] * Σ_{e in 4l..4l+4} q[32c + e] * q8[32c + e]` over the eight
    /// 32-element chunks `c`, with `scale(c, l)` the scale of chunk `c` in lane `l`.
    #[inline(always)]
    fn lanes(q: impl Fn(usize) -> i32, a: &[u8], scale: impl Fn(usize, usize) -> i32) -> [i32; 8] {
        std::array::from_fn(|l| {
            (0..8)
                .map(|c| {
                    let p: i32 = (32 * c + 4 * l..32 * c + 4 * l + 4)
                        .map(|e| q(e) * a[4 + e] as i8 as i32)
                        .sum();
                    scale(c, l) * p
                })
                .fold(0i32, i32::wrapping_add)
        })
    }

    /// The eight i32 lane sums of one Q4_K x Q8_K block (before the scale by `d`).
    pub fn block_lanes_q4_k(w: &[u8], a: &[u8]) -> [i32; 8] {
        let (sc, _) = scales_mins_k4(&w[4..16]);
        lanes(|e| q4_k_quant(w, e) as i32, a, |c, _| sc[c] as i32)
    }

    /// The eight i32 lane sums of one Q5_K x Q8_K block (before the scale by `d`).
    pub fn block_lanes_q5_k(w: &[u8], a: &[u8]) -> [i32; 8] {
        let (sc, _) = scales_mins_k4(&w[4..16]);
        lanes(|e| q5_k_quant(w, e) as i32, a, |c, _| sc[c] as i32)
    }

    /// The eight i32 lane sums of one Q6_K x Q8_K block (before the scale by `d`), the `-32` offset
    /// included: lane `l` minus `32 * (bsum[2l]*sc[2l] + bsum[2l+1]*sc[2l+1])`.
    pub fn block_lanes_q6_k(w: &[u8], a: &[u8]) -> [i32; 8] {
        let sc = |g: usize| w[192 + g] as i8 as i32;
        let mut s = lanes(|e| q6_k_quant(w, e) as i32, a, |c, l| sc(2 * c + l / 4));
        for (l, v) in s.iter_mut().enumerate() {
            let sub = (bsum(a, 2 * l) as i32 * sc(2 * l))
                .wrapping_add(bsum(a, 2 * l + 1) as i32 * sc(2 * l + 1));
            *v = v.wrapping_sub(sub.wrapping_shl(5));
        }
        s
    }

    /// The four i32 `mins · bsums` pair sums of a Q4_K/Q5_K block (`madd(mins, hadd(bsums))`):
    /// `k`: `m[2k] * (b[4k] + b[4k+1]) + m[2k+1] * (b[4k+2] + b[4k+3])`, the `b` sums wrapping in i16.
    pub fn mins_pairs(w: &[u8], a: &[u8]) -> [i32; 4] {
        let (_, m) = scales_mins_k4(&w[4..16]);
        let q8s: [i16; 8] =
            std::array::from_fn(|k| bsum(a, 2 * k).wrapping_add(bsum(a, 2 * k + 1)));
        std::array::from_fn(|k| {
            (m[2 * k] as i32 * q8s[2 * k] as i32)
                .wrapping_add(m[2 * k + 1] as i32 * q8s[2 * k + 1] as i32)
        })
    }

    /// ggml's `hsum_float_8` ([`crate::reduce::hsum8`]).
    #[inline]
    pub fn hsum_float_8(a: [f32; 8]) -> f32 {
        crate::reduce::hsum8(&a)
    }

    #[inline(always)]
    fn fma_lanes(acc: &mut [f32; 8], d: f32, lanes: [i32; 8]) {
        for (s, q) in acc.iter_mut().zip(lanes) {
            *s = d.mul_add(q as f32, *s);
        }
    }

    /// Q4_K weights x Q8_K activations, `n` elements (a multiple of 256).
    pub fn dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let bs = KType::Q4K.type_size();
        let mut acc = [0f32; 8];
        let mut acc_m = [0f32; 4];
        for i in 0..n / QK_K {
            let wb = &w[i * bs..(i + 1) * bs];
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let da = f32_at(ab, 0);
            let d = da * f16_at(wb, 0);
            let dmin = -da * f16_at(wb, 2);
            for (s, p) in acc_m.iter_mut().zip(mins_pairs(wb, ab)) {
                *s = dmin.mul_add(p as f32, *s);
            }
            fma_lanes(&mut acc, d, block_lanes_q4_k(wb, ab));
        }
        hsum_float_8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
    }

    /// Q5_K weights x Q8_K activations, `n` elements (a multiple of 256).
    pub fn dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let bs = KType::Q5K.type_size();
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for i in 0..n / QK_K {
            let wb = &w[i * bs..(i + 1) * bs];
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let da = f32_at(ab, 0);
            let d = da * f16_at(wb, 0);
            let dmin = -da * f16_at(wb, 2);
            let m = mins_pairs(wb, ab).into_iter().fold(0i32, i32::wrapping_add);
            summs = dmin.mul_add(m as f32, summs);
            fma_lanes(&mut acc, d, block_lanes_q5_k(wb, ab));
        }
        hsum_float_8(acc) + summs
    }

    /// Q6_K weights x Q8_K activations, `n` elements (a multiple of 256).
    pub fn dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let bs = KType::Q6K.type_size();
        let mut acc = [0f32; 8];
        for i in 0..n / QK_K {
            let wb = &w[i * bs..(i + 1) * bs];
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let d = f32_at(ab, 0) * f16_at(wb, 208);
            fma_lanes(&mut acc, d, block_lanes_q6_k(wb, ab));
        }
        hsum_float_8(acc)
    }

    /// Dispatch on the weight type; lengths are the caller's business (slicing panics if short).
    pub fn vec_dot_unchecked(ty: KType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        match ty {
            KType::Q4K => dot_q4_k_q8_k(n, w, a),
            KType::Q5K => dot_q5_k_q8_k(n, w, a),
            KType::Q6K => dot_q6_k_q8_k(n, w, a),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------------------

/// AVX2 + FMA + F16C kernels (the same arithmetic as [`scalar`], in ggml's AVX2 shape). The public
/// functions check lengths and CPU support (and panic otherwise); the `unsafe` entry points leave the
/// checks to the caller.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::{check_dot_args, KType, Q8K_BSUMS, Q8K_BYTES, QK_K};
    use std::arch::x86_64::*;

    fn checked(ty: KType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        check_dot_args(ty, n, w, a);
        assert!(
            crate::simd::avx2_available(),
            "AVX2 + FMA + F16C not available"
        );
        // SAFETY: lengths and CPU support checked just above.
        unsafe { vec_dot_unchecked(ty, n, w, a) }
    }

    /// Q4_K x Q8_K (see [`super::scalar::dot_q4_k_q8_k`]).
    pub fn dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(KType::Q4K, n, w, a)
    }

    /// Q5_K x Q8_K (see [`super::scalar::dot_q5_k_q8_k`]).
    pub fn dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(KType::Q5K, n, w, a)
    }

    /// Q6_K x Q8_K (see [`super::scalar::dot_q6_k_q8_k`]).
    pub fn dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
        checked(KType::Q6K, n, w, a)
    }

    /// One weight row x one Q8_K activation row.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` must hold `n / 256` blocks of `ty` and `a`
    /// `n / 256` Q8_K blocks.
    pub unsafe fn vec_dot_unchecked(ty: KType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        let nb = n / QK_K;
        debug_assert!(w.len() >= nb * ty.type_size() && a.len() >= nb * Q8K_BYTES);
        // SAFETY: guaranteed by the caller.
        unsafe {
            match ty {
                KType::Q4K => dot_q4_k(nb, w, a),
                KType::Q5K => dot_q5_k(nb, w, a),
                KType::Q6K => dot_q6_k(nb, w, a),
            }
        }
    }

    use crate::reduce::avx2::hsum8 as hsum_float_8;

    /// `f16` at byte `at` of `b`, by F16C (exact, like every f16 -> f32 conversion).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16c_at(b: &[u8], at: usize) -> f32 {
        let h = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// The 16 scales/mins of a Q4_K/Q5_K block as i16 lanes (`0..8` scales, `8..16` mins): the
    /// byte-wise [`super::scalar::scales_mins_k4`] done on three little-endian u32 words at once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scales_mins_i16(wb: &[u8]) -> __m256i {
        let u = |k: usize| {
            u32::from_le_bytes([wb[4 + 4 * k], wb[5 + 4 * k], wb[6 + 4 * k], wb[7 + 4 * k]])
        };
        let (u0, u1, u2) = (u(0), u(1), u(2));
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const TOP2: u32 = 0x0303_0303;
        let sc_lo = u0 & LOW6;
        let sc_hi = (u2 & LOW4) | (((u0 >> 6) & TOP2) << 4);
        let m_lo = u1 & LOW6;
        let m_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & TOP2) << 4);
        _mm256_cvtepu8_epi16(_mm_set_epi32(
            m_hi as i32,
            m_lo as i32,
            sc_hi as i32,
            sc_lo as i32,
        ))
    }

    /// i16 lane `k` of `v` (lanes `0..8` of the low half, duplicated in both halves) broadcast to
    /// all 16 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn bcast_i16(v: __m256i, k: usize) -> __m256i {
        let idx = (2 * k as i16) | ((2 * k as i16 + 1) << 8);
        _mm256_shuffle_epi8(v, _mm256_set1_epi16(idx))
    }

    /// The four `madd(mins, hadd(bsums))` pair sums of a Q4_K/Q5_K block (`ab`: a Q8_K block).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn mins_pairs(ms: __m256i, ab: &[u8]) -> __m128i {
        let bsums = &ab[Q8K_BSUMS..Q8K_BSUMS + 32];
        // SAFETY: `bsums` is 32 bytes long (sliced just above).
        let bs = unsafe { _mm256_loadu_si256(bsums.as_ptr() as *const __m256i) };
        let q8s = _mm_hadd_epi16(
            _mm256_castsi256_si128(bs),
            _mm256_extracti128_si256::<1>(bs),
        );
        _mm_madd_epi16(_mm256_extracti128_si256::<1>(ms), q8s)
    }

    /// # Safety
    /// CPU support; `w`, `a` hold `nb` Q4_K / Q8_K blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
        const BS: usize = 144;
        let m4 = _mm256_set1_epi8(0xF);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        for i in 0..nb {
            let wb = &w[i * BS..(i + 1) * BS];
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
            let d = da * f16c_at(wb, 0);
            let dmin = -da * f16c_at(wb, 2);
            let ms = scales_mins_i16(wb);
            let sc = _mm256_permute2x128_si256::<0x00>(ms, ms);
            let prod = mins_pairs(ms, ab);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

            let q4 = wb[16..].as_ptr();
            let q8 = ab[4..].as_ptr();
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                // SAFETY: `qs` has 128 bytes (4 x 32) and the Q8_K quants 256 (8 x 32), within the
                // blocks sliced above.
                let (q4bits, q8l, q8h) = unsafe {
                    (
                        _mm256_loadu_si256(q4.add(32 * j) as *const __m256i),
                        _mm256_loadu_si256(q8.add(64 * j) as *const __m256i),
                        _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i),
                    )
                };
                let q4l = _mm256_and_si256(q4bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4);
                let pl = _mm256_madd_epi16(bcast_i16(sc, 2 * j), _mm256_maddubs_epi16(q4l, q8l));
                let ph =
                    _mm256_madd_epi16(bcast_i16(sc, 2 * j + 1), _mm256_maddubs_epi16(q4h, q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        hsum_float_8(acc) + _mm_cvtss_f32(m)
    }

    /// # Safety
    /// CPU support; `w`, `a` hold `nb` Q5_K / Q8_K blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
        const BS: usize = 176;
        let m4 = _mm256_set1_epi8(0xF);
        let sixteen = _mm256_set1_epi8(16);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for i in 0..nb {
            let wb = &w[i * BS..(i + 1) * BS];
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
            let d = da * f16c_at(wb, 0);
            let dmin = -da * f16c_at(wb, 2);
            let ms = scales_mins_i16(wb);
            let sc = _mm256_permute2x128_si256::<0x00>(ms, ms);
            let prod = mins_pairs(ms, ab);
            let p = _mm_add_epi32(prod, _mm_unpackhi_epi64(prod, prod));
            let p = _mm_add_epi32(p, _mm_shuffle_epi32::<0b01>(p));
            summs = dmin.mul_add(_mm_cvtsi128_si32(p) as f32, summs);

            let q5 = wb[48..].as_ptr();
            let q8 = ab[4..].as_ptr();
            // SAFETY: `qh` is bytes 16..48 of the block sliced above.
            let hbits = unsafe { _mm256_loadu_si256(wb[16..].as_ptr() as *const __m256i) };
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                // SAFETY: `qs` has 128 bytes (4 x 32) and the Q8_K quants 256 (8 x 32), within the
                // blocks sliced above.
                let (q5bits, q8l, q8h) = unsafe {
                    (
                        _mm256_loadu_si256(q5.add(32 * j) as *const __m256i),
                        _mm256_loadu_si256(q8.add(64 * j) as *const __m256i),
                        _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i),
                    )
                };
                let bl = _mm256_set1_epi8(1 << (2 * j));
                let bh = _mm256_set1_epi8(2 << (2 * j));
                let hl =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl), sixteen);
                let hh =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh), sixteen);
                let q5l = _mm256_or_si256(_mm256_and_si256(q5bits, m4), hl);
                let q5h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q5bits), m4), hh);
                let pl = _mm256_madd_epi16(bcast_i16(sc, 2 * j), _mm256_maddubs_epi16(q5l, q8l));
                let ph =
                    _mm256_madd_epi16(bcast_i16(sc, 2 * j + 1), _mm256_maddubs_epi16(q5h, q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc) + summs
    }

    /// i16 lanes `0..8` = `sc[2m]`, `8..16` = `sc[2m + 1]` (the scales of one 32-element chunk).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q6_chunk_scales(sc: &[u8], m: usize) -> __m256i {
        _mm256_set_m128i(
            _mm_set1_epi16(sc[2 * m + 1] as i8 as i16),
            _mm_set1_epi16(sc[2 * m] as i8 as i16),
        )
    }

    /// # Safety
    /// CPU support; `w`, `a` hold `nb` Q6_K / Q8_K blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6_k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
        const BS: usize = 210;
        let m3 = _mm256_set1_epi8(3);
        let m15 = _mm256_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            let wb = &w[i * BS..(i + 1) * BS];
            let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let d = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]) * f16c_at(wb, 208);
            let sc = &wb[192..208];
            // SAFETY: `bsums` (32 bytes) and `scales` (16 bytes) lie within the blocks sliced above.
            let (q8sums, scales) = unsafe {
                (
                    _mm256_loadu_si256(ab[Q8K_BSUMS..].as_ptr() as *const __m256i),
                    _mm_loadu_si128(sc.as_ptr() as *const __m128i),
                )
            };
            let sub =
                _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, _mm256_cvtepi8_epi16(scales)));
            let ql = wb.as_ptr();
            let q8 = ab[4..].as_ptr();
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                // SAFETY: `ql` (128 bytes), `qh` (bytes 128..192) and the Q8_K quants (256 bytes)
                // lie within the blocks sliced above.
                let (b1, b2, bh, q8v) = unsafe {
                    (
                        _mm256_loadu_si256(ql.add(64 * h) as *const __m256i),
                        _mm256_loadu_si256(ql.add(64 * h + 32) as *const __m256i),
                        _mm256_loadu_si256(ql.add(128 + 32 * h) as *const __m256i),
                        [0, 1, 2, 3].map(|k| {
                            _mm256_loadu_si256(q8.add(128 * h + 32 * k) as *const __m256i)
                        }),
                    )
                };
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m3));
                let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(12)));
                let h2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(-64)));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(b1, m15), h0),
                    _mm256_or_si256(_mm256_and_si256(b2, m15), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m15), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m15), h3),
                ];
                let p: [__m256i; 4] = std::array::from_fn(|k| {
                    _mm256_madd_epi16(
                        q6_chunk_scales(sc, 4 * h + k),
                        _mm256_maddubs_epi16(q[k], q8v[k]),
                    )
                });
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[0], p[1]));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[2], p[3]));
            }
            let sumi = _mm256_sub_epi32(sumi, sub);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc)
    }

    /// One K-quant super-block unpacked for several activation rows: the codes of its eight
    /// 32-element chunks (chunk `k` meets Q8_K quants `32k..32k+32`) and each chunk's scale as i16
    /// lanes, exactly the vectors [`dot_q4_k`], [`dot_q5_k`] and [`dot_q6_k`] form per block.
    struct Unpacked {
        q: [__m256i; 8],
        sc: [__m256i; 8],
    }

    /// Unpacks block `wb` of `ty` (Q4_K/Q5_K: also returns `ms`, the scales and mins as i16).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack(ty: KType, wb: &[u8]) -> (Unpacked, __m256i) {
        let m4 = _mm256_set1_epi8(0xF);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut scv = [_mm256_setzero_si256(); 8];
        let ld = |at: usize| {
            let b = &wb[at..at + 32];
            // SAFETY: `b` is 32 bytes long (sliced just above).
            unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
        };
        match ty {
            KType::Q4K | KType::Q5K => {
                let ms = scales_mins_i16(wb);
                let sc = _mm256_permute2x128_si256::<0x00>(ms, ms);
                let (qs, hbits) = if ty == KType::Q4K {
                    (16, _mm256_setzero_si256())
                } else {
                    (48, ld(16))
                };
                let sixteen = _mm256_set1_epi8(16);
                for j in 0..4 {
                    let bits = ld(qs + 32 * j);
                    let mut lo = _mm256_and_si256(bits, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                    if ty == KType::Q5K {
                        let bl = _mm256_set1_epi8(1 << (2 * j));
                        let bh = _mm256_set1_epi8(2 << (2 * j));
                        let eq = |b| _mm256_cmpeq_epi8(_mm256_and_si256(hbits, b), b);
                        lo = _mm256_or_si256(lo, _mm256_and_si256(eq(bl), sixteen));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(eq(bh), sixteen));
                    }
                    q[2 * j] = lo;
                    q[2 * j + 1] = hi;
                    scv[2 * j] = bcast_i16(sc, 2 * j);
                    scv[2 * j + 1] = bcast_i16(sc, 2 * j + 1);
                }
                (Unpacked { q, sc: scv }, ms)
            }
            KType::Q6K => {
                let m3 = _mm256_set1_epi8(3);
                let m15 = _mm256_set1_epi8(15);
                let sc = &wb[192..208];
                for h in 0..2 {
                    let (b1, b2, bh) = (ld(64 * h), ld(64 * h + 32), ld(128 + 32 * h));
                    let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m3));
                    let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(12)));
                    let h2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                    let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(-64)));
                    q[4 * h] = _mm256_or_si256(_mm256_and_si256(b1, m15), h0);
                    q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(b2, m15), h1);
                    q[4 * h + 2] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m15), h2);
                    q[4 * h + 3] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m15), h3);
                    for k in 0..4 {
                        scv[4 * h + k] = q6_chunk_scales(sc, 4 * h + k);
                    }
                }
                (Unpacked { q, sc: scv }, _mm256_setzero_si256())
            }
        }
    }

    /// `Σ_k madd(sc_k, maddubs(q_k, q8 chunk k))` over one super-block: the i32 lane sums (an exact
    /// integer sum, so its order is free).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_sumi(u: &Unpacked, ab: &[u8]) -> __m256i {
        let q8 = &ab[4..4 + QK_K];
        let mut sumi = _mm256_setzero_si256();
        for k in 0..8 {
            let c = &q8[32 * k..32 * k + 32];
            // SAFETY: `c` is 32 bytes long (sliced just above).
            let y = unsafe { _mm256_loadu_si256(c.as_ptr() as *const __m256i) };
            let p = _mm256_madd_epi16(u.sc[k], _mm256_maddubs_epi16(u.q[k], y));
            sumi = _mm256_add_epi32(sumi, p);
        }
        sumi
    }

    /// One weight row of `ty` x four Q8_K activation rows (`nb` super-blocks each): each block is
    /// unpacked once for the four. Result `c` equals `vec_dot_unchecked(ty, 256 nb, w, a[c])` bit for
    /// bit: per pair the same f32 operations in the same order (the integer lane sums are exact).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` must hold `nb` blocks of `ty` and each `a[c]`
    /// `nb` Q8_K blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn tile4_unchecked(
        ty: KType,
        nb: usize,
        w: &[u8],
        a: [&[u8]; 4],
    ) -> [f32; 4] {
        let bs = ty.type_size();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut acc_m = [_mm_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        for i in 0..nb {
            let wb = &w[i * bs..(i + 1) * bs];
            let (u, ms) = unpack(ty, wb);
            let dw = f16c_at(wb, if ty == KType::Q6K { 208 } else { 0 });
            let dmw = if ty == KType::Q6K {
                0.0
            } else {
                f16c_at(wb, 2)
            };
            for c in 0..4 {
                let ab = &a[c][i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
                let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
                let d = da * dw;
                let mut sumi = block_sumi(&u, ab);
                match ty {
                    KType::Q4K => {
                        let prod = mins_pairs(ms, ab);
                        let dmin = -da * dmw;
                        acc_m[c] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[c]);
                    }
                    KType::Q5K => {
                        let prod = mins_pairs(ms, ab);
                        let p = _mm_add_epi32(prod, _mm_unpackhi_epi64(prod, prod));
                        let p = _mm_add_epi32(p, _mm_shuffle_epi32::<0b01>(p));
                        let dmin = -da * dmw;
                        summs[c] = dmin.mul_add(_mm_cvtsi128_si32(p) as f32, summs[c]);
                    }
                    KType::Q6K => {
                        let sc = &wb[192..208];
                        let bsums = &ab[Q8K_BSUMS..Q8K_BSUMS + 32];
                        // SAFETY: `bsums` is 32 bytes and `sc` 16 (sliced just above).
                        let (q8sums, scales) = unsafe {
                            (
                                _mm256_loadu_si256(bsums.as_ptr() as *const __m256i),
                                _mm_loadu_si128(sc.as_ptr() as *const __m128i),
                            )
                        };
                        let sub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(
                            q8sums,
                            _mm256_cvtepi8_epi16(scales),
                        ));
                        sumi = _mm256_sub_epi32(sumi, sub);
                    }
                }
                acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[c]);
            }
        }
        std::array::from_fn(|c| match ty {
            KType::Q4K => {
                let m = _mm_add_ps(acc_m[c], _mm_movehl_ps(acc_m[c], acc_m[c]));
                let m = _mm_add_ss(m, _mm_movehdup_ps(m));
                hsum_float_8(acc[c]) + _mm_cvtss_f32(m)
            }
            KType::Q5K => hsum_float_8(acc[c]) + summs[c],
            KType::Q6K => hsum_float_8(acc[c]),
        })
    }

    /// [`super::quantize_row_q8_k_with`] with AVX2: the same bytes as
    /// [`super::scalar::quantize_row_q8_k`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `x.len()` must be a multiple of 256 and `dst` hold
    /// `x.len() / 256` Q8_K blocks.
    pub unsafe fn quantize_row_q8_k_unchecked(x: &[f32], dst: &mut [u8]) {
        debug_assert!(x.len().is_multiple_of(QK_K) && dst.len() >= x.len() / QK_K * Q8K_BYTES);
        for (xb, ob) in x.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q8K_BYTES)) {
            // SAFETY: CPU support guaranteed by the caller; whole blocks sliced just above.
            unsafe { quantize_block(xb, ob) };
        }
    }

    /// # Safety
    /// CPU support; `x`: 256 floats, `out`: 292 bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_block(x: &[f32], out: &mut [u8]) {
        let x = &x[..QK_K];
        let out = &mut out[..Q8K_BYTES];
        let xp = x.as_ptr();
        let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // SAFETY: (every load below) `x` has 256 floats, read in 32 vectors of 8.
        let load = |k: usize| unsafe { _mm256_loadu_ps(xp.add(8 * k)) };
        // amax: `maxps(|x|, acc)` returns `acc` when `|x|` is NaN, as the scalar `>` test skips it.
        let mut vmax = _mm256_setzero_ps();
        for k in 0..32 {
            vmax = _mm256_max_ps(_mm256_and_ps(load(k), absmask), vmax);
        }
        let m = _mm_max_ps(
            _mm256_extractf128_ps::<1>(vmax),
            _mm256_castps256_ps128(vmax),
        );
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let amax = _mm_cvtss_f32(m);
        if amax == 0.0 {
            out.fill(0);
            return;
        }
        // `max`: the first element of largest magnitude.
        let vamax = _mm256_set1_ps(amax);
        let mut first = 0;
        for k in 0..32 {
            let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(load(k), absmask), vamax);
            let bits = _mm256_movemask_ps(eq);
            if bits != 0 {
                first = 8 * k + bits.trailing_zeros() as usize;
                break;
            }
        }
        let iscale = -127.0 / x[first];
        let vis = _mm256_set1_ps(iscale);
        let magic = _mm256_set1_ps(12_582_912.0);
        let mant = _mm256_set1_epi32(0x007f_ffff);
        let bias = _mm256_set1_epi32(0x0040_0000);
        let top = _mm256_set1_epi32(127);
        let low_byte = _mm256_set1_epi32(0xff);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let q = |k: usize| {
            let v = _mm256_add_ps(_mm256_mul_ps(vis, load(k)), magic);
            let i = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(v), mant), bias);
            // min(127, i), then the low byte (ggml truncates to int8).
            _mm256_and_si256(_mm256_min_epi32(i, top), low_byte)
        };
        for c in 0..8 {
            let p01 = _mm256_packus_epi32(q(4 * c), q(4 * c + 1));
            let p23 = _mm256_packus_epi32(q(4 * c + 2), q(4 * c + 3));
            let b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), perm);
            // SAFETY: bytes `4 + 32c .. 36 + 32c` lie within the 292-byte block.
            unsafe { _mm256_storeu_si256(out[4 + 32 * c..].as_mut_ptr() as *mut __m256i, b) };
        }
        super::write_bsums(out);
        out[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}
