//! `kquant::avx2`: the AVX2 + FMA + F16C (x86-64) kernels of [`crate::kquant`], in the
//! `x86/` directory with the other x86 kernels (room beside it for `arm/`).

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
    let u =
        |k: usize| u32::from_le_bytes([wb[4 + 4 * k], wb[5 + 4 * k], wb[6 + 4 * k], wb[7 + 4 * k]]);
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
            let ph = _mm256_madd_epi16(bcast_i16(sc, 2 * j + 1), _mm256_maddubs_epi16(q4h, q8h));
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
            let hl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl), sixteen);
            let hh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh), sixteen);
            let q5l = _mm256_or_si256(_mm256_and_si256(q5bits, m4), hl);
            let q5h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q5bits), m4), hh);
            let pl = _mm256_madd_epi16(bcast_i16(sc, 2 * j), _mm256_maddubs_epi16(q5l, q8l));
            let ph = _mm256_madd_epi16(bcast_i16(sc, 2 * j + 1), _mm256_maddubs_epi16(q5h, q8h));
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
        let sub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, _mm256_cvtepi8_epi16(scales)));
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
                    [0, 1, 2, 3]
                        .map(|k| _mm256_loadu_si256(q8.add(128 * h + 32 * k) as *const __m256i)),
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
pub(crate) unsafe fn tile4_unchecked(ty: KType, nb: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
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
